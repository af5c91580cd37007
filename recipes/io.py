"""Recipes on disk: safe loading, validation, saving, built-in names, resolution and fingerprints.

A recipe is data, never code. :func:`loads` parses YAML with a safe loader that also refuses
aliases and duplicate keys, refuses files over :data:`MAX_RECIPE_BYTES` before parsing, refuses
OmegaConf interpolations (``${...}``) instead of evaluating them, checks every key and type
against the :class:`~litepatch.recipes.schema.Recipe` dataclasses (strictly: ``"5"`` is not an
integer), then builds the OmegaConf structured config and validates the values.

Resolution order of :func:`resolve` (first match wins):

1. a :class:`Recipe` object: validated and returned as is;
2. a local file: an existing path, or any string that looks like one (ends in ``.yaml``/``.yml``,
   starts with ``./``, ``../``, ``/`` or ``~``); a missing file is an error, never a Hub lookup;
3. a built-in name or alias (``litepatch recipes list``), e.g. ``"wan-720p"``;
4. a Hub reference ``"org/repo/name[@revision]"``: the file ``name.yaml`` of that Hub repository;
5. any other short name (``"name[@revision]"``): ``name.yaml`` in the default Hub repository,
   ``recipes_repo=`` or the ``LITEPATCH_RECIPES_REPO`` environment variable or
   :data:`DEFAULT_RECIPES_REPO`.

Hub lookups follow huggingface_hub: the cache directory, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, tokens
and revisions; the resolved commit is stored in ``recipe.provenance.hub_revision``.

Example:
    >>> from litepatch.recipes import resolve, check_fingerprint
    >>> recipe = resolve("wan-720p")
    >>> recipe.name, recipe.threshold
    ('wan2.1-14b-720p', -10.0)
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .errors import FingerprintMismatchError, RecipeNotFoundError, RecipeValidationError
from .schema import (
    CFG_MODES,
    FORMAT_VERSION,
    ORDERS,
    SOURCES,
    Context,
    LayerSetting,
    Measured,
    ModelFingerprint,
    Provenance,
    Recipe,
    describe_value,
    threshold_problem,
)
from .untrusted import MAX_RECIPE_BYTES, parse_yaml, read_untrusted_file

DEFAULT_RECIPES_REPO = "litepatch/recipes"
"""Hub repository searched for short names that are not built in (env ``LITEPATCH_RECIPES_REPO``)."""

RECIPES_REPO_ENV = "LITEPATCH_RECIPES_REPO"

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"

# alias -> canonical built-in names; with several, resolve(..., fingerprint=) picks the one that fits the model.
BUILTIN_ALIASES: dict[str, tuple[str, ...]] = {
    "wan-720p": ("wan2.1-14b-720p",),
    "wan-480p": ("wan2.1-14b-480p", "wan2.1-1.3b-480p"),
}

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --------------------------------------------------------------------------------------------- names


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


# ------------------------------------------------------------------------------------------ parsing


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of name -> {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _unknown_key(key: object, allowed: Mapping[str, Any], path: str) -> str:
    """The message for a key that the schema does not have; the key itself is described, never quoted
    (a recipe path may be a secret file by mistake), with the allowed key it most resembles."""
    import difflib

    where = f"in {path}" if path != "<recipe>" else "at the top level"
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6) if isinstance(key, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {where}: {describe_value(key)}{hint}; allowed keys: {', '.join(allowed)}"


def _check_value(value: Any, tp: Any, path: str) -> None:
    """Strict structural check of YAML data against a schema type; raises naming the path."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return
        (inner,) = [a for a in args if a is not type(None)]
        _check_value(value, inner, path)
        return
    wrong = RecipeValidationError(f"{path}: expected {_type_name(tp)}, got {describe_value(value)}")
    if isinstance(value, str) and "${" in value:
        raise RecipeValidationError(
            f"{path}: contains an interpolation '${{...}}'; recipes are data only, write the value itself"
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise wrong
        hints = _field_types(tp)
        for key, item in value.items():
            if key not in hints:
                raise RecipeValidationError(_unknown_key(key, hints, path))
            _check_value(item, hints[key], key if path == "<recipe>" else f"{path}.{key}")
    elif origin is list:
        if not isinstance(value, list):
            raise wrong
        (inner,) = typing.get_args(tp)
        for i, item in enumerate(value):
            _check_value(item, inner, f"{path}[{i}]")
    elif origin is dict:
        if not isinstance(value, Mapping):
            raise wrong
        _, inner = typing.get_args(tp)
        for key, item in value.items():
            if not isinstance(key, str):
                raise RecipeValidationError(f"{path}: keys must be strings, got {describe_value(key)}")
            if "${" in key:
                raise RecipeValidationError(f"{path}: a key contains an interpolation '${{...}}'")
            _check_value(item, inner, f"{path}.{key}")
    elif tp is bool:
        if not isinstance(value, bool):
            raise wrong
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
    elif tp is str:
        if not isinstance(value, str):
            raise wrong
    else:  # pragma: no cover - the schema uses only the types above
        raise TypeError(f"unsupported schema type {tp!r} at {path}")


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
        _check_value(data, Recipe, "<recipe>")
    except RecipeValidationError as err:
        raise RecipeValidationError(f"{source}: {err}") from None
    version = data.get("format_version")
    if version is None:
        raise RecipeValidationError(
            f"{source}: missing 'format_version'; add 'format_version: {FORMAT_VERSION}' as the first line"
        )
    _check_format_version(version, source)
    try:
        config = OmegaConf.merge(OmegaConf.structured(Recipe), data)
        recipe = OmegaConf.to_object(config)
    except OmegaConfBaseException as err:  # the strict check above should have caught it; keep it one line
        key = getattr(err, "full_key", None) or "?"
        message = str(err).splitlines()[0]
        raise RecipeValidationError(f"{source}: {key}: {message}") from None
    return validate(recipe, source=source)


def _check_format_version(version: int, source: str) -> None:
    if version > FORMAT_VERSION:
        raise RecipeValidationError(
            f"{source}: format_version {version} is newer than this litepatch reads ({FORMAT_VERSION}); "
            "upgrade litepatch (pip install -U litepatch)"
        )
    if version < 1:
        raise RecipeValidationError(f"{source}: format_version must be >= 1, got {version}")


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


# --------------------------------------------------------------------------------------- validation


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
        _check_value(_as_plain(recipe), Recipe, "<recipe>")
        _check_format_version(recipe.format_version, source or "recipe")
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


def _as_plain(obj: Any) -> Any:
    """Dataclass tree -> plain dicts/lists (for the strict type check of recipe objects)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _as_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _as_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_as_plain(v) for v in obj]
    return obj


def unmatched_patterns(recipe: Recipe, layer_names: list[str]) -> list[str]:
    """The ``recipe.layers`` patterns that match none of ``layer_names``."""
    import fnmatch

    return [p for p in recipe.layers if not any(fnmatch.fnmatchcase(n, p) for n in layer_names)]


def pattern_problem(recipe: Recipe, layer_names: list[str], layers_of: str) -> str | None:
    """The one message of the rule "every ``layers`` pattern matches a layer", or ``None`` when it holds.

    ``layers_of`` names the list the patterns are matched against (``"layer of the fingerprint"``,
    ``"self/joint attention layer of WanTransformer3DModel"``); an empty list is not checked (not recorded).
    """
    unmatched = unmatched_patterns(recipe, layer_names) if layer_names else []
    if not unmatched:
        return None
    return (f"layers pattern(s) {', '.join(map(repr, unmatched))} match no {layers_of} "
            f"(its layers look like {_names(layer_names, 3)})")


# ----------------------------------------------------------------------------------------- builtins


@dataclass(frozen=True)
class BuiltinRecipe:
    """A recipe shipped with litepatch: its name, the aliases that point to it and its file."""

    name: str
    aliases: tuple[str, ...]
    path: Path

    def load(self) -> Recipe:
        return load(self.path)


def list_builtin() -> list[BuiltinRecipe]:
    """The built-in recipes, sorted by name (``litepatch recipes list`` shows them with their provenance).

    Example:
        >>> [b.name for b in list_builtin()][:2]
        ['demo', 'wan2.1-1.3b-480p']
    """
    result = []
    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        aliases = tuple(sorted(a for a, targets in BUILTIN_ALIASES.items() if path.stem in targets))
        result.append(BuiltinRecipe(path.stem, aliases, path))
    return result


def builtin_names() -> list[str]:
    """Every name that resolves to a built-in recipe: canonical names and aliases."""
    return sorted({b.name for b in list_builtin()} | set(BUILTIN_ALIASES))


def load_builtin(name: str, *, fingerprint: ModelFingerprint | None = None) -> Recipe:
    """Loads a built-in recipe by name or alias. An alias with several targets (``wan-480p``: 14B and
    1.3B) picks the one whose fingerprint fits ``fingerprint``, else the first."""
    targets = BUILTIN_ALIASES.get(name, (name,))
    if fingerprint is not None and len(targets) > 1:
        for target in targets:
            candidate = load(BUILTIN_DIR / f"{target}.yaml")
            if not fingerprint_differences(candidate, fingerprint):
                return candidate
    path = BUILTIN_DIR / f"{targets[0]}.yaml"
    if not path.is_file():
        raise RecipeNotFoundError(f"no built-in recipe named {name!r}", known=builtin_names())
    return load(path)


# --------------------------------------------------------------------------------------- resolution


def _looks_like_path(ref: str) -> bool:
    return (
        ref.endswith((".yaml", ".yml"))
        or ref.startswith(("./", "../", "/", "~", ".\\"))
        or "\\" in ref
        or os.path.isabs(ref)
    )


def default_recipes_repo(recipes_repo: str | None = None) -> str:
    """The Hub repository for short names: the argument, else ``$LITEPATCH_RECIPES_REPO``, else the default."""
    return recipes_repo or os.environ.get(RECIPES_REPO_ENV) or DEFAULT_RECIPES_REPO


def resolve(
    ref: Recipe | str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    recipes_repo: str | None = None,
    fingerprint: ModelFingerprint | None = None,
    timeout: float | None = None,
) -> Recipe:
    """Turns what a user passes as ``recipe=`` into a validated :class:`Recipe`.

    The order is in the module docstring: Recipe object, local file, built-in name, Hub reference
    ``org/repo/name[@revision]``, short name in the default Hub repository.

    Args:
        ref: a Recipe, a path, a built-in name (``"wan-720p"``) or a Hub reference.
        revision (`str`, *optional*): Hub branch, tag or commit; overrides nothing when the reference
            pins one itself (both given and different is an error).
        cache_dir, local_files_only, token: as in ``huggingface_hub.hf_hub_download`` (``HF_HUB_OFFLINE``
            is honoured).
        recipes_repo (`str`, *optional*): the default Hub repository for short names.
        fingerprint (`ModelFingerprint`, *optional*): the model's; picks among the targets of an alias
            such as ``"wan-480p"`` (14B or 1.3B). It does not check the recipe: call
            :func:`check_fingerprint` for that.
        timeout (`float`, *optional*): seconds a Hub download may take in all (default
            ``$LITEPATCH_HUB_TIMEOUT`` or 10).

    A short name that is close to a built-in one (``"wan-72Op"``, ``"wan2.1-14b-720"``) is refused at
    once with the built-in names it resembles, without a Hub request; write ``org/repo/name`` to look
    such a name up on the Hub.

    Example:
        >>> resolve("wan-720p").context.resolution
        '1280x720'
        >>> resolve("org/repo/my-recipe@v1")  # doctest: +SKIP
    """
    if isinstance(ref, Recipe):
        return validate(ref)
    if isinstance(ref, os.PathLike):
        return load(ref)
    if not isinstance(ref, str):
        raise RecipeValidationError(
            f"recipe must be a Recipe, a path, a built-in name or 'org/repo/name[@revision]', "
            f"got {type(ref).__name__}"
        )
    if not ref.strip():
        raise RecipeNotFoundError("empty recipe name; pass a path, a built-in name or 'org/repo/name'",
                                  known=builtin_names())
    if os.path.isfile(os.path.expanduser(ref)) or _looks_like_path(ref):
        return load(ref)
    if ref in BUILTIN_ALIASES or (NAME_PATTERN.match(ref) and (BUILTIN_DIR / f"{ref}.yaml").is_file()):
        if revision is not None:
            raise RecipeValidationError(
                f"{ref!r} is a built-in recipe and has no revisions; drop revision={revision!r} "
                f"or name a Hub recipe ('org/repo/{ref}@{revision}')"
            )
        return load_builtin(ref, fingerprint=fingerprint)

    _refuse_near_builtin(ref)
    from . import hub

    parsed = hub.parse_ref(ref, revision=revision, recipes_repo=default_recipes_repo(recipes_repo))
    try:
        path = hub.pull(parsed, cache_dir=cache_dir, local_files_only=local_files_only, token=token, timeout=timeout)
    except RecipeNotFoundError as err:
        if parsed.short:
            raise RecipeNotFoundError(
                f"{ref!r} is neither a local file, a built-in recipe nor in the default Hub repository "
                f"{parsed.repo_id!r} ({err}); set {RECIPES_REPO_ENV} or write 'org/repo/name'",
                known=builtin_names(),
            ) from None
        raise
    return hub.load_pulled(path, parsed, cache_dir)


def _refuse_near_builtin(ref: str) -> None:
    """A short name that resembles a built-in one is a typo, not a Hub lookup: refused at once, naming the
    built-in names it is close to."""
    import difflib

    name = ref.partition("@")[0]
    if "/" in name:
        return
    names = builtin_names()
    if name in names:
        raise RecipeNotFoundError(f"{name!r} is a built-in recipe, not a Hub one: use it as it is (no download)")
    lowered = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.75)
    if close:
        suggestions = " or ".join(repr(lowered[c]) for c in close)
        raise RecipeNotFoundError(
            f"unknown recipe {ref!r}: did you mean {suggestions}? (not looked up on the Hub; for a Hub recipe of "
            f"that name write 'org/repo/{name}')",
            known=names,
        )


# -------------------------------------------------------------------------------------- fingerprint


def _as_fingerprint(fingerprint: ModelFingerprint | Mapping) -> ModelFingerprint:
    if isinstance(fingerprint, ModelFingerprint):
        return fingerprint
    if isinstance(fingerprint, Mapping):
        return ModelFingerprint(**fingerprint)
    raise TypeError(f"fingerprint must be a ModelFingerprint or a mapping, got {type(fingerprint).__name__}")


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def fingerprint_differences(recipe: Recipe, fingerprint: ModelFingerprint | Mapping) -> list[str]:
    """Each way the model (``fingerprint``) differs from the one the recipe was made for, one line each.

    Fields the recipe leaves empty (``""`` or 0) are not compared; a recipe without a fingerprint fits
    any model. Patterns of ``recipe.layers`` that match no layer of the model are differences too.
    """
    model = _as_fingerprint(fingerprint)
    diffs: list[str] = []
    expected = recipe.fingerprint
    if expected is not None:
        if expected.model_class and expected.model_class != model.model_class:
            diffs.append(f"class: recipe {expected.model_class}, model {model.model_class or '?'}")
        if expected.num_layers and expected.num_layers != model.num_layers:
            diffs.append(f"attention layer count: recipe {expected.num_layers}, model {model.num_layers}")
        if expected.heads and expected.heads != model.heads:
            diffs.append(f"heads: recipe {expected.heads}, model {model.heads}")
        if expected.head_dim and expected.head_dim != model.head_dim:
            diffs.append(f"head dim: recipe {expected.head_dim}, model {model.head_dim}")
        if expected.layer_names and model.layer_names:
            have = set(model.layer_names)
            want = set(expected.layer_names)
            missing = [n for n in expected.layer_names if n not in have]
            extra = [n for n in model.layer_names if n not in want]
            if missing:
                diffs.append(f"layers in the recipe but not in the model: {_names(missing)}")
            if extra:
                diffs.append(f"layers in the model but not in the recipe: {_names(extra)}")
    problem = pattern_problem(recipe, model.layer_names, _layers_of(model))
    return diffs + ([problem] if problem else [])


def _layers_of(model: ModelFingerprint) -> str:
    return f"self/joint attention layer of {model.model_class or 'the model'}"


def check_fingerprint(
    recipe: Recipe, fingerprint: ModelFingerprint | Mapping, *, allow_mismatch: bool = False
) -> list[str]:
    """Refuses a recipe made for another model; returns the differences (empty when it fits).

    Raises:
        FingerprintMismatchError: names each difference (class, layer count, heads, head dim,
            missing/extra layer names, patterns that match no layer) and how to override. With
            ``allow_mismatch=True`` a ``UserWarning`` is issued instead.

    Example:
        >>> recipe = resolve("wan2.1-1.3b-480p")
        >>> fp = ModelFingerprint("WanTransformer3DModel", 30, 12, 128, [f"blocks.{i}.attn1" for i in range(30)])
        >>> check_fingerprint(recipe, fp)
        []
    """
    model = _as_fingerprint(fingerprint)
    diffs = fingerprint_differences(recipe, model)
    if diffs:
        # the patterns first: with no fingerprint in the recipe (keyword overrides) they are the whole story
        patterns = pattern_problem(recipe, model.layer_names, _layers_of(model))
        fields = [d for d in diffs if d != patterns]
        parts = [patterns] if patterns else []
        if fields:
            parts.append(f"recipe {recipe.name!r} was made for a different model than "
                         f"{model.model_class or 'this model'}: " + "; ".join(fields))
        message = "; ".join(parts)
        if allow_mismatch:
            warnings.warn(message + " (applied anyway: allow_mismatch=True)", UserWarning, stacklevel=2)
        else:
            raise FingerprintMismatchError(
                message + "; use a recipe made for this model (see litepatch.inspect(model) for its layers), or "
                "apply it anyway with litepatch.apply(..., allow_fingerprint_mismatch=True) "
                "(check_fingerprint: allow_mismatch=True)",
                differences=diffs,
            )
    return diffs


__all__ = [
    "BUILTIN_ALIASES",
    "DEFAULT_RECIPES_REPO",
    "MAX_RECIPE_BYTES",
    "BuiltinRecipe",
    "Context",
    "LayerSetting",
    "Measured",
    "ModelFingerprint",
    "Provenance",
    "Recipe",
    "builtin_names",
    "check_fingerprint",
    "check_name",
    "default_recipes_repo",
    "dumps",
    "fingerprint_differences",
    "list_builtin",
    "load",
    "load_builtin",
    "loads",
    "resolve",
    "save",
    "validate",
]
