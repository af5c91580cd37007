"""Validation of recipe values (types, names, thresholds, ranges, consistency of the fingerprint).

:func:`validate` is the one door every recipe goes through: files (:func:`~litepatch.recipes.loads`), objects
passed to ``litepatch.apply``, keyword overrides and ``LiteHandle.configure``.

Example:
    >>> validate(Recipe(name="mine", threshold=-6.0)).name
    'mine'
"""

from __future__ import annotations

import os
import re

from .errors import RecipeValidationError
from .fingerprint import pattern_problem
from .schema import CFG_MODES, FORMAT_VERSION, ORDERS, SOURCES, Recipe, describe_value, threshold_problem
from .structure import as_plain, check_structure

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: object, what: str = "recipe name") -> str:
    """Returns ``name`` if it is a safe file name (letters, digits, ``.``, ``_``, ``-``; no path parts)."""
    if not isinstance(name, str):
        raise RecipeValidationError(f"{what} must be a string, got {describe_value(name)}")
    if "/" in name or "\\" in name or ".." in name or os.path.isabs(name):
        raise RecipeValidationError(
            f"{what} ({describe_value(name)}) contains a path ('/', '\\', '..' or an absolute path); "
            "use a plain name such as 'wan2.1-14b-720p'"
        )
    if not NAME_PATTERN.match(name):
        raise RecipeValidationError(
            f"{what} ({describe_value(name)}) is not a valid name; use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_format_version(version: int, source: str) -> None:
    if version > FORMAT_VERSION:
        raise RecipeValidationError(
            f"{source}: format_version {version} is newer than this litepatch reads ({FORMAT_VERSION}); "
            "upgrade litepatch (pip install -U litepatch)"
        )
    if version < 1:
        raise RecipeValidationError(f"{source}: format_version must be >= 1, got {version}")


def _check_thresholds(fail, threshold, schedule, prefix: str) -> None:
    """Raises ``fail(message)`` for the first bad one of ``threshold`` (``None``: unset) and ``schedule``."""
    values = ([(threshold, f"{prefix}threshold")] if threshold is not None else [])
    values += [(value, f"{prefix}schedule[{i}]") for i, value in enumerate(schedule)]
    for value, path in values:
        problem = threshold_problem(value, path)
        if problem:
            raise fail(problem)


def validate(recipe: Recipe, *, source: str | None = None) -> Recipe:
    """Checks the values of a recipe object; returns it unchanged or raises :class:`RecipeValidationError`.

    Checked: the types (as in :func:`loads`), ``format_version``, the name, every threshold (the rule
    of :func:`~litepatch.recipes.schema.threshold_problem`: a number <= 0 or ``-inf``), ``warmup_steps >= 0``,
    ``order``, context values, the fingerprint's consistency, and that every ``layers`` pattern matches a
    layer of the fingerprint (when it lists layer names). ``litepatch.apply`` and ``LiteHandle.configure``
    validate through this function, keyword overrides included.

    Example:
        >>> validate(Recipe(name="mine", threshold=-6.0)).name
        'mine'
    """
    prefix = f"{source}: " if source else ""

    def fail(message: str) -> RecipeValidationError:
        return RecipeValidationError(prefix + message)

    if not isinstance(recipe, Recipe):
        raise fail(f"expected a litepatch Recipe, got {type(recipe).__name__}")
    try:
        check_structure(as_plain(recipe), Recipe)
        check_format_version(recipe.format_version, source or "recipe")
        check_name(recipe.name)
    except RecipeValidationError as err:
        raise fail(str(err)) from None
    _check_thresholds(fail, recipe.threshold, recipe.schedule, "")
    if recipe.warmup_steps < 0:
        raise fail(f"warmup_steps must be >= 0 (dense steps at the start of each generation), got {recipe.warmup_steps}")
    if recipe.order not in ORDERS:
        raise fail(f"order must be one of {', '.join(ORDERS)}, got {describe_value(recipe.order)}")
    for pattern, setting in recipe.layers.items():
        if not pattern:
            raise fail("layers: empty pattern; use a module name or an fnmatch pattern such as 'blocks.0.*'")
        _check_thresholds(fail, setting.threshold, setting.schedule, f"layers.{pattern}.")
    context = recipe.context
    for key in ("frames", "steps"):
        value = getattr(context, key)
        if value is not None and value < 1:
            raise fail(f"context.{key} must be >= 1 or null, got {value}")
    if context.cfg_mode is not None and context.cfg_mode not in CFG_MODES:
        raise fail(f"context.cfg_mode must be one of {', '.join(CFG_MODES)} or null, got {describe_value(context.cfg_mode)}")
    if recipe.provenance.source not in SOURCES:
        raise fail(f"provenance.source must be one of {', '.join(SOURCES)}, got {describe_value(recipe.provenance.source)}")
    measured = recipe.measured
    if measured.kept_fraction is not None and not 0.0 <= measured.kept_fraction <= 1.0:
        raise fail(f"measured.kept_fraction must be in [0, 1], got {measured.kept_fraction}")
    if measured.speedup is not None and not measured.speedup > 0:
        raise fail(f"measured.speedup must be > 0, got {measured.speedup}")
    fp = recipe.fingerprint
    if fp is not None:
        for key in ("num_layers", "heads", "head_dim"):
            if getattr(fp, key) < 0:
                raise fail(f"fingerprint.{key} must be >= 0 (0: not recorded), got {getattr(fp, key)}")
        duplicates = sorted({n for n in fp.layer_names if fp.layer_names.count(n) > 1})
        if duplicates:
            raise fail(f"fingerprint.layer_names lists {', '.join(duplicates)} more than once")
        if fp.layer_names and fp.num_layers and len(fp.layer_names) != fp.num_layers:
            raise fail(
                f"fingerprint.num_layers is {fp.num_layers} but layer_names lists {len(fp.layer_names)} layers; "
                "make them agree"
            )
        problem = pattern_problem(recipe, fp.layer_names, "layer of the fingerprint")
        if problem:
            raise fail(f"{problem}; fix the pattern or remove it")
    return recipe
