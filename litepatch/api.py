"""The public front door: :func:`apply`, :func:`remove`, :func:`inspect`, :func:`fingerprint`.

Example:
    >>> import litepatch
    >>> handle = litepatch.apply(pipe.transformer, threshold=-6.0, warmup_steps=8)
    >>> video = pipe(prompt, num_inference_steps=50).frames      # unchanged user code
    >>> print(handle.stats().table())
    >>> handle.remove()                                          # the model is exactly as before
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from litepatch.kernels import DEFAULT_THRESHOLD
from litepatch.recipes import check_fingerprint, validate
from litepatch.recipes.schema import LayerSetting, ModelFingerprint, Recipe
from litepatch.version import __version__

from .adapters import Adapter, AttentionLayerInfo, find_attention_layers
from .adapters.diffusers import pipeline_roots
from .attachment import LAYER_ATTR, ROOT_ATTR
from .layer_patch import LayerPatch
from .root_patch import RootPatch
from .runtime import Runtime
from .stats import LiteStats

if TYPE_CHECKING:
    from typing_extensions import Self


def _roots(model) -> list[tuple[str, torch.nn.Module]]:
    """(name prefix, module) pairs to patch: the module itself, or a pipeline's transformer(s)."""
    if isinstance(model, torch.nn.Module):
        return [("", model)]
    roots = pipeline_roots(model)
    if roots:
        return roots
    raise TypeError(
        f"expected a torch.nn.Module or a diffusers pipeline with a .transformer, got {type(model).__name__}"
    )


def _layers(model, adapter=None) -> list[tuple[AttentionLayerInfo, torch.nn.Module, torch.nn.Module, Adapter]]:
    found = []
    for prefix, root in _roots(model):
        for info, module, family in find_attention_layers(root, adapter):
            if prefix:
                info = dataclasses.replace(info, name=prefix + info.name)
            found.append((info, module, root, family))
    return found


def inspect(model, adapter: Adapter | str | None = None) -> list[AttentionLayerInfo]:
    """Lists the attention layers litepatch finds, how it classified them and why (a dry run).

    Layers whose attention runs out of litepatch's reach have ``sparse=False`` and say why and what to do in
    ``out_of_reach``; linear (non-softmax) attention has ``kind="not applicable"``.

    Args:
        model: a ``torch.nn.Module`` or a diffusers pipeline (its ``.transformer``, and ``.transformer_2``
            of Wan2.2, whose layer names get the prefix ``"transformer_2."``).
        adapter: a :class:`litepatch.adapters.Adapter` (or its registered name) tried before the built-in ones.

    Example:
        >>> for info in litepatch.inspect(pipe.transformer):
        ...     print(info.name, info.kind, info.heads, info.head_dim, info.reason)
        blocks.0.attn1 self 12 128 diffusers: queries and keys from the same tokens
        blocks.0.attn2 cross 12 128 diffusers: is_cross_attention=True
    """
    return [info for info, _, _, _ in _layers(model, adapter)]


def fingerprint(model, adapter: Adapter | str | None = None) -> ModelFingerprint:
    """What identifies ``model`` for recipes: class, number of sparse layers, heads, head dim, their names.

    Example:
        >>> litepatch.fingerprint(transformer).num_layers
        30
    """
    roots = _roots(model)
    sparse = [info for info in inspect(model, adapter) if info.sparse]
    return ModelFingerprint(
        model_class=type(roots[0][1]).__name__,
        num_layers=len(sparse),
        heads=sparse[0].heads if sparse else 0,
        head_dim=sparse[0].head_dim if sparse else 0,
        layer_names=[info.name for info in sparse],
    )


def _as_recipe(recipe, model=None) -> Recipe:
    if recipe is None:
        return Recipe(name="custom", threshold=DEFAULT_THRESHOLD)
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        from litepatch.recipes import resolve

        # the fingerprint lets an alias such as "wan-480p" pick the recipe made for this model size
        return resolve(recipe, fingerprint=fingerprint(model) if model is not None else None)
    raise TypeError(f"recipe must be a Recipe, a path or a recipe name, got {type(recipe).__name__}")


