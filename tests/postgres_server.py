"""A throw-away PostgreSQL server for the tests: a new cluster in a temporary folder, on a loopback port.

It uses the server programs of Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``,
or ``initdb``/``pg_ctl`` on ``PATH``). PostgreSQL refuses to run as root, so under root the cluster
belongs to the ``postgres`` user (which the package creates) and the programs run through ``runuser``.
Authentication is ``trust`` on 127.0.0.1 only; ``fsync`` is off (test data).

Example:
    >>> with PostgresServer() as server:                 # doctest: +SKIP
    ...     optuna.create_study(storage=server.url)
    $ python tests/postgres_server.py start /tmp/pg     # prints the URL; `stop /tmp/pg` ends it (.ci/run)
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

USER = "litepatch"
DATABASE = "postgres"
URL_ENV = "LITEPATCH_TEST_POSTGRES_URL"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server programs here, or the server would not start (the message says which)."""


def find_program(name: str) -> str | None:
    """The newest Debian ``postgresql`` program ``name``, else the one on ``PATH``."""
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return versions[-1] if versions else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``start()`` makes and starts the cluster and returns its SQLAlchemy URL; ``stop()`` removes it."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="litepatch-pg-"))
        self.data = self.root / "data"
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def _as_owner(self, args: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return args
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root and there is no 'postgres' user to own the cluster") from None
        runuser = shutil.which("runuser")
        if runuser is None:
            raise PostgresUnavailable("running as root and runuser is missing (PostgreSQL refuses to run as root)")
        return [runuser, "-u", "postgres", "--", *args]

    def _run(self, args: list[str], what: str) -> None:
        result = subprocess.run(self._as_owner(args), capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise PostgresUnavailable(f"{what} failed ({result.returncode}): {result.stderr.strip()[-1500:]} {tail}")

    def start(self) -> str:
        initdb, pg_ctl = find_program("initdb"), find_program("pg_ctl")
        if not (initdb and pg_ctl):
            raise PostgresUnavailable("no PostgreSQL server programs (initdb, pg_ctl): apt-get install postgresql")
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and _has_user("postgres"):
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self._run([initdb, "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync",
                   "--no-instructions"], "initdb")
        self.port = _free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=100"
        self._run([pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "-t", "60",
                   "start"], "pg_ctl start")
        return self.url

    def stop(self) -> None:
        pg_ctl = find_program("pg_ctl")
        if pg_ctl and (self.data / "postmaster.pid").exists():
            subprocess.run(self._as_owner([pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def main(argv: list[str]) -> int:
    """``start DIR`` prints the URL of a server left running in DIR; ``stop DIR`` stops it and removes DIR."""
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: postgres_server.py start|stop DIR", file=sys.stderr)
        return 2
    server = PostgresServer(argv[1])
    if argv[0] == "stop":
        server.stop()
        return 0
    try:
        url = server.start()
    except PostgresUnavailable as err:
        print(f"PostgreSQL not started: {err}", file=sys.stderr)
        server.stop()
        return 1
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
