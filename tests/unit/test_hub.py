"""Recipes on the Hub: the real huggingface_hub client against a local Hub-compatible server
(tests/hub_server.py); no test reaches the internet."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import litepatch
from litepatch import recipes
from litepatch.recipes import (
    ModelFingerprint,
    Recipe,
    RecipeHubError,
    RecipeNotFoundError,
    RecipeValidationError,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hub_server import HubServer  # noqa: E402

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402

TINY_FP = ModelFingerprint("WanTransformer3DModel", 2, 2, 16, ["blocks.0.attn1", "blocks.1.attn1"])


def _point_client_at(monkeypatch, url: str, home: Path) -> None:
    """huggingface_hub reads HF_ENDPOINT and the cache paths at import: patch its constants (and the env
    for subprocesses)."""
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(recipes.RECIPES_REPO_ENV, raising=False)


@pytest.fixture(autouse=True)
def no_backoff_sleep(monkeypatch):
    """huggingface_hub retries failed requests with exponential back-off (23 s in all); no waiting in tests."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer() as server:
        _point_client_at(monkeypatch, server.url, tmp_path / "hf")
        yield server


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def tiny_recipe(name="tiny", threshold=-6.0) -> Recipe:
    return Recipe(name=name, description="tiny Wan for tests", threshold=threshold, fingerprint=TINY_FP,
                  warmup_steps=1)


def _posts(server) -> list[str]:
    return [path for method, path in server.state.requests if method == "POST"]


# ---------------------------------------------------------------------------------------- push / pull


def test_push_then_resolve_records_the_commit(hub, cache):
    recipe = tiny_recipe()
    info = recipes.push(recipe, "me/recipes", commit_message="add tiny")
    assert len(info.oid) == 40
    repo = hub.state.repos["me/recipes"]
    assert repo.branches["main"] == info.oid and repo.messages[info.oid] == "add tiny"
    assert repo.commits[info.oid]["tiny.yaml"].decode() == recipes.dumps(recipe)

    pulled = recipes.resolve("me/recipes/tiny", cache_dir=cache)
    assert pulled.provenance.hub_revision == info.oid
    pulled.provenance.hub_revision = None
    assert pulled == recipe
    path = recipes.pull("me/recipes/tiny", cache_dir=cache)
    assert path.is_relative_to(cache) and path.parent.name == info.oid and path.name == "tiny.yaml"


def test_push_writes_a_model_card_and_keeps_other_recipes_sections(hub):
    first = tiny_recipe("first")
    first.measured.psnr, first.measured.speedup, first.measured.kept_fraction = 31.25, 1.8, 0.55
    first.measured.hardware = "H100"
    first.context.resolution = "1280x720"
    recipes.push(first, "me/recipes")
    recipes.push(tiny_recipe("second"), "me/recipes")
    recipes.push(tiny_recipe("first", threshold=-5.0), "me/recipes")  # replaces its own section only
    repo = hub.state.repos["me/recipes"]
    readme = repo.commits[repo.branches["main"]]["README.md"].decode()
    assert readme.startswith("---\nlibrary_name: litepatch\n")
    assert readme.count("<!-- litepatch-recipe: first -->") == 1
    assert readme.count("<!-- litepatch-recipe: second -->") == 1
    assert "Default threshold -5.0" in readme and "Default threshold -6.0" in readme
    assert "`WanTransformer3DModel`, 2 attention layers, 2 heads, head dim 16" in readme
    assert 'litepatch.apply(pipe.transformer, recipe="me/recipes/second")' in readme
    assert "| PSNR vs dense (dB) | not measured |" in readme  # the re-pushed 'first' has no measurement
    card = recipes.hub.model_card(first, "me/recipes")
    assert "| PSNR vs dense (dB) | 31.25 |" in card and "| speed-up | 1.80x |" in card
    assert "| attention tiles computed | 55.0% |" in card and "| hardware | H100 |" in card
    assert "resolution 1280x720" in card


def test_push_name_and_hub_revision_are_rewritten(hub, cache):
    recipe = tiny_recipe()
    recipe.provenance.hub_revision = "f" * 40
    info = recipes.push(recipe, "me/recipes", name="renamed")
    text = hub.state.repos["me/recipes"].commits[info.oid]["renamed.yaml"].decode()
    assert "name: renamed" in text and "hub_revision: null" in text
    assert recipe.name == "tiny" and recipe.provenance.hub_revision == "f" * 40  # caller's object untouched


