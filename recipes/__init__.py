"""Recipes: the calibrated LiteAttention settings of one model in one context (DESIGN §5).

Schema (:mod:`.schema`) and its strict checker (:mod:`.structure`), validation (:mod:`.validation`),
text and files (:mod:`.io`, reading through :mod:`.untrusted`), model fit (:mod:`.fingerprint`), built-in
recipes (:mod:`.catalog`), resolution of ``recipe=`` (:mod:`.resolution`) and sharing on the Hugging Face
Hub (:mod:`.hub`). huggingface_hub is imported only when the Hub is used.

Example:
    >>> from litepatch import recipes
    >>> recipe = recipes.resolve("wan-720p")          # built-in: Wan2.1-14B, 1280x720
    >>> recipe.provenance.source
    'published-defaults'
    >>> text = recipes.dumps(recipe); recipes.loads(text) == recipe
    True
"""

from .errors import (
    FingerprintMismatchError,
    RecipeError,
    RecipeHubError,
    RecipeNotFoundError,
    RecipeValidationError,
)
from .catalog import BUILTIN_ALIASES, BuiltinRecipe, builtin_names, list_builtin, load_builtin
from .fingerprint import check_fingerprint, fingerprint_differences
from .hub import DEFAULT_RECIPES_REPO, RECIPES_REPO_ENV, default_recipes_repo
from .io import MAX_RECIPE_BYTES, dumps, load, loads, save
from .resolution import resolve
from .schema import FORMAT_VERSION, Context, LayerSetting, Measured, ModelFingerprint, Provenance, Recipe
from .validation import validate


def push(recipe: Recipe, repo_id: str, **kwargs):  # noqa: ANN201 - returns huggingface_hub.CommitInfo
    """Uploads a recipe and its model card to the Hub; see :func:`litepatch.recipes.hub.push`.

    Example:
        >>> recipes.push(recipe, "me/litepatch-recipes")  # doctest: +SKIP
    """
    from .hub import push as _push

    return _push(recipe, repo_id, **kwargs)


def pull(ref: str, **kwargs):  # noqa: ANN201 - returns pathlib.Path
    """Downloads a Hub recipe into the huggingface_hub cache; see :func:`litepatch.recipes.hub.pull`.

    Example:
        >>> path = recipes.pull("org/repo/wan2.1-14b-720p@main")  # doctest: +SKIP
    """
    from .hub import pull as _pull

    return _pull(ref, **kwargs)


__all__ = [
    "BUILTIN_ALIASES",
    "DEFAULT_RECIPES_REPO",
    "FORMAT_VERSION",
    "MAX_RECIPE_BYTES",
    "RECIPES_REPO_ENV",
    "BuiltinRecipe",
    "Context",
    "FingerprintMismatchError",
    "LayerSetting",
    "Measured",
    "ModelFingerprint",
    "Provenance",
    "Recipe",
    "RecipeError",
    "RecipeHubError",
    "RecipeNotFoundError",
    "RecipeValidationError",
    "builtin_names",
    "check_fingerprint",
    "default_recipes_repo",
    "dumps",
    "fingerprint_differences",
    "list_builtin",
    "load",
    "load_builtin",
    "loads",
    "pull",
    "push",
    "resolve",
    "save",
    "validate",
]
