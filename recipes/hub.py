"""Recipes on the Hugging Face Hub: references, pull (into the huggingface_hub cache) and push (YAML + model card).

A Hub reference is ``"org/repo/name[@revision]"``: the file ``name.yaml`` of the model repository
``org/repo`` at ``revision`` (branch, tag or commit; default ``main``). A short ``"name[@revision]"``
means the default recipes repository (see :func:`litepatch.recipes.default_recipes_repo`).

Everything goes through the real ``huggingface_hub`` client, so its conventions hold: the cache
directory (``HF_HUB_CACHE``/``HF_HOME``, or ``cache_dir=``), ``HF_HUB_OFFLINE=1`` (or
``local_files_only=True``) to use only what is cached, ``HF_ENDPOINT`` for mirrors, the token from
``hf auth login``/``HF_TOKEN`` or ``token=``. A pulled file is read with the same limits as a local
one (:mod:`litepatch.recipes.untrusted`), inside the repository's cache folder (a link out of it is
refused), and the resolved commit goes into ``recipe.provenance.hub_revision``.

Every network step has a deadline: ``timeout=`` seconds in all, else ``$LITEPATCH_HUB_TIMEOUT``, else
:data:`DEFAULT_HUB_TIMEOUT` (10 s). The client's own retries (up to minutes against an endpoint
that accepts connections and never answers) are cut at the deadline; a refused or unresolvable
endpoint fails at once. A recipe already in the cache is used when the Hub cannot be reached in time,
as huggingface_hub itself does.

Example:
    >>> from litepatch.recipes import push, pull, resolve
    >>> push(recipe, "me/litepatch-recipes")                   # doctest: +SKIP
    >>> path = pull("me/litepatch-recipes/wan2.1-14b-720p@main")  # doctest: +SKIP
    >>> resolve("me/litepatch-recipes/wan2.1-14b-720p").provenance.hub_revision  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RecipeError, RecipeHubError, RecipeNotFoundError, RecipeValidationError
from .io import dumps, load
from .schema import Recipe
from .card import merge_readme, model_card
from .untrusted import MAX_RECIPE_BYTES
from .validation import check_name, validate

DEFAULT_RECIPES_REPO = "litepatch/recipes"
"""Hub repository searched for short names that are not built in (env ``LITEPATCH_RECIPES_REPO``)."""

RECIPES_REPO_ENV = "LITEPATCH_RECIPES_REPO"

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
README_NAME = "README.md"

HUB_TIMEOUT_ENV = "LITEPATCH_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 10.0
"""Seconds that one pull or push may take in all (env ``LITEPATCH_HUB_TIMEOUT``, argument ``timeout=``)."""
_PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub reference: ``repo_id`` (``org/repo``), recipe ``name``, ``revision`` (None: main)."""

    repo_id: str
    name: str
    revision: str | None = None
    short: bool = False  # written without org/repo: looked up in the default repository

    @property
    def filename(self) -> str:
        return f"{self.name}.yaml"

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.name}" + (f"@{self.revision}" if self.revision else "")


def default_recipes_repo(recipes_repo: str | None = None) -> str:
    """The Hub repository for short names: the argument, else ``$LITEPATCH_RECIPES_REPO``, else the default."""
    return recipes_repo or os.environ.get(RECIPES_REPO_ENV) or DEFAULT_RECIPES_REPO


def check_repo_id(repo_id: object) -> str:
    """Returns ``repo_id`` if it is ``org/repo`` with safe parts; raises :class:`RecipeValidationError`."""
    if not isinstance(repo_id, str):
        raise RecipeValidationError(f"Hub repository id must be a string 'org/repo', got {type(repo_id).__name__}")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_REPO_PART.match(p) and ".." not in p for p in parts) or "\\" in repo_id:
        raise RecipeValidationError(
            f"Hub repository id {repo_id!r} is not of the form 'org/repo' (letters, digits, '.', '_', '-'; "
            "no '..', backslashes or extra '/')"
        )
    return repo_id


def _check_revision(revision: object) -> str:
    if not isinstance(revision, str) or not revision or any(c.isspace() for c in revision) or ".." in revision:
        raise RecipeValidationError(
            f"revision {revision!r} is not a valid branch, tag or commit name (no spaces, no '..')"
        )
    return revision


