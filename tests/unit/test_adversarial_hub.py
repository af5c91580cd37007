"""A hostile or broken Hub (tests/hub_server.py and raw sockets on loopback) and careless references:
every case ends within its deadline in a recipe or one clear error, nothing is read from outside the
cache, and no message quotes what the server sent. No test patches the client's back-off sleeps: the
deadlines are measured for real."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from litepatch import recipes
from litepatch.recipes import RecipeHubError, RecipeNotFoundError, RecipeValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hub_server import HubServer  # noqa: E402
from test_hub import _point_client_at, tiny_recipe  # noqa: E402

pytest.importorskip("huggingface_hub")

SECRET = "hf_SeCrEtToKeN0123456789abcdefXYZ"
GOOD = b"format_version: 1\nname: tiny\nthreshold: -6.0\n"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer() as server:
        _point_client_at(monkeypatch, server.url, tmp_path / "hf")
        monkeypatch.delenv("LITEPATCH_HUB_TIMEOUT", raising=False)
        yield server


@contextmanager
def _black_hole():
    """An endpoint that accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _timed(call, *args, **kwargs):
    start = time.monotonic()
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is checked by the caller
        call(*args, **kwargs)
    return info, time.monotonic() - start


# ---------------------------------------------------------------------------------------------- hangs


def test_endpoint_that_never_answers_fails_at_the_deadline(monkeypatch, tmp_path):
    with _black_hole() as url:
        _point_client_at(monkeypatch, url, tmp_path / "hf")
        info, seconds = _timed(recipes.resolve, "me/recipes/tiny", cache_dir=tmp_path / "c", timeout=1.5)
    assert info.type is RecipeHubError
    assert f"no answer from the Hub at {url} within 1.5 s to download me/recipes/tiny" in str(info.value)
    assert "LITEPATCH_HUB_TIMEOUT" in str(info.value)
    assert 1.4 < seconds < 4


def test_the_deadline_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LITEPATCH_HUB_TIMEOUT", "1")
    with _black_hole() as url:
        _point_client_at(monkeypatch, url, tmp_path / "hf")
        info, seconds = _timed(recipes.pull, "me/recipes/tiny", cache_dir=tmp_path / "c")
    assert "within 1 s" in str(info.value) and seconds < 3


def test_default_deadline_is_short():
    from litepatch.recipes import hub

    assert hub.DEFAULT_HUB_TIMEOUT <= 10


def test_refused_connection_fails_fast_without_retries(monkeypatch, tmp_path):
    url = _closed_port_url()
    _point_client_at(monkeypatch, url, tmp_path / "hf")
    info, seconds = _timed(recipes.resolve, "me/recipes/tiny", cache_dir=tmp_path / "c")
    assert info.type is RecipeHubError and "refused the connection" in str(info.value)
    assert seconds < 2
    info, seconds = _timed(recipes.push, tiny_recipe(), "me/recipes")
    assert info.type is RecipeHubError and "to upload me/recipes/tiny" in str(info.value) and seconds < 2


def test_unresolvable_host_fails_fast(monkeypatch, tmp_path):
    _point_client_at(monkeypatch, "http://litepatch-no-such-host.invalid", tmp_path / "hf")
    info, seconds = _timed(recipes.pull, "me/recipes/tiny", cache_dir=tmp_path / "c", timeout=3)
    assert info.type is RecipeHubError and "could not reach the Hub" in str(info.value)
    assert seconds < 4


def test_push_to_an_endpoint_that_never_answers(monkeypatch, tmp_path):
    with _black_hole() as url:
        _point_client_at(monkeypatch, url, tmp_path / "hf")
        info, seconds = _timed(recipes.push, tiny_recipe(), "me/recipes", timeout=1)
    assert info.type is RecipeHubError and "within 1 s to upload me/recipes/tiny" in str(info.value)
    assert "not cached" not in str(info.value) and seconds < 3


def test_slow_server_within_and_beyond_the_deadline(hub, tmp_path):
    hub.state.put("me/recipes", {"tiny.yaml": GOOD})
    hub.state.delay = 0.4
    assert recipes.resolve("me/recipes/tiny", cache_dir=tmp_path / "a", timeout=8).name == "tiny"
    info, seconds = _timed(recipes.resolve, "me/recipes/tiny", cache_dir=tmp_path / "b", timeout=0.3)
    assert info.type is RecipeHubError and "within 0.3 s" in str(info.value) and seconds < 2


def test_body_that_drips_is_cut_at_the_deadline(hub, tmp_path):
    hub.state.put("me/recipes", {"tiny.yaml": GOOD + b"#" * 400})
    hub.state.drip = 0.05
    info, seconds = _timed(recipes.pull, "me/recipes/tiny", cache_dir=tmp_path / "c", timeout=1.5)
    assert info.type is RecipeHubError and seconds < 3.5