def test_revisions_are_honoured(hub, cache):
    v1 = recipes.push(tiny_recipe(threshold=-10.0), "me/recipes").oid
    hub.state.tag("me/recipes", "v1")
    v2 = recipes.push(tiny_recipe(threshold=-4.0), "me/recipes").oid
    assert recipes.resolve("me/recipes/tiny", cache_dir=cache).threshold == -4.0
    by_tag = recipes.resolve("me/recipes/tiny@v1", cache_dir=cache)
    assert by_tag.threshold == -10.0 and by_tag.provenance.hub_revision == v1
    by_sha = recipes.resolve(f"me/recipes/tiny@{v1}", cache_dir=cache)
    assert by_sha.threshold == -10.0 and by_sha.provenance.hub_revision == v1
    assert recipes.resolve("me/recipes/tiny", revision=v2, cache_dir=cache).provenance.hub_revision == v2


def test_short_names_use_the_default_repository(hub, cache, monkeypatch):
    recipes.push(tiny_recipe("shared"), "team/recipes")
    monkeypatch.setenv(recipes.RECIPES_REPO_ENV, "team/recipes")
    assert recipes.resolve("shared", cache_dir=cache).name == "shared"
    monkeypatch.delenv(recipes.RECIPES_REPO_ENV)
    assert recipes.resolve("shared", cache_dir=cache, recipes_repo="team/recipes").name == "shared"
    with pytest.raises(RecipeNotFoundError) as info:
        recipes.resolve("shared", cache_dir=cache)  # default repository litepatch/recipes does not exist here
    assert "in the default Hub repository 'litepatch/recipes'" in str(info.value)
    assert "set LITEPATCH_RECIPES_REPO" in str(info.value)


def test_pulled_recipe_works_offline_from_the_cache(hub, cache, monkeypatch):
    sha = recipes.push(tiny_recipe(), "me/recipes").oid
    recipes.pull("me/recipes/tiny", cache_dir=cache)
    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.state.requests)
    assert recipes.resolve("me/recipes/tiny", cache_dir=cache).provenance.hub_revision == sha
    assert recipes.resolve(f"me/recipes/tiny@{sha}", cache_dir=cache).threshold == -6.0
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert recipes.resolve("me/recipes/tiny", cache_dir=cache, local_files_only=True).name == "tiny"
    assert len(hub.state.requests) == before


# -------------------------------------------------------------------------------------------- errors


def test_repository_not_found(hub, cache):
    with pytest.raises(RecipeNotFoundError) as info:
        recipes.resolve("me/nothing/tiny", cache_dir=cache)
    assert str(info.value) == (
        f"Hub repository 'me/nothing' not found on {hub.url} (or it is private): check the name, "
        "or log in (`hf auth login`, HF_TOKEN or token=) if it is private"
    )


def test_file_not_found(hub, cache):
    recipes.push(tiny_recipe(), "me/recipes")
    with pytest.raises(RecipeNotFoundError, match=r"recipe 'other' \(other.yaml\) not found in Hub repository "
                                                  r"'me/recipes' at revision 'main': check the name"):
        recipes.resolve("me/recipes/other", cache_dir=cache)


def test_revision_not_found(hub, cache):
    recipes.push(tiny_recipe(), "me/recipes")
    with pytest.raises(RecipeNotFoundError, match="revision 'v9' not found in Hub repository 'me/recipes': check "
                                                  "the branch, tag or commit, or drop '@revision' to use main"):
        recipes.resolve("me/recipes/tiny@v9", cache_dir=cache)


def test_offline_with_empty_cache(hub, cache, monkeypatch):
    recipes.push(tiny_recipe(), "me/recipes")
    expected = ("recipe me/recipes/tiny is not in the local Hugging Face cache and Hub access is off "
                "(HF_HUB_OFFLINE=1 or local_files_only=True): run `litepatch recipes pull me/recipes/tiny` once "
                "while online, or unset HF_HUB_OFFLINE")
    with pytest.raises(RecipeNotFoundError) as info:
        recipes.resolve("me/recipes/tiny", cache_dir=cache, local_files_only=True)
    assert str(info.value) == expected
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RecipeNotFoundError) as info:
        recipes.resolve("me/recipes/tiny", cache_dir=cache)
    assert str(info.value) == expected


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_network_error_on_download_and_upload(monkeypatch, tmp_path, cache):
    url = _closed_port_url()
    _point_client_at(monkeypatch, url, tmp_path / "hf")
    with pytest.raises(RecipeHubError) as info:
        recipes.resolve("me/recipes/tiny", cache_dir=cache)
    message = str(info.value)
    assert message.startswith(f"could not reach the Hub at {url} to download me/recipes/tiny (")
    assert message.endswith("and it is not cached: check your connection, proxy and HF_ENDPOINT, then retry")
    with pytest.raises(RecipeHubError, match=f"could not reach the Hub at {url} to upload me/recipes/tiny .*"
                                             "check your connection, proxy and HF_ENDPOINT"):
        recipes.push(tiny_recipe(), "me/recipes")


