"""Optuna storage of a calibration study: SQLite, any RDB URL or a journal file, with one-line errors.

Example:
    >>> storage = make_storage("calib.db")           # sqlite:///.../calib.db, heartbeats on
    >>> storage = make_storage("shared/study.log")   # a journal file for many machines
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

from .errors import CalibrationError


STORAGE_TIMEOUT_ENV = "LITEPATCH_STORAGE_TIMEOUT"
SQLITE_HEADER = b"SQLite format 3\x00"


def make_storage(storage):
    """``None`` (in memory), an Optuna storage, an RDB URL (``sqlite:///study.db``), a ``*.db`` path,
    or a journal file (``*.log`` / ``*.journal``, for many machines on a shared file system).

    RDB storages record heartbeats, so that trials of a killed worker on another machine are failed
    (and their parameters proposed again) after ``$LITEPATCH_GRACE_PERIOD`` seconds (default
    :data:`~litepatch.calibration.workers.GRACE_PERIOD`); SQLite waits up to ``$LITEPATCH_STORAGE_TIMEOUT``
    seconds (default 120) for a lock that another worker holds.

    Raises:
        CalibrationError: the file is not a database of that kind (corrupt or another file), the
            storage cannot be opened, or ``$LITEPATCH_STORAGE_TIMEOUT`` / ``$LITEPATCH_GRACE_PERIOD`` is
            not a number of seconds; one line naming the file (or the variable) and what to do.
    """
    import optuna

    from .workers import grace_period

    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if not isinstance(storage, (str, os.PathLike)):
        raise TypeError(f"storage must be a URL, a path or an optuna storage, got {type(storage).__name__}")
    grace_period()  # a bad $LITEPATCH_GRACE_PERIOD fails here, before any generation
    text = os.fspath(storage)
    if text.endswith((".log", ".journal")) and "://" not in text:
        return _journal_storage(text)
    if "://" not in text:
        Path(text).parent.mkdir(parents=True, exist_ok=True)
        text = f"sqlite:///{Path(text).resolve()}"
    if text.startswith("sqlite:///"):
        _check_sqlite_file(text[len("sqlite:///"):])
    return _rdb_storage(text)


def _storage_timeout() -> float:
    value = os.environ.get(STORAGE_TIMEOUT_ENV, "120")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise CalibrationError(f"{STORAGE_TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return seconds


def _check_sqlite_file(path: str) -> None:
    """Refuses an existing file that is not an SQLite database before SQLAlchemy retries on it."""
    file = Path(path)
    if not file.is_file() or file.stat().st_size == 0:
        return
    with open(file, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise CalibrationError(
            f"storage file {file} is not an SQLite database (corrupt, or another kind of file); "
            "move it away to start a new study, or name the right file with storage="
        )


def _rdb_storage(url: str):
    from optuna.storages import RDBStorage
    from sqlalchemy.exc import SQLAlchemyError

    from .workers import grace_period, heartbeat_interval, quiet_optuna

    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": _storage_timeout()}} if sqlite else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with quiet_optuna():
                storage = RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval(),
                                     grace_period=grace_period())
            _create_missing_indexes(storage.engine)
            return storage
        except SQLAlchemyError as err:
            detail = " ".join(str(getattr(err, "orig", None) or err).split())[:200]
            # two new workers may create the schema of one new database at the same moment
            races = ("already exists", "duplicate key", "UNIQUE constraint", *(("locked",) if sqlite else ()))
            if attempt < 4 and any(m in detail for m in races):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise CalibrationError(
                f"storage {_redact(url)} cannot be opened ({type(err).__name__}: {detail}); check that it is an "
                "Optuna database that this user can reach, or move a corrupt file away to start a new study"
            ) from None
        except ImportError as err:  # the URL names a database driver that is not installed
            missing = err
            while missing is not None and not getattr(missing, "name", None):
                missing = missing.__cause__ or missing.__context__
            package = getattr(missing, "name", None) or "driver"
            hint = ' (pip install "litepatch[postgres]")' if url.startswith("postgresql") else ""
            raise CalibrationError(
                f"storage {_redact(url)} needs the Python package {package!r}, which is not installed{hint}"
            ) from None


def _create_missing_indexes(engine) -> None:
    """Creates the indexes of Optuna's schema that a worker killed mid-creation left out.

    SQLite (and MySQL) commit each ``CREATE`` of the schema on its own, and Optuna's ``create_all`` skips a table
    that exists together with its indexes. A worker killed between ``CREATE TABLE studies`` and the unique index
    on the study name left a database in which every run added a study of the same name, and the next
    ``create_study`` failed (``MultipleResultsFound`` inside a ``StorageInternalError``).
    """
    import sqlalchemy
    from optuna.storages._rdb.models import BaseModel

    with engine.begin() as connection:
        inspector = sqlalchemy.inspect(connection)
        for table in BaseModel.metadata.sorted_tables:
            if not table.indexes:
                continue
            present = {index["name"] for index in inspector.get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in present:
                    index.create(connection)


def _redact(url: str) -> str:
    """The URL without its password (``postgresql://user:***@host/db``)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def _journal_storage(path: str):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = JournalStorage(JournalFileBackend(path))
        storage.get_all_studies()  # replays the file: a corrupt journal fails here, not mid-job
    except Exception as err:  # noqa: BLE001 - one line naming the file
        raise CalibrationError(
            f"journal storage file {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); it is corrupt "
            "or not an Optuna journal: move it away to start a new study"
        ) from None
    return storage


def storage_label(storage) -> str:
    """What the report and messages call the storage (an RDB URL without its password)."""
    if storage is None:
        return "in-memory"
    url = getattr(storage, "url", None)
    return _redact(str(url)) if url else type(storage).__name__


@contextlib.contextmanager
def storage_failures(storage, during: str = "the trials"):
    """A database error ``during`` the opening of the study or the trials (a lock held past the timeout, a lost
    connection) becomes one line naming the storage; the finished trials are in it, and a rerun continues."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, StorageInternalError) as err:
        cause = err.__cause__ if isinstance(err, StorageInternalError) and err.__cause__ is not None else err
        detail = " ".join(str(getattr(cause, "orig", None) or cause).split())[:200]
        raise CalibrationError(
            f"storage {storage_label(storage)} failed during {during} ({type(err).__name__}: {detail}); the "
            f"finished trials are kept in it: run the job again to continue (locks wait {STORAGE_TIMEOUT_ENV} s)"
        ) from None