def _as_number(value):
    """Real numbers as ``float`` (numpy scalars too); anything else unchanged, for validation to refuse."""
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


def _layer_settings(layers: Mapping) -> dict:
    """The ``layers=`` shorthand as LayerSettings; patterns and values are checked by recipe validation."""
    if not isinstance(layers, Mapping):
        raise TypeError(f"layers must be a dict of {{pattern: LayerSetting | float}}, got {type(layers).__name__}")
    out = {}
    for pattern, setting in layers.items():
        if isinstance(setting, LayerSetting):
            out[pattern] = setting
        elif isinstance(setting, numbers.Real) and not isinstance(setting, bool):
            out[pattern] = LayerSetting(threshold=float(setting))
        elif setting is None:
            out[pattern] = LayerSetting(dense=True)
        else:
            raise TypeError(
                f"layers[{pattern!r}] must be a LayerSetting, a threshold (float) or None (dense), got {setting!r}"
            )
    return out


def _effective_recipe(recipe, threshold, warmup_steps, order, layers, model=None) -> Recipe:
    """``recipe`` with the keyword overrides applied, checked by :func:`litepatch.recipes.validate`.

    Validation is the recipe's own (one home for every rule): a bad value raises
    :class:`~litepatch.recipes.RecipeValidationError` (a ``ValueError``) naming the field, e.g.
    ``layers.blocks.0.*.threshold``, before the model is touched.
    """
    recipe = _as_recipe(recipe, model)
    changes = {}
    if threshold is not None:
        # one threshold everywhere: the recipe's per-layer thresholds and schedules go too (a calibrated recipe
        # names every layer, so overriding only the default changed nothing), its dense layers stay dense
        changes["threshold"] = _as_number(threshold)
        changes["schedule"] = []
        changes["layers"] = {pattern: dataclasses.replace(setting, threshold=None, schedule=[])
                             for pattern, setting in recipe.layers.items()}
    if warmup_steps is not None:
        changes["warmup_steps"] = warmup_steps
    if order is not None:
        changes["order"] = order
    if layers is not None:
        changes["layers"] = _layer_settings(layers)
    recipe = dataclasses.replace(recipe, **changes) if changes else dataclasses.replace(recipe)
    return validate(recipe)


def _check_against_model(recipe: Recipe, model, allow_mismatch: bool, adapter=None) -> None:
    """Refuses (or, with ``allow_mismatch``, warns about) a recipe for another model, or whose ``layers`` patterns
    match none of this model's self/joint attention layers: :func:`litepatch.recipes.check_fingerprint`."""
    check_fingerprint(recipe, fingerprint(model, adapter), allow_mismatch=allow_mismatch)