def test_server_errors_are_not_retried_past_the_deadline(hub, tmp_path):
    hub.state.put("me/recipes", {"tiny.yaml": GOOD})
    hub.state.fail_status = 503
    info, seconds = _timed(recipes.pull, "me/recipes/tiny", cache_dir=tmp_path / "c", timeout=2)
    assert info.type is RecipeHubError and seconds < 4


def test_cached_recipe_is_used_when_the_hub_is_unreachable(hub, tmp_path, monkeypatch):
    hub.state.put("me/recipes", {"tiny.yaml": GOOD})
    cache = tmp_path / "c"
    assert recipes.resolve("me/recipes/tiny", cache_dir=cache).name == "tiny"
    with _black_hole() as url:
        _point_client_at(monkeypatch, url, tmp_path / "hf")
        start = time.monotonic()
        assert recipes.resolve("me/recipes/tiny", cache_dir=cache, timeout=1).name == "tiny"
        assert time.monotonic() - start < 3
    _point_client_at(monkeypatch, _closed_port_url(), tmp_path / "hf")
    assert recipes.resolve("me/recipes/tiny", cache_dir=cache).name == "tiny"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon", "1e999"])
def test_invalid_deadlines_are_named(value, monkeypatch, tmp_path):
    monkeypatch.setenv("LITEPATCH_HUB_TIMEOUT", value)
    with pytest.raises(RecipeValidationError, match="LITEPATCH_HUB_TIMEOUT must be a positive number of seconds"):
        recipes.pull("me/recipes/tiny", cache_dir=tmp_path)
    monkeypatch.delenv("LITEPATCH_HUB_TIMEOUT")
    with pytest.raises(RecipeValidationError, match="^timeout must be a positive number"):
        recipes.pull("me/recipes/tiny", cache_dir=tmp_path, timeout=float(value) if value != "soon" else value)


# ----------------------------------------------------------------------------------- names and typos


@pytest.mark.parametrize(
    "ref, suggestion",
    [("wan-72Op", "wan-720p"), ("wan2.1-14b-720", "wan2.1-14b-720p"), ("WAN-720P", "wan-720p"),
     ("wan-480", "wan-480p"), ("dem0", "demo"), ("wan2.1-1.3b-480", "wan2.1-1.3b-480p")],
)
def test_typos_of_builtin_names_never_reach_the_hub(hub, ref, suggestion):
    info, seconds = _timed(recipes.resolve, ref)
    assert info.type is RecipeNotFoundError
    assert f"unknown recipe {ref!r}: did you mean" in str(info.value) and repr(suggestion) in str(info.value)
    assert hub.state.requests == [] and seconds < 1


def test_cli_pull_of_a_typo_is_one_line_and_offline(hub, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from litepatch.cli import main; sys.exit(main())", "recipes", "pull",
         "wan-72Op"], capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 2 and "did you mean 'wan-720p'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and hub.state.requests == []
    assert time.monotonic() - start < 60


def test_cli_pull_against_a_black_hole_honours_the_environment(tmp_path):
    with _black_hole() as url:
        env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "LITEPATCH_HUB_TIMEOUT": "1"}
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from litepatch.cli import main; sys.exit(main())", "recipes", "pull",
             "me/recipes/tiny"], capture_output=True, text=True, timeout=120, env=env,
        )
        elapsed = time.monotonic() - start
    assert result.returncode == 2 and "no answer from the Hub" in result.stderr
    assert elapsed < 30  # the interpreter start dominates; the Hub part is 1 s


# ----------------------------------------------------------------------------------- hostile content


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"#" * (300 * 1024), "larger than the 262144-byte limit"),
        (b"!!python/object/apply:os.system ['touch MARKER']\n", "YAML tag"),
        (b"format_version: 1\nname: &a x\n", "YAML anchor"),
        (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested deeper than"),
        (b"format_version: 1\nwarmup_steps: " + b"9" * 4000 + b"\n", "a number of 4000 characters"),
        (SECRET.encode() + b"\n", "got a string of 33 characters"),
        (b"format_version: 1\n" + SECRET.encode() + b": 1\n", "unknown key at the top level"),
        ("format_version: 1\nname: tiny\n".encode("utf-16"), "UTF-16 or UTF-32"),
        (b"format_version: 1\nname: ${oc.env:HF_TOKEN}\n", "contains an interpolation"),
    ],
    ids=["huge", "python-tag", "anchor", "deep", "long-number", "token", "token-key", "utf16", "interpolation"],
)
def test_hostile_recipes_from_the_hub_are_refused_unquoted(hub, tmp_path, content, problem):
    marker = tmp_path / "pwned"
    hub.state.put("evil/recipes", {"tiny.yaml": content.replace(b"MARKER", str(marker).encode())})
    with pytest.raises(RecipeValidationError) as info:
        recipes.resolve("evil/recipes/tiny", cache_dir=tmp_path / "c")
    message = str(info.value)
    assert problem in message and "tiny.yaml" in message and "\n" not in message
    assert SECRET not in message and not marker.exists()


