"""The one reader of untrusted recipe bytes, from disk and from the Hub cache: recipes are data.

Everything a recipe file can do to its reader is bounded here, before any schema check:

* **the file**: a regular file only (FIFOs, devices, sockets and directories are refused without
  blocking on them), at most :data:`MAX_RECIPE_BYTES`, and, when it is a symbolic link, one whose
  target stays inside the folder it is read from (``root``: the recipe's own folder on disk, the
  repository's folder of the huggingface_hub cache for pulled recipes). A link to ``~/.netrc`` or
  ``~/.cache/huggingface/token`` is refused by name, never read.
* **the text**: UTF-8 (an optional byte-order mark is allowed; UTF-16/32 are named as such).
* **the YAML**: a safe loader that refuses tags (``!!python/...``, ``!!binary``, any ``!tag``),
  anchors and aliases, merge keys (``<<``), duplicate keys, nesting deeper than
  :data:`MAX_DEPTH` levels and numbers longer than :data:`MAX_NUMBER_CHARS` characters.

Error messages name the source, the line and the problem, and describe values by their type and
length only: a recipe path that turns out to be a secret file never gets its content into a log.

Example:
    >>> parse_yaml(b"format_version: 1\\nname: mine\\n", "r.yaml")
    {'format_version': 1, 'name': 'mine'}
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import yaml

from .errors import RecipeNotFoundError, RecipeValidationError

MAX_RECIPE_BYTES = 256 * 1024
"""Recipe files larger than this are refused before they are parsed."""

MAX_DEPTH = 16
"""Deepest nesting of mappings and lists in a recipe (a valid one needs 4)."""

MAX_NUMBER_CHARS = 40
"""Longest number literal in a recipe, in characters (a float needs at most ~25)."""

_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def read_untrusted_file(path: str | os.PathLike, *, root: str | os.PathLike | None = None) -> bytes:
    """The bytes of a recipe file, read under the limits of the module docstring.

    Args:
        path: the file (``~`` is expanded).
        root: the folder that the file and every link on the way must stay in; defaults to the
            folder ``path`` names (not its link target).

    Raises:
        RecipeNotFoundError: no such file.
        RecipeValidationError: a link out of ``root``, a special file or directory, or too large.
    """
    path = Path(path).expanduser()
    shown = str(path)
    if not os.path.lexists(path):
        raise RecipeNotFoundError(f"recipe file {shown!r} does not exist; check the path")
    root_real = os.path.realpath(root if root is not None else path.absolute().parent)
    real = os.path.realpath(path)
    if not _inside(real, root_real):
        raise RecipeValidationError(
            f"recipe file {shown!r} is a symbolic link to a file outside its folder {root_real!r}; recipes are "
            "not read through links that leave their folder: copy the file there instead"
        )
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise RecipeNotFoundError(f"recipe file {shown!r} is a broken symbolic link; check the path") from None
    except OSError as err:
        if err.errno == errno.ENXIO:  # a socket, or a FIFO without a writer on some systems
            raise RecipeValidationError(f"recipe path {shown!r} is not a regular file; pass the .yaml file") from None
        raise RecipeValidationError(f"recipe file {shown!r} cannot be read: {err.strerror}") from None
    _require_regular(fd, shown)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeValidationError(_too_large(shown, size))
        raw = f.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:  # it grew while being read
        raise RecipeValidationError(_too_large(shown, len(raw)))
    return raw


def _require_regular(fd: int, shown: str) -> None:
    """Returns for a regular file; else closes ``fd`` and raises naming what the path is."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise RecipeNotFoundError(f"recipe path {shown!r} is a directory, not a regular file; pass the .yaml file itself")
    raise RecipeValidationError(
        f"recipe path {shown!r} is {_file_kind(mode)}, not a regular file; pass the .yaml file itself"
    )


def _too_large(source: str, size: int) -> str:
    return (
        f"{source}: {size} bytes is larger than the {MAX_RECIPE_BYTES}-byte limit for recipes; "
        "a recipe is a small YAML file, check that this is the right file"
    )


def decode_text(raw: bytes, source: str) -> str:
    """UTF-8 text of ``raw`` (a leading byte-order mark is dropped); UTF-16/32 and bad bytes are named."""
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeValidationError(_too_large(source, len(raw)))
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(raw) >= 2 and b"\x00" in raw[:4]):
        raise RecipeValidationError(
            f"{source}: the text is UTF-16 or UTF-32 (NUL bytes near its start); save the recipe as UTF-8"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecipeValidationError(
            f"{source}: not UTF-8 text (invalid byte at offset {err.start}); a recipe is a UTF-8 YAML text file"
        ) from None


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses tags, anchors, aliases, merge keys, duplicate keys, deep nesting and
    over-long numbers; its messages never quote the document."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.depth = 0

    def _fail(self, mark, problem: str) -> RecipeValidationError:
        return RecipeValidationError(f"{self.source}: line {mark.line + 1}: {problem}")

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 (PyYAML signature)
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise self._fail(event.start_mark, "YAML alias: recipes do not use anchors or aliases; write the values out")
        if getattr(event, "anchor", None) is not None:
            raise self._fail(event.start_mark, "YAML anchor: recipes do not use anchors or aliases; write the values out")
        tag = getattr(event, "tag", None)
        if tag is not None:  # implicit (resolved) scalars carry none; any written tag is refused
            raise self._fail(event.start_mark, "YAML tag: recipes hold plain values only (no '!tag' of any kind)")
        nested = isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
        if nested:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self._fail(event.start_mark, f"nested deeper than {MAX_DEPTH} levels; a recipe needs 4")
        try:
            return super().compose_node(parent, index)
        finally:
            if nested:
                self.depth -= 1

    def construct_scalar(self, node):  # noqa: ANN001, ANN201
        if node.tag in (_INT_TAG, _FLOAT_TAG) and len(node.value) > MAX_NUMBER_CHARS:
            raise self._fail(
                node.start_mark, f"a number of {len(node.value)} characters (at most {MAX_NUMBER_CHARS})"
            )
        return super().construct_scalar(node)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                raise self._fail(key_node.start_mark, "merge key '<<': recipes write every key out")
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key (a list or mapping)
                raise self._fail(key_node.start_mark, "a key that is a list or mapping; keys are names") from None
            if duplicate:
                raise self._fail(key_node.start_mark, "duplicate key; keep only one")
        return super().construct_mapping(node, deep=deep)


def parse_yaml(raw: str | bytes, source: str) -> object:
    """The data of one YAML document under the limits of the module docstring.

    Raises:
        RecipeValidationError: naming ``source``, the line and the problem, never quoting the text.
    """
    data = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
    text = decode_text(data, source)
    try:
        loader = _RecipeLoader(text, source)  # the reader refuses control characters here
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except RecursionError:
        raise RecipeValidationError(f"{source}: nested too deeply to read; a recipe needs 4 levels") from None
    except yaml.YAMLError as err:
        raise RecipeValidationError(f"{source}: not a valid recipe YAML file (safe YAML only): {_yaml_problem(err)}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's problem and position without its snippet of the document (quoted parts masked)."""
    if isinstance(err, yaml.reader.ReaderError):
        return f"a control character (#x{err.character:04x}) at character {err.position}; recipes are plain text"
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or type(err).__name__
    problem = _QUOTED.sub("'...'", str(problem))
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem
