"""Hostile and careless recipe files: every one ends in a valid recipe or one clear error naming the file
and the problem, read under the limits of ``litepatch.recipes.untrusted``, and no message quotes the
file's content (a recipe path that points at a credentials file must not put the secret in a log)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from litepatch import recipes
from litepatch.recipes import RecipeError, RecipeNotFoundError, RecipeValidationError
from litepatch.recipes.untrusted import MAX_DEPTH, MAX_NUMBER_CHARS, MAX_RECIPE_BYTES

HEADER = "format_version: 1\nname: hostile\n"
SECRET = "hf_SeCrEtToKeN0123456789abcdefXYZ"

# the shapes credentials files have: a bare token, .netrc, .env, git-credentials, a YAML config
SECRET_FILES = {
    "token": f"{SECRET}\n",
    "netrc": f"machine huggingface.co login me password {SECRET}\n",
    "env": f"HF_TOKEN={SECRET}\n",
    "git-credentials": f"https://me:{SECRET}@github.com\n",
    "yaml-mapping": f"github.com:\n  oauth_token: {SECRET}\n",
    "yaml-key": f"{SECRET}: 1\n",
    "recipe-shaped": f"format_version: 1\n{SECRET}: true\n",
    "wrong-type": f"format_version: 1\nthreshold: {SECRET}\n",
    "list": f"- {SECRET}\n",
}


def _load_error(path: os.PathLike | str, **kwargs) -> str:
    with pytest.raises(RecipeError) as info:
        recipes.load(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _loads_error(text: str | bytes) -> str:
    with pytest.raises(RecipeValidationError) as info:
        recipes.loads(text, source="hostile.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("hostile.yaml: "), message
    return message


# ------------------------------------------------------------------------------------- links and files


@pytest.mark.parametrize("kind", sorted(SECRET_FILES))
def test_link_to_a_secret_outside_the_folder_is_refused_unread(tmp_path, kind):
    home = tmp_path / "home"
    home.mkdir()
    secret = home / ".netrc"
    secret.write_text(SECRET_FILES[kind])
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "mine.yaml").symlink_to(secret)
    message = _load_error(folder / "mine.yaml")
    assert "symbolic link to a file outside its folder" in message and "mine.yaml" in message
    assert SECRET not in message and "hf_" not in message
    with pytest.raises(RecipeValidationError, match="outside its folder"):
        recipes.resolve(str(folder / "mine.yaml"))


@pytest.mark.parametrize("kind", sorted(SECRET_FILES))
def test_secret_content_never_appears_in_the_message(tmp_path, kind):
    path = tmp_path / "copied.yaml"
    path.write_text(SECRET_FILES[kind])
    message = _load_error(path)
    assert "copied.yaml" in message
    assert SECRET not in message and "SeCrEt" not in message and "hf_" not in message


def test_cli_show_of_a_linked_secret_prints_no_content(tmp_path):
    secret = tmp_path / "token"
    secret.write_text(SECRET)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x.yaml").symlink_to(secret)
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from litepatch.cli import main; sys.exit(main())", "recipes", "show",
         str(tmp_path / "r" / "x.yaml")], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "outside its folder" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_links_inside_the_folder_are_followed(tmp_path):
    (tmp_path / "real.yaml").write_text(HEADER + "threshold: -5.0\n")
    (tmp_path / "alias.yaml").symlink_to("real.yaml")
    assert recipes.load(tmp_path / "alias.yaml").threshold == -5.0


def test_a_chain_of_links_that_ends_outside_is_refused(tmp_path):
    outside = tmp_path / "outside.yaml"
    outside.write_text(HEADER)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "hop.yaml").symlink_to(outside)
    (folder / "start.yaml").symlink_to("hop.yaml")
    assert "outside its folder" in _load_error(folder / "start.yaml")


def test_an_explicit_root_confines_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.yaml").write_text(HEADER)
    assert recipes.load(tmp_path / "sub" / "r.yaml", root=tmp_path).name == "hostile"
    assert "outside its folder" in _load_error(tmp_path / "sub" / "r.yaml", root=tmp_path / "other")


def test_broken_link_and_missing_file(tmp_path):
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(RecipeNotFoundError, match="broken symbolic link"):
        recipes.load(tmp_path / "dangling.yaml")
    with pytest.raises(RecipeNotFoundError, match="does not exist"):
        recipes.load(tmp_path / "nothing.yaml")


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(_load_error(fifo)), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "reading a FIFO recipe blocked"
    assert "is a FIFO (named pipe), not a regular file" in errors[0]


@pytest.mark.parametrize("device, kind", [("/dev/null", "character device"), ("/dev/zero", "character device")])
def test_devices_are_refused(device, kind):
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist here")
    assert f"is a {kind}, not a regular file" in _load_error(device)


def test_a_link_to_a_device_is_refused(tmp_path):
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    assert "outside its folder" in _load_error(tmp_path / "zero.yaml")


def test_directory_is_not_a_recipe(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(RecipeNotFoundError, match="is a directory, not a regular file"):
        recipes.load(tmp_path / "dir.yaml")


def test_unix_socket_is_refused(tmp_path):
    import socket

    path = tmp_path / "s.yaml"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        assert "not a regular file" in _load_error(path)


@pytest.mark.parametrize("size", [MAX_RECIPE_BYTES + 1, 8 * MAX_RECIPE_BYTES])
def test_oversized_files_are_refused_before_parsing(tmp_path, size):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.write(HEADER.encode() + b"#" * (size - len(HEADER)))
    assert f"{size} bytes is larger than the {MAX_RECIPE_BYTES}-byte limit" in _load_error(path)
    assert "larger than" in _loads_error(b"#" * size)


# ------------------------------------------------------------------------------------- YAML structure


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 10_000 + "]" * 10_000 + "\n",
        "a: " + "{b: " * 5_000 + "1" + "}" * 5_000 + "\n",
        "x:\n" + "".join("  " * i + "- \n" for i in range(1, 40)),
        "a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n",
    ],
    ids=["lists-10k", "mappings-5k", "block-lists", "one-past-the-limit"],
)
def test_deep_nesting_is_refused(text):
    message = _loads_error(text)
    assert f"nested deeper than {MAX_DEPTH} levels" in message


def test_nesting_at_the_limit_reaches_the_schema_check():
    text = HEADER + "description: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"
    assert "description: expected string, got a list of 1 item" in _loads_error(text)


@pytest.mark.parametrize(
    "literal",
    ["9" * 5_000, "-" + "1" * 100_000, "0." + "3" * 1_000, "1" * (MAX_NUMBER_CHARS + 1), "0x" + "f" * 60,
     "1" + "_0" * 40],
    ids=["int-5k", "int-100k", "float-1k", "one-past-the-limit", "hex", "underscores"],
)
def test_over_long_numbers_are_refused(literal):
    message = _loads_error(HEADER + f"warmup_steps: {literal}\n")
    assert "line 3: a number of" in message and f"(at most {MAX_NUMBER_CHARS})" in message
    assert literal[:12] not in message


def test_extreme_but_short_numbers_are_validated():
    assert recipes.loads(HEADER + "threshold: -1.0e+400\n").threshold == float("-inf")
    assert "threshold must be <= 0" in _loads_error(HEADER + "threshold: 1.0e+400\n")
    assert "warmup_steps must be >= 0" in _loads_error(HEADER + "warmup_steps: -99999999999999999999\n")


@pytest.mark.parametrize(
    "value",
    ["!!python/object/apply:os.system ['touch {marker}']", "!!python/name:os.system", "!!binary aGk=",
     "!!set {a, b}", "!!omap [{a: 1}]", "!custom x", "!!str hostile", "!<tag:yaml.org,2002:str> x",
     "!!timestamp 2001-12-14"],
)
def test_tags_of_any_kind_are_refused_and_nothing_runs(tmp_path, value):
    marker = tmp_path / "pwned"
    message = _loads_error(HEADER.replace("name: hostile", "name: " + value.replace("{marker}", str(marker))))
    assert "line 2: YAML tag: recipes hold plain values only" in message
    assert not marker.exists()


def test_tag_on_the_document_itself_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    assert "YAML tag" in _loads_error(f"!!python/object/apply:os.system ['touch {marker}']\n")
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, problem",
    [
        ('a: &a ["lol","lol"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n',
         "line 1: YAML anchor"),
        (HEADER + "description: &x hello\n", "line 3: YAML anchor"),
        (HEADER + "description: *nowhere\n", "line 3: YAML alias"),
        (HEADER + "<<: {threshold: -3.0}\n", "line 3: merge key '<<'"),
        (HEADER + "context:\n  <<: {steps: 3}\n", "line 4: merge key '<<'"),
        (HEADER + "threshold: -1\nthreshold: -2\n", "line 4: duplicate key"),
        (HEADER + "? [a, b]\n: 1\n", "line 3: a key that is a list or mapping"),
        (HEADER + "---\nname: second\n", "but found another document at line 3"),
    ],
    ids=["billion-laughs", "anchor", "alias", "merge", "nested-merge", "duplicate", "unhashable-key", "two-docs"],
)
def test_yaml_features_that_recipes_do_not_use(text, problem):
    assert problem in _loads_error(text)


@pytest.mark.parametrize(
    "text, shape",
    [
        ("", "got null"),
        ("- a\n- b\n", "got a list of 2 items"),
        (f"{SECRET}\n", "got a string of 33 characters"),
        ("12345678\n", "got an int"),
        ("true\n", "got true/false"),
    ],
)
def test_top_level_that_is_not_a_mapping_is_described_not_quoted(text, shape):
    message = _loads_error(text)
    assert "a recipe is a YAML mapping" in message and shape in message
    assert SECRET not in message and "12345678" not in message


@pytest.mark.parametrize(
    "text, problem",
    [
        (HEADER + "1: x\n", "unknown key at the top level: an int"),
        (HEADER + "true: x\n", "unknown key at the top level: true/false"),
        (HEADER + "k" * 1_000 + ": 1\n", "unknown key at the top level: a string of 1000 characters"),
        (HEADER + "k" * 100_000 + ": 1\n", "could not find expected '...' at line 3"),
        (HEADER + "treshold: -3\n", "(did you mean 'threshold'?)"),
        (HEADER + "description: 2024-01-01\n", "description: expected string, got a date"),
        (HEADER + "description: ${oc.env:HOME}\n", "description: contains an interpolation"),
        (HEADER.replace("hostile", "../../etc/passwd"), "recipe name (a string of 16 characters) contains a path"),
        (HEADER.replace("hostile", "'C:\\\\Windows'"), "contains a path"),
        (HEADER + "layers: {'*': {dense: true, extra: 1}}\n", "unknown key in layers.*: a string of 5 characters"),
    ],
    ids=["int-key", "bool-key", "long-key", "huge-key", "typo", "timestamp", "interpolation", "traversal", "windows", "nested"],
)
def test_keys_and_values_are_named_by_type_and_length(text, problem):
    message = _loads_error(text)
    assert problem in message
    assert "kkkkkkkk" not in message and os.environ.get("HOME", "/root") not in message


# ------------------------------------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    "data, problem",
    [
        (HEADER.encode("utf-16"), "UTF-16 or UTF-32"),
        (HEADER.encode("utf-16-le"), "UTF-16 or UTF-32"),
        (HEADER.encode("utf-32"), "UTF-16 or UTF-32"),
        (HEADER.encode() + "description: café\n".encode("latin-1"), "not UTF-8 text (invalid byte at offset"),
        (HEADER.encode() + b"description: a\x00b\n", "a control character (#x0000) at character 46"),
        (HEADER.encode() + b"description: \x1b[31mred\n", "a control character (#x001b)"),
        (HEADER.encode() + b"description: \xed\xa0\x80\n", "not UTF-8 text"),  # a UTF-8-encoded surrogate
    ],
    ids=["utf16-bom", "utf16-le", "utf32", "latin1", "nul", "escape", "surrogate"],
)
def test_encodings_other_than_utf8_are_named(data, problem):
    message = _loads_error(data)
    assert problem in message and "caf" not in message and "red" not in message


def test_utf8_with_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + HEADER.encode() + "description: café ✓\n".encode())
    assert recipes.load(path).description == "café ✓"


def test_crlf_line_endings_are_accepted():
    assert recipes.loads(HEADER.replace("\n", "\r\n")).name == "hostile"


# ------------------------------------------------------------------------------------- refs and names


@pytest.mark.parametrize(
    "ref",
    ["../../etc/passwd", "/etc/passwd", "~/.netrc", "org/../secret", "org/repo/..", "org/repo/../../x",
     "a\\b\\c", "org/repo/name@../../main", "org/repo/na me", "org/re po/name"],
)
def test_references_cannot_name_paths_outside(ref, tmp_path, monkeypatch):
    from litepatch.recipes import hub

    monkeypatch.setattr(hub, "pull", lambda *a, **k: pytest.fail(f"{ref!r} reached the Hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        recipes.resolve(ref)
    assert "\n" not in str(info.value)
    assert "root:" not in str(info.value)  # /etc/passwd is never parsed as a recipe body


def test_save_then_load_round_trips_through_the_same_limits(tmp_path):
    recipe = recipes.loads(HEADER + "threshold: -7.5\nlayers: {'blocks.0.*': {dense: true}}\n")
    path = recipes.save(recipe, tmp_path / "out.yaml")
    assert recipes.load(path) == recipe
    assert Path(path).stat().st_size < MAX_RECIPE_BYTES