def parse_ref(ref: str | HubRef, *, revision: str | None = None, recipes_repo: str | None = None) -> HubRef:
    """Parses ``"org/repo/name[@revision]"`` or ``"name[@revision]"`` (default repository).

    A revision in the reference and a different ``revision=`` argument are an error.

    Example:
        >>> parse_ref("org/repo/wan-720p@v1")
        HubRef(repo_id='org/repo', name='wan-720p', revision='v1', short=False)
    """
    if isinstance(ref, HubRef):
        base = ref
    else:
        if not isinstance(ref, str):
            raise RecipeValidationError(f"Hub reference must be a string 'org/repo/name[@revision]', got {ref!r}")
        body, sep, pinned = ref.partition("@")
        pinned_rev = _check_revision(pinned) if sep else None
        if "\\" in body or body.startswith("/") or os.path.isabs(body):
            raise RecipeValidationError(
                f"recipe reference {ref!r} contains a backslash or an absolute path; "
                "use 'org/repo/name[@revision]' or a path to an existing .yaml file"
            )
        parts = body.split("/")
        if any(p in ("..", ".") for p in parts):
            raise RecipeValidationError(
                f"recipe reference {ref!r} contains '..' or '.' path parts; use 'org/repo/name[@revision]'"
            )
        if len(parts) == 1:
            base = HubRef(check_repo_id(default_recipes_repo(recipes_repo)), check_name(parts[0]), pinned_rev, True)
        elif len(parts) == 3:
            repo_id = check_repo_id(f"{parts[0]}/{parts[1]}")
            base = HubRef(repo_id, check_name(parts[2], "recipe name in the Hub reference"), pinned_rev)
        else:
            raise RecipeValidationError(
                f"recipe reference {ref!r} is neither a name, a path to an existing .yaml file nor "
                "'org/repo/name[@revision]' (a Hub repository and a recipe name in it)"
            )
    if revision is not None:
        _check_revision(revision)
        if base.revision is not None and base.revision != revision:
            raise RecipeValidationError(
                f"recipe reference {ref!s} pins revision {base.revision!r} but revision={revision!r} was passed; "
                "give only one"
            )
        base = dataclasses.replace(base, revision=revision)
    return base


def hub_timeout(timeout: float | None = None) -> float:
    """The deadline of one Hub operation in seconds: ``timeout``, else ``$LITEPATCH_HUB_TIMEOUT``, else 10.

    Raises:
        RecipeValidationError: a value that is not a positive finite number (named with its source).
    """
    source, value = ("timeout", timeout) if timeout is not None else (HUB_TIMEOUT_ENV, os.environ.get(HUB_TIMEOUT_ENV))
    if value is None or value == "":
        return DEFAULT_HUB_TIMEOUT
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (math.isfinite(seconds) and seconds > 0):
        raise RecipeValidationError(f"{source} must be a positive number of seconds, e.g. 10; got an invalid value")
    return seconds


