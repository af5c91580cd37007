"""Does a recipe fit a model: its fingerprint (class, layer count, heads, head dim, layer names) and the rule that
every ``layers`` pattern matches a layer (:func:`pattern_problem`, the rule's one home).

Example:
    >>> check_fingerprint(recipe, litepatch.fingerprint(transformer))   # [] when it fits, else raises
    []
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from .errors import FingerprintMismatchError
from .schema import ModelFingerprint, Recipe


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
