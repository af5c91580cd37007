"""Turning what a user passes as ``recipe=`` into a validated recipe (DESIGN §5).

Resolution order of :func:`resolve` (first match wins):

1. a :class:`Recipe` object: validated and returned as is;
2. a local file: an existing path, or any string that looks like one (ends in ``.yaml``/``.yml``,
   starts with ``./``, ``../``, ``/`` or ``~``); a missing file is an error, never a Hub lookup;
3. a built-in name or alias (``litepatch recipes list``), e.g. ``"wan-720p"``;
4. a Hub reference ``"org/repo/name[@revision]"``: the file ``name.yaml`` of that Hub repository;
5. any other short name (``"name[@revision]"``): ``name.yaml`` in the default Hub repository,
   ``recipes_repo=`` or the ``LITEPATCH_RECIPES_REPO`` environment variable or
   :data:`~litepatch.recipes.hub.DEFAULT_RECIPES_REPO`.

Hub lookups follow huggingface_hub: the cache directory, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, tokens
and revisions; the resolved commit is stored in ``recipe.provenance.hub_revision``.

Example:
    >>> recipe = resolve("wan-720p")
    >>> recipe.name, recipe.threshold
    ('wan2.1-14b-720p', -10.0)
"""

from __future__ import annotations

import os

from . import hub  # hub.pull is looked up at call time: tests and tools replace it
from .catalog import BUILTIN_ALIASES, BUILTIN_DIR, builtin_names, load_builtin
from .errors import RecipeNotFoundError, RecipeValidationError
from .hub import RECIPES_REPO_ENV, default_recipes_repo
from .io import load
from .schema import ModelFingerprint, Recipe
from .validation import NAME_PATTERN, validate


def _looks_like_path(ref: str) -> bool:
    return (
        ref.endswith((".yaml", ".yml"))
        or ref.startswith(("./", "../", "/", "~", ".\\"))
        or "\\" in ref
        or os.path.isabs(ref)
    )


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

    refuse_near_builtin(ref)
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


def refuse_near_builtin(ref: str) -> None:
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