class _Deadline:
    """Seconds left of one Hub operation."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def _probe(deadline: _Deadline, ref: HubRef, action: str) -> None:
    """Fails at once when the endpoint refuses connections or its host does not resolve (no proxy set);
    the Hub client would retry those for ~20 s before giving up."""
    from urllib.parse import urlsplit

    if any(os.environ.get(name) for name in _PROXY_ENV):
        return  # the connection goes through the proxy: nothing to learn from the endpoint itself
    url = urlsplit(_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=max(0.05, deadline.left())):
            return
    except socket.timeout:
        raise _timed_out(deadline, ref, action) from None
    except OSError as err:
        reason = "the endpoint refused the connection" if isinstance(err, ConnectionRefusedError) else (
            f"{type(err).__name__}: {err.strerror or err}")
        cached = " and it is not cached" if action == "download" else ""
        raise RecipeHubError(
            f"could not reach the Hub at {_endpoint()} to {action} {ref!s} ({reason}){cached}: "
            "check your connection, proxy and HF_ENDPOINT, then retry"
        ) from None


def _timed_out(deadline: _Deadline, ref: HubRef, action: str) -> RecipeHubError:
    cached = ", and it is not cached" if action == "download" else ""
    return RecipeHubError(
        f"no answer from the Hub at {_endpoint()} within {deadline.seconds:g} s to {action} {ref!s}{cached}: check "
        f"your connection, proxy and HF_ENDPOINT, or allow more time with timeout= or {HUB_TIMEOUT_ENV}"
    )


def _within(deadline: _Deadline, call: Callable[[], Any], ref: HubRef, action: str) -> Any:
    """``call()`` in a daemon thread; raises :func:`_timed_out` when it has not returned by the deadline.

    A call cut off keeps running in its thread until the client's own timeouts end it; huggingface_hub
    writes the cache atomically (``*.incomplete``, then a rename), so it leaves nothing half written.
    """
    answers: queue.Queue = queue.Queue(maxsize=1)

    def target() -> None:
        try:
            answers.put((True, call()))
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            answers.put((False, err))

    threading.Thread(target=target, name=f"litepatch-hub-{action}", daemon=True).start()
    try:
        ok, value = answers.get(timeout=deadline.left())
    except queue.Empty:
        raise _timed_out(deadline, ref, action) from None
    if not ok:
        raise value
    return value


def _within_again_if_closed(deadline: _Deadline, call: Callable[[], Any], ref: HubRef, action: str) -> Any:
    """:func:`_within`, tried again (while time is left) when the Hub client's shared connection pool was
    closed under the call: a call cut off at an earlier deadline still runs in its thread, and when it
    fails to connect huggingface_hub closes the client that every thread shares."""
    for _ in range(3):
        try:
            return _within(deadline, call, ref, action)
        except Exception as err:  # noqa: BLE001 - re-raised unless it is that case
            if not (_closed_under_us(err) and deadline.left() > 0.1):
                raise
    return _within(deadline, call, ref, action)


def _closed_under_us(err: BaseException) -> bool:
    import errno

    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno == errno.EBADF:
            return True
        text = str(err)
        if "Bad file descriptor" in text or "client has been closed" in text:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _hub_errors():
    """The huggingface_hub error classes (``huggingface_hub.errors`` since 0.24, ``utils`` before)."""
    try:
        from huggingface_hub import errors
    except ImportError:  # pragma: no cover - old huggingface_hub
        from huggingface_hub import utils as errors
    return errors


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _is_offline(local_files_only: bool | None) -> bool:
    from huggingface_hub import constants

    return bool(local_files_only) or bool(constants.HF_HUB_OFFLINE)


def _translate(err: Exception, ref: HubRef, *, action: str, local_files_only: bool | None = None) -> RecipeError:
    """One clear message per failure of the Hub client, saying what to do."""
    errors = _hub_errors()
    rev = ref.revision or "main"
    if isinstance(err, errors.GatedRepoError):
        return RecipeHubError(
            f"Hub repository {ref.repo_id!r} is gated: accept its conditions on {_endpoint()}/{ref.repo_id} "
            "and log in (`hf auth login` or HF_TOKEN)"
        )
    if isinstance(err, errors.RepositoryNotFoundError):
        return RecipeNotFoundError(
            f"Hub repository {ref.repo_id!r} not found on {_endpoint()} (or it is private): check the name, "
            "or log in (`hf auth login`, HF_TOKEN or token=) if it is private"
        )
    if isinstance(err, errors.RevisionNotFoundError):
        return RecipeNotFoundError(
            f"revision {rev!r} not found in Hub repository {ref.repo_id!r}: check the branch, tag or commit, "
            "or drop '@revision' to use main"
        )
    if isinstance(err, errors.LocalEntryNotFoundError):
        cause = err.__cause__ or err.__context__
        if _is_offline(local_files_only) or isinstance(cause, getattr(errors, "OfflineModeIsEnabled", ())):
            return RecipeNotFoundError(
                f"recipe {ref!s} is not in the local Hugging Face cache and Hub access is off "
                "(HF_HUB_OFFLINE=1 or local_files_only=True): run `litepatch recipes pull "
                f"{ref!s}` once while online, or unset HF_HUB_OFFLINE"
            )
        if isinstance(cause, errors.HfHubHTTPError) and getattr(cause, "response", None) is not None:
            return _translate(cause, ref, action=action, local_files_only=local_files_only)
        detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})" if cause else ""
        return RecipeHubError(
            f"could not reach the Hub at {_endpoint()} to {action} {ref!s}{detail} and it is not cached: "
            "check your connection, proxy and HF_ENDPOINT, then retry"
        )
    if isinstance(err, errors.EntryNotFoundError):
        return RecipeNotFoundError(
            f"recipe {ref.name!r} ({ref.filename}) not found in Hub repository {ref.repo_id!r} at revision {rev!r}: "
            f"check the name (files: {_endpoint()}/{ref.repo_id}/tree/{rev})"
        )
    if isinstance(err, errors.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if status in (401, 403):
            return RecipeHubError(
                f"the Hub refused to {action} {ref!s} (HTTP {status}: {first}): log in with a token that has "
                "access (`hf auth login`, HF_TOKEN or token=)"
            )
        return RecipeHubError(f"the Hub failed to {action} {ref!s} (HTTP {status}: {first}); retry later")
    if isinstance(err, (ConnectionError, TimeoutError, OSError)) or type(err).__module__.startswith(("httpx", "requests")):
        return RecipeHubError(
            f"could not reach the Hub at {_endpoint()} to {action} {ref!s} ({type(err).__name__}: {err}): "
            "check your connection, proxy and HF_ENDPOINT, then retry"
        )
    return RecipeHubError(f"could not {action} {ref!s}: {type(err).__name__}: {err}")


def pull(
    ref: str | HubRef,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    recipes_repo: str | None = None,
    timeout: float | None = None,
) -> Path:
    """Downloads ``name.yaml`` into the huggingface_hub cache (or finds it there) and returns its path.

    Offline afterwards: with ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` the cached copy is used
    (for a pinned commit it is used without any network call in any case). The whole download takes at
    most ``timeout`` seconds (default ``$LITEPATCH_HUB_TIMEOUT`` or 10); when the Hub cannot be reached
    in time, a cached copy is used if there is one.

    Raises:
        RecipeNotFoundError: repository, revision or file not found, or offline with nothing cached.
        RecipeHubError: network or server errors, authentication, no answer within the deadline.
        RecipeValidationError: the cached file lies outside the repository's cache folder.

    Example:
        >>> path = pull("org/repo/wan2.1-14b-720p@main", timeout=5)  # doctest: +SKIP
    """
    import huggingface_hub.file_download  # noqa: F401 - imported before the clock starts (seconds on a cold start)

    parsed = parse_ref(ref, revision=revision, recipes_repo=recipes_repo)
    deadline = _Deadline(hub_timeout(timeout))
    offline = _is_offline(local_files_only)
    try:
        if offline:
            path = _download(parsed, cache_dir, True, token, deadline)
        else:
            path = _download_online(parsed, cache_dir, token, deadline)
    except RecipeError:
        raise
    except Exception as err:  # noqa: BLE001 - translated into one clear message per case
        raise _translate(err, parsed, action="download", local_files_only=local_files_only) from err
    return _inside_cache(Path(path), parsed, cache_dir)


def _download(parsed: HubRef, cache_dir, local_files_only: bool, token, deadline: _Deadline) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(
        parsed.repo_id, parsed.filename, revision=parsed.revision, cache_dir=cache_dir,
        local_files_only=local_files_only, token=token, etag_timeout=max(0.05, deadline.left()),
    )


def _download_online(parsed: HubRef, cache_dir, token, deadline: _Deadline) -> str:
    """The download within the deadline; on a network failure or timeout, the cached copy if any."""
    def fetch() -> str:
        _refuse_announced_size(parsed, cache_dir, token, deadline)
        return _download(parsed, cache_dir, False, token, deadline)

    try:
        _probe(deadline, parsed, "download")
        return _within_again_if_closed(deadline, fetch, parsed, "download")
    except RecipeHubError:
        cached = _cached(parsed, cache_dir)
        if cached is None:
            raise
        return cached


def _refuse_announced_size(parsed: HubRef, cache_dir, token, deadline: _Deadline) -> None:
    """Refuses, before downloading, a file that the Hub says is larger than a recipe may be (the size limit
    of the reader would otherwise apply only after the whole file is in the cache). Any failure to get the
    size is left to the download, which reports it (or falls back to the cache) as usual."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    if parsed.revision and _COMMIT.match(parsed.revision) and _cached(parsed, cache_dir):
        return  # a pinned, cached commit: no network at all
    try:
        url = hf_hub_url(parsed.repo_id, parsed.filename, revision=parsed.revision, endpoint=_endpoint())
        size = get_hf_file_metadata(url, token=token, timeout=max(0.05, deadline.left())).size
    except Exception as err:  # noqa: BLE001 - see the docstring
        if _closed_under_us(err):
            raise  # the shared client was closed by an abandoned call: the caller tries again
        return
    if isinstance(size, int) and size > MAX_RECIPE_BYTES:
        raise RecipeValidationError(
            f"{parsed.filename} of {parsed!s}: the Hub announces {size} bytes, larger than the {MAX_RECIPE_BYTES}-byte "
            "limit for recipes; not downloaded (check the reference)"
        )


def _cached(parsed: HubRef, cache_dir) -> str | None:
    """The cached file of ``parsed`` (a file-system lookup only, no lock, no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(parsed.repo_id, parsed.filename, cache_dir=cache_dir, revision=parsed.revision)
    return found if isinstance(found, str) else None


def repo_cache_folder(parsed: HubRef, cache_dir: str | os.PathLike | None = None) -> Path:
    """The huggingface_hub cache folder of the recipe's repository (``.../models--org--repo``)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    base = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    return base.expanduser() / repo_folder_name(repo_id=parsed.repo_id, repo_type="model")


def _inside_cache(path: Path, parsed: HubRef, cache_dir) -> Path:
    """Refuses a downloaded path (or its link target) outside the repository's cache folder."""
    root = os.path.realpath(repo_cache_folder(parsed, cache_dir))
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != root:
        raise RecipeValidationError(
            f"the cached file of {parsed!s} lies outside its cache folder {root!r}; refusing to read it "
            "(clear that cache folder and pull again)"
        )
    return path


def commit_of(path: Path, parsed: HubRef) -> str | None:
    """The commit of a file in the huggingface_hub cache: ``.../snapshots/<commit>/<file>``."""
    if path.parent.parent.name == "snapshots" and _COMMIT.match(path.parent.name):
        return path.parent.name
    if parsed.revision and _COMMIT.match(parsed.revision):
        return parsed.revision
    return None


def load_pulled(path: str | os.PathLike, parsed: HubRef, cache_dir: str | os.PathLike | None = None) -> Recipe:
    """Loads a pulled recipe (no link out of its repository's cache folder) and records the commit it came
    from in ``provenance.hub_revision``."""
    path = Path(path)
    recipe = load(path, root=repo_cache_folder(parsed, cache_dir))
    recipe.provenance.hub_revision = commit_of(path, parsed)
    return recipe


# --------------------------------------------------------------------------------------------- push


def _existing_readme(api: Any, repo_id: str, revision: str | None, token: str | bool | None) -> str | None:
    errors = _hub_errors()
    try:
        path = api.hf_hub_download(repo_id, README_NAME, revision=revision, token=token)
    except (errors.EntryNotFoundError, errors.RevisionNotFoundError):
        return None
    with open(path, "rb") as f:
        return f.read(1 << 20).decode("utf-8", errors="replace")


def push(
    recipe: Recipe,
    repo_id: str,
    *,
    name: str | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    timeout: float | None = None,
) -> Any:
    """Uploads ``recipe`` as ``<name>.yaml`` plus its section of the README model card, in one commit.

    Creates the repository when missing (``private`` applies then). The README keeps the sections of
    the other recipes in the repository. The upload takes at most ``timeout`` seconds in all (default
    ``$LITEPATCH_HUB_TIMEOUT`` or 10). Returns huggingface_hub's ``CommitInfo`` (``.oid`` is the
    commit to pin: ``org/repo/name@<oid>``).

    Raises:
        RecipeValidationError: the recipe, name or repo_id is invalid (nothing is uploaded).
        RecipeNotFoundError, RecipeHubError: as in :func:`pull`.

    Example:
        >>> info = push(recipe, "me/litepatch-recipes", commit_message="Wan 720p, psnr>=30")  # doctest: +SKIP
        >>> info.oid  # doctest: +SKIP
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if not isinstance(recipe, Recipe):
        raise RecipeValidationError(f"push expects a litepatch Recipe, got {type(recipe).__name__}; load() it first")
    name = check_name(name or recipe.name)
    check_repo_id(repo_id)
    if revision is not None:
        _check_revision(revision)
    to_upload = dataclasses.replace(
        recipe, name=name, provenance=dataclasses.replace(recipe.provenance, hub_revision=None)
    )
    validate(to_upload)
    text = dumps(to_upload)
    ref = HubRef(repo_id, name, revision)
    deadline = _Deadline(hub_timeout(timeout))
    api = HfApi(token=token)

    def upload() -> Any:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        readme = merge_readme(_existing_readme(api, repo_id, revision, token), model_card(to_upload, repo_id), name)
        operations = [
            CommitOperationAdd(path_in_repo=ref.filename, path_or_fileobj=text.encode("utf-8")),
            CommitOperationAdd(path_in_repo=README_NAME, path_or_fileobj=readme.encode("utf-8")),
        ]
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"litepatch: upload recipe {name}",
            revision=revision,
            token=token,
        )

    try:
        _probe(deadline, ref, "upload")
        # create_repo is idempotent (exist_ok) and a commit cut by a closed client never reached the server
        return _within_again_if_closed(deadline, upload, ref, "upload")
    except RecipeError:
        raise
    except Exception as err:  # noqa: BLE001 - translated into one clear message per case
        raise _translate(err, ref, action="upload") from err