def test_commit_header_with_a_path_cannot_escape_the_cache(hub, tmp_path):
    hub.state.put("me/recipes", {"tiny.yaml": GOOD})
    hub.state.commit_header = "../../../../escaped"
    with pytest.raises((RecipeHubError, RecipeValidationError, RecipeNotFoundError)) as info:
        recipes.resolve("me/recipes/tiny", cache_dir=tmp_path / "c")
    assert "\n" not in str(info.value)
    assert not list(tmp_path.rglob("escaped*")) and not (tmp_path.parent / "escaped").exists()


def test_answer_without_etag_is_a_clear_error(hub, tmp_path):
    hub.state.put("me/recipes", {"tiny.yaml": GOOD})
    hub.state.drop_etag = True
    with pytest.raises(RecipeHubError) as info:
        recipes.resolve("me/recipes/tiny", cache_dir=tmp_path / "c", timeout=3)
    assert "me/recipes/tiny" in str(info.value) and "\n" not in str(info.value)


def test_truncated_body_is_a_clear_error_and_not_cached(hub, tmp_path):
    hub.state.put("me/recipes", {"tiny.yaml": GOOD + b"#" * 200})
    hub.state.truncate = True
    with pytest.raises(RecipeHubError) as info:
        recipes.resolve("me/recipes/tiny", cache_dir=tmp_path / "c", timeout=4)
    assert "me/recipes/tiny" in str(info.value)
    hub.state.truncate = False
    assert recipes.resolve("me/recipes/tiny", cache_dir=tmp_path / "c").name == "tiny"


def test_poisoned_cache_link_to_a_secret_is_refused(hub, tmp_path, monkeypatch):
    hub.state.put("me/recipes", {"tiny.yaml": GOOD})
    cache = tmp_path / "c"
    path = recipes.pull("me/recipes/tiny", cache_dir=cache)
    secret = tmp_path / "token"
    secret.write_text(f"format_version: 1\n{SECRET}: 1\n")
    path.unlink()
    path.symlink_to(secret)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RecipeValidationError) as info:
        recipes.resolve("me/recipes/tiny", cache_dir=cache)
    assert "outside" in str(info.value) and SECRET not in str(info.value)


def test_a_huge_file_is_refused_before_it_is_downloaded(hub, tmp_path):
    hub.state.put("evil/recipes", {"tiny.yaml": b"#" * (64 * 1024 * 1024)})
    cache = tmp_path / "c"
    info, seconds = _timed(recipes.resolve, "evil/recipes/tiny", cache_dir=cache, timeout=5)
    assert info.type is RecipeValidationError
    assert "the Hub announces 67108864 bytes, larger than the 262144-byte limit" in str(info.value)
    assert seconds < 5
    assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) < 1024 * 1024  # nothing large cached
    assert [m for m, _ in hub.state.requests].count("GET") == 0


def test_a_shared_client_closed_by_an_abandoned_download_does_not_fail_the_next_one(hub, tmp_path):
    """huggingface_hub closes its shared HTTP client when a connection fails; a download cut off at an
    earlier deadline (still running in its thread) can do that in the middle of a later one."""
    import threading

    from huggingface_hub.utils import _http

    hub.state.put("me/recipes", {"tiny.yaml": GOOD + b"#" * 100})
    hub.state.drip = 0.01  # the body takes over a second: the client is closed while it is read
    closer = threading.Timer(0.6, _http.close_session)
    closer.start()
    assert recipes.resolve("me/recipes/tiny", cache_dir=tmp_path / "c", timeout=8).name == "tiny"
    closer.join()


def test_a_shared_client_closed_under_a_push_does_not_fail_it(hub):
    """The same for an upload (an earlier pull cut off at its deadline did this to the push right after it,
    in one CI run): the client is closed while ``push`` reads its first answer; the push is tried again within
    its own deadline."""
    import threading
    import time

    from huggingface_hub.utils import _http

    hub.state.drip = 0.005  # each answer's body drips for about half a second

    def close_while_the_first_answer_is_read() -> None:
        while not any(method == "POST" for method, _ in hub.state.requests):
            time.sleep(0.005)
        time.sleep(0.15)
        _http.close_session()

    closer = threading.Thread(target=close_while_the_first_answer_is_read, daemon=True)
    closer.start()
    info = recipes.push(tiny_recipe(), "me/recipes", timeout=20)
    closer.join()
    assert info.oid and recipes.resolve(f"me/recipes/tiny@{info.oid}").name == "tiny"