class LiteHandle:
    """A patched model: statistics, reconfiguration and removal. Returned by :func:`apply`.

    Also a context manager that removes the patch on leaving, an exception included (which it does not swallow):

    >>> with litepatch.apply(pipe.transformer, recipe="wan-720p") as handle:
    ...     video = pipe(prompt).frames
    ...     print(handle.stats().table())

    Attributes:
        layers: names of the patched (self and joint) attention layers.
        recipe: the effective :class:`~litepatch.recipes.schema.Recipe` (keyword overrides applied).
        step, branch, generation: where the running generation is (read by the calibrator).
    """

    def __init__(self, model, runtime: Runtime, roots: list[torch.nn.Module], modules: dict[str, torch.nn.Module],
                 adapter=None, allow_fingerprint_mismatch: bool = False):
        self.model = model
        self._runtime = runtime
        self._roots = roots
        self._modules = modules
        self._adapter = adapter
        self._allow_mismatch = allow_fingerprint_mismatch  # what apply allowed, configure allows
        self._removed = False

    @property
    def layers(self) -> list[str]:
        return list(self._runtime.layers)

    @property
    def recipe(self) -> Recipe:
        return self._runtime.recipe

    @property
    def step(self) -> int:
        return max(self._tracker().step, 0)

    @property
    def branch(self):
        return self._tracker().branch

    @property
    def generation(self) -> int:
        return self._tracker().generation

    def _tracker(self):
        self._runtime.settle()  # a forward whose GPU timestep is still on its way (Runtime.start_forward)
        return self._runtime.tracker

    @property
    def active(self) -> bool:
        return not self._removed

    def remove(self) -> None:
        """Restores every patched module exactly (same modules, forwards and outputs); idempotent."""
        if self._removed:
            return
        for root in self._roots:
            attachment = root.__dict__.get(ROOT_ATTR)
            if isinstance(attachment, RootPatch) and attachment.handle is self:
                attachment.uninstall(root)
        for name, module in self._modules.items():
            self._runtime.layers[name].uninstall(module)
        self._runtime.pending = None  # a forward whose timestep was still on its way: nothing will plan for it
        self._removed = True

    def reset(self) -> None:
        """Starts a new generation: every skip state is dropped and warm-up runs again."""
        self._runtime.settle()
        self._runtime.reset_states()
        self._runtime.tracker.reset()

    def clear_stats(self) -> None:
        """Drops the statistics recorded so far."""
        self._runtime.flush()
        self._runtime.log.clear()

    def configure(self, recipe=None, *, threshold=None, warmup_steps=None, order=None, layers=None) -> Recipe:
        """Changes the settings in place (e.g. between calibration trials); resets state and statistics.

        With ``recipe=None`` the current recipe is the base and only the given fields change; ``threshold`` is one
        threshold for every layer, as in :func:`apply` (``threshold=float("-inf")``: dense everywhere).

        Example:
            >>> handle.configure(threshold=-4.0, layers={"blocks.0.*": None})
        """
        self._check_active()
        base = self._runtime.recipe if recipe is None else recipe
        new = _effective_recipe(base, threshold, warmup_steps, order, layers, self.model)
        if new.layers:
            _check_against_model(new, self.model, allow_mismatch=self._allow_mismatch, adapter=self._adapter)
        self._runtime.recipe = new
        self.reset()
        self.clear_stats()
        return new

    def stats(self) -> LiteStats:
        """Per-call sparsity of the patched layers since ``apply``/``configure``/``clear_stats`` (past
        :data:`litepatch.stats.MAX_CALL_RECORDS` calls the oldest are summed per layer, step and branch into
        :attr:`LiteStats.summed`; the summaries count every call)."""
        recipe = self._runtime.recipe
        self._runtime.flush()
        records, summed = self._runtime.log.freeze()
        return LiteStats(
            records=records,
            recipe_name=recipe.name,
            hub_revision=recipe.provenance.hub_revision,
            summed=summed,
        )

    def to_recipe(self, name: str | None = None, *, measured: bool = True) -> Recipe:
        """The settings in use as a :class:`Recipe`: this model's fingerprint, thresholds (default, schedule,
        per-layer), warm-up, order and, when calls were recorded, the measured kept fraction.

        Applying the saved recipe to the same model gives the same behaviour.

        Example:
            >>> handle = litepatch.apply(transformer, threshold=-6.0, warmup_steps=4)
            >>> video = pipe(prompt).frames
            >>> litepatch.recipes.save(handle.to_recipe("my-wan"), "my-wan.yaml")
            >>> litepatch.apply(other_process_transformer, recipe="my-wan.yaml")
        """
        self._check_active()
        recipe = self._runtime.recipe
        kept = None
        if measured:
            stats = self.stats()
            kept = stats.kept_fraction() if stats.calls() else None
        measured_values = dataclasses.replace(
            recipe.measured, kept_fraction=kept if kept is not None else recipe.measured.kept_fraction,
            litepatch_version=__version__,
        )
        return validate(dataclasses.replace(
            recipe, name=name or recipe.name, fingerprint=fingerprint(self.model, self._adapter),
            measured=measured_values,
        ))

    def skip_states(self) -> dict[str, dict]:
        """The live skip state of each patched layer and CFG branch: ``{layer: {branch: SkipState}}``.

        A state appears at the layer's first sparse call of a generation and is dropped by
        :meth:`reset` and :meth:`configure`. These are the objects the kernel reads and rewrites in
        place: read them (``state.read_list()`` is the bool ``[B, H, q_tiles, k_tiles]`` read list) or
        force a tile pattern with ``state.set_read_list(mask)`` (benchmarks).

        Example:
            >>> for layer, branches in handle.skip_states().items():
            ...     for branch, state in branches.items():
            ...         print(layer, branch, f"{state.read_list().float().mean():.1%} of tiles kept")
        """
        self._check_active()
        return {name: dict(layer.states) for name, layer in self._runtime.layers.items()}

    def __enter__(self) -> Self:
        self._check_active()
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def _check_active(self) -> None:
        if self._removed:
            raise RuntimeError("this litepatch handle was removed; call litepatch.apply(model) again")

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._runtime.layers)} layers"
        return f"LiteHandle({state}, recipe={self.recipe.name!r}, threshold={self.recipe.threshold})"


