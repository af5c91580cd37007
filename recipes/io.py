"""Recipes as text and files: safe loading, saving.

A recipe is data, never code. :func:`loads` parses YAML with a safe loader that also refuses
aliases and duplicate keys, refuses files over :data:`MAX_RECIPE_BYTES` before parsing, refuses
OmegaConf interpolations (``${...}``) instead of evaluating them, checks every key and type
against the :class:`~litepatch.recipes.schema.Recipe` dataclasses (strictly: ``"5"`` is not an
integer; :mod:`.structure`), then builds the OmegaConf structured config and validates the values
(:mod:`.validation`).

Example:
    >>> recipe = loads("format_version: 1\\nname: mine\\nthreshold: -6.0\\n")
    >>> save(recipe, "mine.yaml"); load("mine.yaml") == recipe
    True
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .errors import RecipeValidationError
from .schema import FORMAT_VERSION, Recipe, describe_value
from .structure import check_structure
from .untrusted import MAX_RECIPE_BYTES, parse_yaml, read_untrusted_file
from .validation import check_format_version, validate


def loads(text: str | bytes, *, source: str = "<string>") -> Recipe:
    """Parses and validates a recipe from YAML text.

    Args:
        text (`str` or `bytes`): the YAML document, at most :data:`MAX_RECIPE_BYTES` bytes.
        source (`str`, defaults to ``"<string>"``): where it came from, used in error messages.

    Raises:
        RecipeValidationError: unsafe or malformed YAML, unknown keys, wrong types or bad values.

    Example:
        >>> recipe = loads("format_version: 1\\nname: mine\\nthreshold: -6.0\\nwarmup_steps: 4\\n")
        >>> recipe.threshold_for("blocks.0.attn1", step=10)
        -6.0
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    data = parse_yaml(text, source)
    if not isinstance(data, Mapping):
        raise RecipeValidationError(
            f"{source}: a recipe is a YAML mapping (key: value lines), got {describe_value(data)}"
        )
    try:
        check_structure(data, Recipe)
    except RecipeValidationError as err:
        raise RecipeValidationError(f"{source}: {err}") from None
    version = data.get("format_version")
    if version is None:
        raise RecipeValidationError(
            f"{source}: missing 'format_version'; add 'format_version: {FORMAT_VERSION}' as the first line"
        )
    check_format_version(version, source)
    try:
        config = OmegaConf.merge(OmegaConf.structured(Recipe), data)
        recipe = OmegaConf.to_object(config)
    except OmegaConfBaseException as err:  # the strict check above should have caught it; keep it one line
        key = getattr(err, "full_key", None) or "?"
        message = str(err).splitlines()[0]
        raise RecipeValidationError(f"{source}: {key}: {message}") from None
    return validate(recipe, source=source)


def load(path: str | os.PathLike, *, root: str | os.PathLike | None = None) -> Recipe:
    """Reads and validates a recipe YAML file (through :func:`~litepatch.recipes.untrusted.read_untrusted_file`).

    Args:
        path: the recipe file.
        root (*optional*): the folder the file (and any symbolic link to it) must stay in; defaults to
            the folder that ``path`` names. A link out of it, a FIFO, a device or a directory is refused.

    Raises:
        RecipeNotFoundError: no such file.
        RecipeValidationError: see :func:`loads`, and links out of ``root`` or special files.

    Example:
        >>> recipe = load("my-recipe.yaml")  # doctest: +SKIP
    """
    path = Path(path).expanduser()
    raw = read_untrusted_file(path, root=root)
    return loads(raw, source=str(path))


def dumps(recipe: Recipe) -> str:
    """The YAML text of a recipe (validated first). ``-inf`` thresholds are written as ``-.inf``.

    Example:
        >>> text = dumps(Recipe(name="mine", threshold=-6.0))
        >>> loads(text).threshold
        -6.0
    """
    from omegaconf import OmegaConf

    validate(recipe)
    return OmegaConf.to_yaml(OmegaConf.structured(recipe), sort_keys=False)


def save(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Validates ``recipe`` and writes it as YAML to ``path`` (atomically); returns the path.

    Example:
        >>> save(Recipe(name="mine", threshold=-6.0), "mine.yaml")  # doctest: +SKIP
    """
    text = dumps(recipe)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


__all__ = ["MAX_RECIPE_BYTES", "dumps", "load", "loads", "save"]