def test_server_error_and_missing_token(hub, cache):
    recipes.push(tiny_recipe(), "me/recipes")
    hub.state.token = "secret"
    with pytest.raises(RecipeNotFoundError, match="not found on .* \\(or it is private\\).*log in"):
        recipes.resolve("me/recipes/tiny", cache_dir=cache)
    assert recipes.resolve("me/recipes/tiny", cache_dir=cache, token="secret").name == "tiny"
    with pytest.raises(RecipeHubError, match=r"the Hub refused to upload me/recipes/other \(HTTP 401.*log in"):
        recipes.push(tiny_recipe("other"), "me/recipes")
    hub.state.token = None
    hub.state.fail_status = 500
    with pytest.raises(RecipeHubError, match=r"the Hub failed to download me/recipes/other \(HTTP 500.*retry later"):
        recipes.resolve("me/recipes/other", cache_dir=cache)
    with pytest.raises(RecipeHubError, match=r"the Hub failed to upload me/recipes/other \(HTTP 500.*retry later"):
        recipes.push(tiny_recipe("other"), "me/recipes")


# ------------------------------------------------------------------------------------- untrusted input


@pytest.mark.parametrize(
    "content, message",
    [
        (b"!!python/object/apply:os.system ['touch /tmp/litepatch-pwned']\n", "YAML tag: recipes hold plain values only"),
        (b"format_version: 1\nname: ${oc.env:HOME}\n", "contains an interpolation"),
        (b"format_version: 1\n" + b"#" * (300 * 1024), "larger than the 262144-byte limit"),
        (b"format_version: 1\nextra_code: 'import os'\n", "unknown key at the top level"),
    ],
)
def test_hub_content_is_validated_before_use(hub, cache, content, message):
    repo = hub.state.create("evil/recipes")
    repo.commits[repo.branches["main"]]["bad.yaml"] = content
    with pytest.raises(RecipeValidationError) as info:
        recipes.resolve("evil/recipes/bad", cache_dir=cache)
    assert message in str(info.value) and "bad.yaml" in str(info.value)
    assert not os.path.exists("/tmp/litepatch-pwned")


def test_hub_recipe_for_another_model_is_refused(hub, cache):
    recipes.push(recipes.resolve("wan2.1-14b-720p"), "me/recipes")
    recipe = recipes.resolve("me/recipes/wan2.1-14b-720p", cache_dir=cache)
    with pytest.raises(recipes.FingerprintMismatchError, match="attention layer count: recipe 40, model 2"):
        recipes.check_fingerprint(recipe, TINY_FP)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"repo_id": "me/recipes", "name": "../x"}, "recipe name (a string of 4 characters) contains a path"),
        ({"repo_id": "me/recipes", "name": "a\\b"}, "contains a path"),
        ({"repo_id": "me/../recipes"}, "is not of the form 'org/repo'"),
        ({"repo_id": "recipes"}, "is not of the form 'org/repo'"),
        ({"repo_id": "me/recipes", "revision": "a b"}, "is not a valid branch"),
    ],
)
def test_push_refuses_bad_names_before_any_request(hub, kwargs, message):
    with pytest.raises(RecipeValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipes.push(tiny_recipe(), **kwargs)
    assert _posts(hub) == []


def test_push_refuses_an_invalid_recipe(hub):
    with pytest.raises(RecipeValidationError, match="threshold must be <= 0"):
        recipes.push(Recipe(threshold=3.0), "me/recipes")
    with pytest.raises(RecipeValidationError, match="push expects a litepatch Recipe, got str"):
        recipes.push("wan-720p", "me/recipes")
    assert _posts(hub) == []


# ---------------------------------------------------------------------------------------- processes

PUSH = """
from litepatch import recipes
from litepatch.recipes import ModelFingerprint, Recipe
fp = ModelFingerprint("WanTransformer3DModel", 2, 2, 16, ["blocks.0.attn1", "blocks.1.attn1"])
info = recipes.push(Recipe(name="tiny", threshold=-3.0, fingerprint=fp), "me/recipes")
print(info.oid)
"""

APPLY = """
import json, sys
import litepatch
from litepatch import recipes
from litepatch.recipes import ModelFingerprint
ref = sys.argv[1]
recipe = recipes.resolve(ref)
fp = ModelFingerprint("WanTransformer3DModel", 2, 2, 16, ["blocks.0.attn1", "blocks.1.attn1"])
result = {"threshold": recipe.threshold, "hub_revision": recipe.provenance.hub_revision,
          "diffs": recipes.check_fingerprint(recipe, fp), "applied": False}
if hasattr(litepatch, "apply"):
    import torch
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                  num_layers=2, rope_max_seq_len=32)
    handle = litepatch.apply(model, recipe=ref)
    handle.remove()
    result["applied"] = True
print(json.dumps(result))
"""

RESOLVE_OFFLINE = """
import json, sys
from litepatch import recipes
print(json.dumps({"hub_revision": recipes.resolve(sys.argv[1]).provenance.hub_revision}), flush=True)
recipes.resolve(sys.argv[2])  # not cached: raises, and the process exits with its message
print("resolved")
"""
"""Resolves a cached recipe, then one that is not in the cache, in one process: the model was applied online already,
and a process without diffusers starts in half the time."""


def _run(code: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                          text=True, timeout=180)


def test_pushed_by_one_process_pulled_and_applied_by_another_offline_afterwards(tmp_path):
    with HubServer() as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LITEPATCH_"))}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"))
        pushed = _run(PUSH, env)
        assert pushed.returncode == 0, pushed.stderr
        sha = pushed.stdout.strip().splitlines()[-1]
        applied = _run(APPLY, env, "me/recipes/tiny")
        assert applied.returncode == 0, applied.stderr
        result = json.loads(applied.stdout.strip().splitlines()[-1])
        assert result["threshold"] == -3.0 and result["hub_revision"] == sha and result["diffs"] == []
        assert result["applied"] == hasattr(litepatch, "apply")
        requests = len(server.state.requests)
    # the server is gone: the cached recipe still resolves, offline, in a third process; one that is not cached fails
    offline = _run(RESOLVE_OFFLINE, {**env, "HF_HUB_OFFLINE": "1"}, "me/recipes/tiny", "me/recipes/other")
    lines = offline.stdout.strip().splitlines()
    assert lines and json.loads(lines[0])["hub_revision"] == sha, offline.stdout + offline.stderr
    assert len(server.state.requests) == requests
    assert offline.returncode != 0 and "resolved" not in lines
    assert "recipe me/recipes/other is not in the local Hugging Face cache" in offline.stderr


# ----------------------------------------------------------------------------------------------- CLI


def _cli(monkeypatch, capsys, *argv):
    import litepatch.cli as cli

    monkeypatch.setattr(cli, "COMMANDS", {"recipes": cli.COMMANDS["recipes"]})
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_list_shows_builtins_with_provenance(monkeypatch, capsys):
    code, out, _ = _cli(monkeypatch, capsys, "recipes", "list")
    assert code == 0
    assert "wan2.1-14b-720p (alias: wan-720p)" in out and "wan2.1-1.3b-480p (alias: wan-480p)" in out
    assert "WanTransformer3DModel (30 layers, 12 heads, d=128)" in out
    assert "provenance: published-defaults" in out and "threshold -10.0 from" in out


def test_cli_show_pull_push(hub, monkeypatch, capsys, tmp_path):
    path = recipes.save(tiny_recipe(), tmp_path / "tiny.yaml")
    code, out, _ = _cli(monkeypatch, capsys, "recipes", "push", str(path), "me/recipes", "-m", "from cli")
    assert code == 0
    sha = hub.state.repos["me/recipes"].branches["main"]
    assert f'(pinned: "me/recipes/tiny@{sha}")' in out
    code, out, _ = _cli(monkeypatch, capsys, "recipes", "pull", "me/recipes/tiny")
    assert code == 0 and out.splitlines()[0].endswith(f"{sha}/tiny.yaml")
    code, out, _ = _cli(monkeypatch, capsys, "recipes", "show", "me/recipes/tiny", "--offline")
    assert code == 0 and out.startswith(f"# me/recipes/tiny at commit {sha}\nformat_version: 1\n")
    code, out, _ = _cli(monkeypatch, capsys, "recipes", "show", "wan-720p")
    assert code == 0 and "name: wan2.1-14b-720p" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "missing.yaml"], "recipe file 'missing.yaml' does not exist; check the path"),
        (["show", "me/nothing/x"], "Hub repository 'me/nothing' not found"),
        (["pull", "me/recipes/x", "--offline"], "is not in the local Hugging Face cache"),
        (["push", "wan-720p", "bad/../repo"], "is not of the form 'org/repo'"),
    ],
)
def test_cli_errors_are_one_line_exit_2(hub, monkeypatch, capsys, argv, message):
    code, out, err = _cli(monkeypatch, capsys, "recipes", *argv)
    assert code == 2
    assert err.startswith("litepatch recipes: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("action", ["list", "show", "pull", "push"])
def test_cli_help(monkeypatch, capsys, action):
    with pytest.raises(SystemExit) as info:
        _cli(monkeypatch, capsys, "recipes", action, "--help")
    assert info.value.code == 0
    assert f"usage: litepatch recipes {action}" in capsys.readouterr().out