def _attached(model) -> list[torch.nn.Module]:
    return [root for _, root in _roots(model) if isinstance(root.__dict__.get(ROOT_ATTR), RootPatch)]


def _patched_inside(model) -> list[tuple[str, object]]:
    """(module path, its patch) of every module of ``model`` (module or pipeline) that litepatch patched."""
    found = []
    for prefix, root in _roots(model):
        for name, module in root.named_modules():
            for attr in (ROOT_ATTR, LAYER_ATTR):
                patch = module.__dict__.get(attr)
                if patch is not None:
                    found.append((prefix + name, patch))
    return found


def _handle_of(patch):
    return patch.handle if isinstance(patch, RootPatch) else getattr(patch.runtime, "handle", None)


def _warn_out_of_reach(found) -> None:
    for info, _, _, _ in found:
        if info.out_of_reach:
            warnings.warn(f"litepatch: {info.name} stays dense: {info.out_of_reach}", UserWarning, stacklevel=3)


def apply(
    model,
    recipe: Recipe | str | os.PathLike | None = None,
    *,
    threshold: float | None = None,
    warmup_steps: int | None = None,
    order: str | None = None,
    layers: Mapping | None = None,
    adapter: Adapter | str | None = None,
    backend: str = "auto",
    allow_fingerprint_mismatch: bool = False,
    force: bool = False,
) -> LiteHandle:
    """Replaces the self and joint attention of ``model`` with LiteAttention, in place.

    Args:
        model: a ``torch.nn.Module`` or a diffusers pipeline (``.transformer`` and, for Wan2.2,
            ``.transformer_2`` are patched).
        recipe: a :class:`Recipe`, a path, a built-in name or a Hub reference. Keyword arguments
            override its fields; with neither, ``threshold`` is ``-10.0`` (log2 units).
        threshold (`float`, *optional*): skip threshold in log2 units for every layer and step (``-inf`` skips
            nothing: those calls run the fastest exact dense attention, as stock; ``0`` is the most aggressive
            allowed). It replaces the recipe's default, schedule and per-layer thresholds; layers the recipe
            keeps dense stay dense, and ``layers`` (applied after it) can set per-layer values again.
        warmup_steps (`int`, *optional*): dense steps at the start of each generation.
        order (`str`, *optional*): key-tile visiting order, ``"anchor"`` or ``"alternate"``.
        layers (`dict`, *optional*): ``{fnmatch pattern: LayerSetting | float | None}``; ``None`` keeps a layer dense.
        adapter (`Adapter` or `str`, *optional*): a :class:`litepatch.adapters.Adapter` (or a registered adapter's
            name) tried before the built-in ones (diffusers, ``nn.MultiheadAttention``, timm-style, SDPA callers).
        backend (`str`, defaults to `"auto"`): kernel backend; ``"auto"`` asks the kernels' registry per call for
            the fastest that takes it, a name (:func:`litepatch.kernels.available_backends`: ``"cute"`` on Hopper
            with the ``cuda`` extra, ``"triton"``, ``"reference"``) pins one.
        allow_fingerprint_mismatch (`bool`): apply a recipe made for another model (warns instead of raising).
        force (`bool`): re-apply to a model that is (or has parts) patched already: those patches are removed first.

    Returns:
        A :class:`LiteHandle`.

    Raises:
        RecipeValidationError: a bad recipe or override (threshold, schedule, order, warm-up, layers, ...),
            refused by :func:`litepatch.recipes.validate` with the field's name; a ``ValueError``.
        ValueError: recipe made for another model, layer patterns that match no attention layer, no
            attention layer found, or a model that is, or holds parts, patched already (unless ``force``).

    Example:
        >>> handle = litepatch.apply(transformer, threshold=-6.0, warmup_steps=2,
        ...                          layers={"blocks.0.*": LayerSetting(dense=True)})
        >>> handle.layers[:2]
        ['blocks.0.attn1', 'blocks.1.attn1']
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    from litepatch.kernels import registry

    if backend != "auto":
        registry.get(backend)  # raises, naming what is missing or the known names
    roots = _roots(model)
    patched = _patched_inside(model)
    if patched and not force:
        where, _ = patched[0]
        raise ValueError(
            f"{type(roots[0][1]).__name__}{' module ' + repr(where) if where else ''} is already patched by "
            "litepatch (nested or repeated apply is refused); call handle.remove() (or litepatch.remove(model) on "
            "the model it was applied to) first, or pass force=True to remove those patches"
        )
    found = _layers(model, adapter)
    effective = _effective_recipe(recipe, threshold, warmup_steps, order, layers, model)
    sparse = [entry for entry in found if entry[0].sparse]
    if not sparse:
        raise ValueError(_nothing_found(roots[0][1], found))
    _check_against_model(effective, model, allow_fingerprint_mismatch, adapter)
    for handle in {id(h): h for h in (_handle_of(p) for _, p in patched) if h is not None}.values():
        handle.remove()
    _warn_out_of_reach(found)

    runtime = Runtime(recipe=effective, backend=backend)
    modules = {}
    for info, module, _, family in sparse:
        runtime.layers[info.name] = LayerPatch(info, module, family, runtime)
        modules[info.name] = module
    handle = LiteHandle(model, runtime, [root for _, root in roots], modules, adapter, allow_fingerprint_mismatch)
    runtime.handle = handle
    for name, layer in runtime.layers.items():
        layer.install(modules[name])
    for _, root in roots:
        RootPatch(root, runtime, handle).install(root)
    return handle


def _nothing_found(root, found) -> str:
    message = f"no self or joint attention layer found in {type(root).__name__}"
    kinds = {}
    for info, _, _, _ in found:
        label = "out of reach" if info.out_of_reach else info.kind
        kinds.setdefault(label, []).append(info)
    if kinds:
        message += " (" + "; ".join(
            f"{label}: {', '.join(sorted({i.module_class for i in infos}))}" for label, infos in kinds.items()) + ")"
        reaches = [info for info, _, _, _ in found if info.out_of_reach]
        if reaches:
            message += f"; {reaches[0].name}: {reaches[0].out_of_reach}"
    return message + ("; litepatch looks for diffusers attention modules, nn.MultiheadAttention, timm-style Attention "
                      "and modules whose forward calls torch.nn.functional.scaled_dot_product_attention "
                      "(or pass adapter=...)")


def remove(model) -> bool:
    """Removes litepatch from ``model`` (module or pipeline); returns False when it was not patched.

    Example:
        >>> litepatch.remove(pipe)
        True
    """
    handles = []
    for root in _attached(model):
        handle = root.__dict__[ROOT_ATTR].handle
        if handle not in handles:
            handles.append(handle)
    for handle in handles:
        handle.remove()
    return bool(handles)


__all__ = ["DEFAULT_THRESHOLD", "LiteHandle", "apply", "fingerprint", "inspect", "remove"]
