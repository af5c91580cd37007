"""litepatch.apply / LiteHandle: validation before touching the model, re-apply, remove, configure,
layer settings, warm-up, fallbacks, steps/branches/generations in a real scheduler loop, torch.compile."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import tiny_models as tm

import litepatch
from litepatch import LayerSetting, Recipe
from litepatch.context import StepTracker
from litepatch.recipes.schema import Provenance
from litepatch.stats import RECORD_KEYS


def _smooth_wan_style(seq=300, batch=1):
    model, inputs = tm.wan_style(seq=seq, batch=batch)
    return model, inputs


_run = tm.run_at


def _instance_attrs(model):
    attrs = ("forward", "cache_context", "_litepatch", "_litepatch_root")
    return {n: sorted(k for k in vars(m) if k in attrs) for n, m in model.named_modules()}


# ----------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 1.0}, "threshold must be <= 0"),
        ({"threshold": float("nan")}, "NaN"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"order": "backwards"}, "order must be one of"),
        ({"layers": {"blocks.9.*": 0.0}}, "'blocks.9.\\*' match no"),
        ({"layers": {"blocks.*.cross_attn": LayerSetting(dense=True)}}, "match no self/joint"),
        ({"backend": "cuda-magic"}, "unknown backend"),
        ({"recipe": Recipe(threshold=2.0)}, "threshold must be <= 0"),
    ],
)
def test_bad_arguments_raise_before_the_model_is_touched(kwargs, match):
    model, _ = tm.wan_style()
    before = _instance_attrs(model)
    with pytest.raises(ValueError, match=match):
        litepatch.apply(model, **kwargs)
    assert _instance_attrs(model) == before


def test_model_without_attention_is_refused():
    with pytest.raises(ValueError, match="no self or joint attention layer found in Sequential"):
        litepatch.apply(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="torch.nn.Module or a diffusers pipeline"):
        litepatch.apply(object())


def test_reapply_raises_unless_forced_and_remove_is_exact():
    model, inputs = tm.wan_style()
    reference = _run(model, inputs)
    before = _instance_attrs(model)
    handle = litepatch.apply(model, threshold=-6.0)
    assert model._litepatch_root is not None and model.blocks[0].self_attn._litepatch.name == "blocks.0.self_attn"
    with pytest.raises(ValueError, match="already patched"):
        litepatch.apply(model)
    forced = litepatch.apply(model, threshold=-3.0, force=True)
    assert not handle.active and forced.recipe.threshold == -3.0
    _run(model, inputs)
    assert litepatch.remove(model) is True
    assert litepatch.remove(model) is False
    forced.remove()  # idempotent
    assert _instance_attrs(model) == before
    assert torch.equal(_run(model, inputs), reference)


def test_a_handle_used_as_a_context_manager_removes_the_patch_on_leaving_even_on_an_error():
    model, inputs = tm.wan_style()
    reference = _run(model, inputs)
    before = _instance_attrs(model)
    with litepatch.apply(model, threshold=-6.0, warmup_steps=0) as handle:
        assert handle.active and model.blocks[0].self_attn._litepatch.name == "blocks.0.self_attn"
        _run(model, inputs)
        assert handle.stats().calls() > 0
    assert not handle.active and _instance_attrs(model) == before
    with pytest.raises(ZeroDivisionError), litepatch.apply(model, threshold=-6.0) as handle:
        _run(model, inputs)
        1 / 0  # noqa: B018  (the error the block raises, which leaving must not swallow)
    assert not handle.active and _instance_attrs(model) == before
    assert torch.equal(_run(model, inputs), reference)
    with pytest.raises(RuntimeError, match="was removed"), handle:
        pass


def test_defaults_recipe_and_overrides():
    model, _ = tm.wan_style()
    handle = litepatch.apply(model)
    assert handle.recipe.threshold == litepatch.DEFAULT_THRESHOLD == -10.0
    handle.remove()
    recipe = Recipe(name="mine", threshold=-4.0, warmup_steps=3, provenance=Provenance(hub_revision="abc123"))
    handle = litepatch.apply(model, recipe, warmup_steps=1, layers={"blocks.1.*": -2.0})
    assert handle.recipe.name == "mine" and handle.recipe.threshold == -4.0 and handle.recipe.warmup_steps == 1
    assert handle.recipe.threshold_for("blocks.1.self_attn", 5) == -2.0
    assert recipe.warmup_steps == 3 and not recipe.layers  # the caller's recipe is not modified
    stats = handle.stats()
    assert stats.recipe_name == "mine" and stats.hub_revision == "abc123"
    handle.remove()


def test_a_threshold_keyword_replaces_every_threshold_of_the_recipe_and_keeps_its_dense_layers():
    """A calibrated recipe names every layer; ``threshold=`` must reach those layers too. (It once replaced only
    the default, so ``configure(threshold=-inf)`` on the demo's recipe still skipped tiles: the demo timed a sparse
    run as its dense baseline.)"""
    model, inputs = _smooth_wan_style()
    calibrated = Recipe(name="calibrated", threshold=-5.0, schedule=[-5.0, -4.0], warmup_steps=0, layers={
        "blocks.0.self_attn": LayerSetting(threshold=0.0, schedule=[0.0, -1.0]),
        "blocks.1.self_attn": LayerSetting(dense=True)})
    handle = litepatch.apply(model, calibrated, threshold=float("-inf"))
    try:
        recipe = handle.recipe
        assert [recipe.threshold_for("blocks.0.self_attn", s) for s in (0, 5)] == [-math.inf] * 2
        assert recipe.threshold_for("blocks.1.self_attn", 0) is None  # still dense
        for t in (999, 900, 800):
            _run(model, inputs, t)
        assert {r["reason"] for r in handle.stats().records} == {"threshold -inf skips nothing", "dense layer"}

        handle.configure(recipe=calibrated)
        for t in (999, 900, 800):
            _run(model, inputs, t)
        assert any(not r["dense"] and r["kept_fraction"] < 1.0 for r in handle.stats().records)
        handle.configure(threshold=float("-inf"))  # the current (calibrated) recipe is the base
        for t in (999, 900):
            _run(model, inputs, t)
        assert all(r["dense"] and r["kept_fraction"] == 1.0 for r in handle.stats().records)
        assert handle.configure(threshold=-3.0, layers={"blocks.0.*": -1.0}).threshold_for("blocks.0.self_attn", 4) \
            == -1.0  # layers, given with it, set per-layer values again
    finally:
        handle.remove()


def test_recipe_from_a_yaml_path(tmp_path):
    io = pytest.importorskip("litepatch.recipes.io")
    model, inputs = tm.wan_style()
    path = tmp_path / "r.yaml"
    io.save(Recipe(name="from-file", threshold=-5.0, warmup_steps=1), path)
    handle = litepatch.apply(model, str(path))
    assert handle.recipe.name == "from-file" and handle.recipe.threshold == -5.0
    handle.remove()


# ------------------------------------------------------------------------------ warm-up, layers
def test_warmup_dense_layers_stats_and_configure():
    model, inputs = _smooth_wan_style()
    handle = litepatch.apply(model, threshold=0.0, warmup_steps=1, layers={"blocks.0.*": LayerSetting(dense=True)})
    for t in (999, 900, 800):
        _run(model, inputs, t)
        assert handle.step == {999: 0, 900: 1, 800: 2}[t]
    stats = handle.stats()
    by = {(r["layer"], r["step"]): r for r in stats.records}
    assert len(stats.records) == 6
    assert all(tuple(r) == RECORD_KEYS for r in stats.records)
    assert by[("blocks.0.self_attn", 0)]["reason"] == "warm-up" and by[("blocks.1.self_attn", 0)]["dense"]
    assert all(by[("blocks.0.self_attn", s)]["reason"] == "dense layer" for s in (1, 2))
    assert not by[("blocks.1.self_attn", 1)]["dense"] and by[("blocks.1.self_attn", 1)]["kept_fraction"] == 1.0
    assert by[("blocks.1.self_attn", 2)]["kept_fraction"] < 1.0  # the second sparse call skips
    assert model.blocks[0].self_attn._litepatch.states == {}  # dense layers never get a state
    per_layer = stats.per_layer()
    assert per_layer["blocks.0.self_attn"] == 1.0 and per_layer["blocks.1.self_attn"] < 1.0
    total = sum(r["total_tiles"] for r in stats.records)
    assert math.isclose(stats.kept_fraction(), sum(r["kept_tiles"] for r in stats.records) / total)
    table = stats.table()
    assert "blocks.1.self_attn" in table and "warm-up" in table and "dense layer" in table

    recipe = handle.configure(threshold=float("-inf"), warmup_steps=0, layers={})
    assert recipe.threshold == float("-inf") and handle.stats().records == []
    for t in (999, 900):
        _run(model, inputs, t)
    assert [r["kept_fraction"] for r in handle.stats().records] == [1.0] * 4
    with pytest.raises(ValueError, match="threshold must be <= 0"):
        handle.configure(threshold=0.5)
    handle.remove()
    with pytest.raises(RuntimeError, match="removed"):
        handle.configure(threshold=-1.0)


def test_call_records_keep_their_order_and_a_copy_of_each_count():
    """A forward's records are added together, the states' counts copied in one stack: a record keeps its count
    when the state's tensor is overwritten by the next call, and dense and sparse records keep the layers' order."""
    from litepatch.stats import CallLog

    log, counts = CallLog(), [torch.tensor(5), torch.tensor(7)]
    live = [(["a", 0, 0, 1, False, "", None, 10], counts[0]), (["b", 0, 0, 1, True, "warm-up", 10, 10], None),
            (["c", 0, 0, 1, False, "", None, 10], counts[1])]
    log.add(live)
    for count in counts:
        count.fill_(0)  # the next call's list kernel zeroes the state's count
    records, summed = log.freeze()
    assert [(r["layer"], r["kept_tiles"], r["dense"]) for r in records] == [("a", 5, False), ("b", 10, True),
                                                                           ("c", 7, False)]
    assert summed == []


def test_a_long_run_holds_a_bounded_log_and_its_summaries_stay_exact():
    """A model served for days never calls clear_stats: past the limit the oldest records are summed per layer, step,
    branch, dense and reason (each record held about 470 bytes, without bound), and every summary still counts every
    call, as with an unbounded log."""
    from litepatch.stats import CallLog, LiteStats

    bounded, unbounded = CallLog(limit=40), CallLog(limit=10**9)
    for forward in range(60):
        step, generation = forward % 5, forward // 5
        live = []
        for layer in ("a", "b", "c"):
            dense = step == 0 or layer == "c"
            reason = "warm-up" if step == 0 else ("dense layer" if dense else "")
            count = None if dense else torch.tensor(forward % 7 + (layer == "b"))
            live.append(([layer, step, forward % 2, generation, dense, reason, 10 if dense else None, 10], count))
        for log in (bounded, unbounded):
            log.add([(list(fields), count) for fields, count in live])
    assert len(bounded.raw) <= 40 and len(unbounded.raw) == 180
    (held, summed), (every, _) = bounded.freeze(), unbounded.freeze()
    assert held == every[-len(held):]  # the recent calls in detail
    assert sum(r["calls"] for r in summed) + len(held) == 180
    assert all(r["generation"] is None for r in summed)
    kept = {}
    for r in every[: 180 - len(held)]:
        row = kept.setdefault((r["layer"], r["step"], r["branch"], r["dense"], r["reason"]), [0, 0, 0])
        row[0], row[1], row[2] = row[0] + r["kept_tiles"], row[1] + r["total_tiles"], row[2] + 1
    assert {(r["layer"], r["step"], r["branch"], r["dense"], r["reason"]): [r["kept_tiles"], r["total_tiles"], r["calls"]]
            for r in summed} == kept
    stats, reference = LiteStats(held, summed=summed), LiteStats(every)
    assert stats.calls() == reference.calls() == 180
    assert stats.kept_fraction() == reference.kept_fraction() < 1.0
    assert stats.per_layer() == reference.per_layer()
    assert stats.per_layer(kernel_calls_only=True) == reference.per_layer(kernel_calls_only=True)
    assert stats.per_step() == reference.per_step() and stats.per_branch() == reference.per_branch()
    assert stats.table().splitlines()[1:] == reference.table().splitlines()[1:]
    assert f"({180 - len(held)} older calls summed)" in stats.table().splitlines()[0]
    bounded.clear()
    assert bounded.freeze() == ([], [])


def test_a_layers_tile_cache_stays_bounded_over_many_sequence_lengths():
    """Prompts of any length (a text mask, Qwen-Image) give each call its own key length: the layer's cache of tile
    sizes starts over past 64 of them instead of growing for as long as the model is served."""
    model, _ = _smooth_wan_style()
    handle = litepatch.apply(model, threshold=-4.0)
    layer = next(iter(handle._runtime.layers.values()))
    q = torch.zeros(1, 8, 2, 16)
    for seq_k in range(1, 300):
        tiles = layer._tiles_of(q, seq_k, False)
    assert len(layer._tiles) <= 64
    assert tiles == litepatch.kernels.registry.tiles(q, 299, backend=handle._runtime.backend)
    handle.remove()


def test_kept_counts_stay_on_device_until_stats():
    model, inputs = _smooth_wan_style()
    handle = litepatch.apply(model, threshold=0.0)
    _run(model, inputs, 999)
    _run(model, inputs, 900)
    handle._runtime.flush()
    from litepatch.stats import KEPT, DeviceCount

    raw = handle._runtime.log.raw
    assert raw and all(isinstance(r[KEPT], DeviceCount) and r[KEPT].stack.dim() == 1 for r in raw)
    # every layer's count of one forward in one stack, each record its row
    assert len({id(r[KEPT].stack) for r in raw}) == 2 and sorted(r[KEPT].row for r in raw) == sorted(
        list(range(len(raw) // 2)) * 2)
    records = handle.stats().records
    assert all(isinstance(r["kept_tiles"], int) for r in records)
    assert [r["kept_tiles"] for r in records] == [int(r[KEPT].stack[r[KEPT].row]) for r in raw]
    handle.remove()


# ------------------------------------------------------------------------------------ fallbacks
class SDPACaller(nn.Module):
    """Calls SDPA with whatever keyword arguments the test sets."""

    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.sdpa_kwargs = sdpa_kwargs
        self.heads_kv = sdpa_kwargs.pop("heads_kv", 2)

    def forward(self, x):
        b, s, _ = x.shape
        q = x.view(b, s, 2, -1).transpose(1, 2)
        kv = x.view(b, s, 2, -1)[:, :, : self.heads_kv].transpose(1, 2)
        return F.scaled_dot_product_attention(q, kv, kv, **self.sdpa_kwargs).transpose(1, 2).reshape(b, s, -1)


@pytest.mark.parametrize(
    "sdpa_kwargs, dtype, grad, reason",
    [
        ({"attn_mask": torch.ones(200, 200, dtype=torch.bool)}, torch.float32, False, "attention mask"),
        ({"is_causal": True}, torch.float32, False, "is_causal"),
        ({"dropout_p": 0.5}, torch.float32, False, "dropout_p=0.5"),
        ({"heads_kv": 1, "enable_gqa": True}, torch.float32, False, "grouped K/V heads"),
        ({}, torch.float64, False, "dtype torch.float64"),
        ({}, torch.float32, True, "autograd"),
    ],
)
def test_unsupported_calls_fall_back_with_one_warning(sdpa_kwargs, dtype, grad, reason):
    model = SDPACaller(**sdpa_kwargs)
    x = torch.randn(1, 200, 32, dtype=dtype, requires_grad=grad)
    torch.manual_seed(0)
    with torch.set_grad_enabled(grad):
        reference = model(x)
    handle = litepatch.apply(model, threshold=0.0)
    with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(grad):
        warnings.simplefilter("always")
        for t in range(3):
            torch.manual_seed(0)
            out = model(x)
            assert torch.equal(out, reference)
    messages = [str(w.message) for w in caught if "litepatch" in str(w.message)]
    assert len(messages) == 1 and reason in messages[0], messages
    assert all(r["dense"] and reason in r["reason"] for r in handle.stats().records)
    handle.remove()


def test_a_form_of_call_refused_under_autograd_runs_sparse_once_autograd_is_off():
    """The layer decides a form of call once (shapes, dtypes, masks, text tokens); autograd is asked on every call."""
    model = SDPACaller()
    x = torch.randn(1, 200, 32, requires_grad=True)
    handle = litepatch.apply(model, threshold=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(x)  # recorded when the next forward starts
    with torch.no_grad():
        model(x)
        model(x)
    records = handle.stats().records
    assert [r["dense"] for r in records] == [True, False, False], records
    assert "autograd" in records[0]["reason"]
    handle.remove()


# ------------------------------------------------------------- SDPA reached through helper methods
class HelperAttention(nn.Module):
    """Hand-written attention whose ``forward`` reaches SDPA only through ``self._attend(...)``."""

    def __init__(self, dim: int = 64, num_heads: int = 2):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self._project(x)
        return self.o(self._attend(q, k, v).transpose(1, 2).reshape(b, s, -1))

    def _project(self, x):
        b, s, _ = x.shape
        return self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class TorchSpelledHelper(HelperAttention):
    def _attend(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class DeepHelper(HelperAttention):
    """SDPA three ``self.`` calls below ``forward`` (the detector's limit), under its bare name."""

    def _attend(self, q, k, v):
        return self._core(q, k, v)

    def _core(self, q, k, v):
        return self._kernel(q, k, v)

    @staticmethod
    def _kernel(q, k, v):
        from torch.nn.functional import scaled_dot_product_attention

        return scaled_dot_product_attention(q, k, v)


class InheritedHelper(HelperAttention):
    """Neither ``forward`` nor the helper is defined here: both come from the base class."""


class ManualSoftmaxHelper(HelperAttention):
    def _attend(self, q, k, v):
        return (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1) @ v


class RecursiveHelpers(ManualSoftmaxHelper):
    """Helpers that call each other (the detector must stop) and never SDPA."""

    def _project(self, x):
        return self._ping(super()._project(x), 3)

    def _ping(self, qkv, n):
        return qkv if n == 0 else self._pong(qkv, n - 1)

    def _pong(self, qkv, n):
        return self._ping(qkv, n)


class TooDeepHelper(DeepHelper):
    """SDPA four ``self.`` calls below ``forward``: past the detector's limit."""

    def forward(self, x):
        return self._outer(x)

    def _outer(self, x):
        b, s, _ = x.shape
        q, k, v = self._project(x)
        return self.o(self._attend(q, k, v).transpose(1, 2).reshape(b, s, -1))


class HelperBlock(nn.Module):
    def __init__(self, attn_cls: type, dim: int = 64):
        super().__init__()
        self.norm, self.attn, self.mlp = nn.LayerNorm(dim), attn_cls(dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self._residual_mlp(x + self.attn(self.norm(x)))

    def _residual_mlp(self, x):
        return x + self.mlp(x)


class HelperModel(nn.Module):
    def __init__(self, attn_cls: type, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(HelperBlock(attn_cls) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("attn_cls", [HelperAttention, TorchSpelledHelper, DeepHelper, InheritedHelper])
def test_sdpa_behind_helper_methods_is_found(attn_cls):
    infos = litepatch.inspect(HelperModel(attn_cls))
    assert [(i.name, i.kind, i.module_class) for i in infos] == [
        ("blocks.0.attn", "self", attn_cls.__name__),
        ("blocks.1.attn", "self", attn_cls.__name__),
    ]  # the blocks (whose helper calls no SDPA) are not listed
    assert all(i.reason.startswith("sdpa-call") and (i.heads, i.head_dim) == (2, 32) for i in infos)


def test_helper_sdpa_parent_hides_its_attention_children():
    class Outer(HelperAttention):
        def __init__(self):
            super().__init__()
            self.inner = HelperAttention()

        def _attend(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    model = nn.Sequential(Outer())
    assert [i.name for i in litepatch.inspect(model)] == ["0"]


@pytest.mark.parametrize("attn_cls", [ManualSoftmaxHelper, RecursiveHelpers, TooDeepHelper])
def test_helpers_without_reachable_sdpa_are_not_found(attn_cls):
    model = HelperModel(attn_cls)
    assert litepatch.inspect(model) == []
    with pytest.raises(ValueError, match="no self or joint attention layer found"):
        litepatch.apply(model)
    _run(model, {"x": torch.randn(1, 8, 64)})  # the modules themselves run


def test_sdpa_behind_helper_methods_is_intercepted():
    """The interception is active during the layer's whole forward, so the helper's SDPA call is taken."""
    torch.manual_seed(0)
    model = HelperModel(DeepHelper).eval()
    base = torch.randn(1, 30, 64)  # smooth along the 512 tokens (4x8 CPU tiles of 128x64)
    inputs = {"x": F.interpolate(base.transpose(1, 2), size=512, mode="linear", align_corners=True).transpose(1, 2)}
    reference = _run(model, inputs)
    handle = litepatch.apply(model, threshold=tm.NOTHING_DROPPED)
    assert handle.layers == ["blocks.0.attn", "blocks.1.attn"]
    torch.testing.assert_close(_run(model, inputs), reference, rtol=1e-5, atol=1e-5)
    records = handle.stats().records
    assert [r["layer"] for r in records] == handle.layers
    assert all(not r["dense"] and r["kept_fraction"] == 1.0 and r["total_tiles"] == 64 for r in records)

    handle.configure(threshold=0.0)
    for _ in range(3):
        _run(model, inputs)
    stats = handle.stats()
    assert len(stats.records) == 6 and not any(r["dense"] for r in stats.records)
    assert stats.kept_fraction() < 1.0, stats.table()
    handle.remove()
    assert torch.equal(_run(model, inputs), reference)


# ----------------------------------------------------------------------------- step tracking
def test_call_reader_binds_every_form_of_call_as_the_signature_does():
    """The reader binds a form of call (positional count, keyword names) once and reuses it for later calls."""
    import inspect

    from litepatch.context import CallReader

    def forward(hidden_states, timestep=None, *extra, encoder_hidden_states=None, **options):
        return hidden_states

    def bound(args, kwargs):
        arguments = dict(inspect.signature(forward).bind_partial(*args, **kwargs).arguments)
        arguments.update(arguments.pop("options", {}))
        return arguments

    reader = CallReader.for_forward(forward)
    forms = [((1,), {}), ((1, 2, 3, 4), {"encoder_hidden_states": 5, "guidance": 6}),
             ((), {"timestep": 2, "hidden_states": 1, "return_dict": False})]
    for args, kwargs in forms * 2:  # the second time from the remembered layout
        got = reader._arguments(args, kwargs)
        assert got == bound(args, kwargs) and list(got) == list(bound(args, kwargs))
    new_values = reader._arguments((7, 8, 9), {"encoder_hidden_states": 10, "guidance": 11})
    assert new_values == {"hidden_states": 7, "timestep": 8, "extra": (9,), "encoder_hidden_states": 10, "guidance": 11}
    assert reader._arguments((1,), {"hidden_states": 2}) == {"hidden_states": 2}  # does not bind: the keywords


def test_step_tracker_schedule():
    tracker = StepTracker()
    seen = [(tracker.observe(t), tracker.generation, tracker.step, tracker.branch) for t in (999, 999, 500, 500, 10)]
    assert seen == [(True, 0, 0, 0), (False, 0, 0, 1), (False, 0, 1, 0), (False, 0, 1, 1), (False, 0, 2, 0)]
    assert tracker.observe(999) and (tracker.generation, tracker.step) == (1, 0)
    assert tracker.observe(999, "cond") is False and tracker.branch == "cond"
    tracker.reset()
    assert tracker.observe(500) and tracker.generation == 2
    assert not tracker.observe(None) and tracker.step == 1  # no timestep: every call is a step


def _cfg_loop(model, scheduler, latents, context, steps=3, named=False, guidance=4.0):
    """A diffusers scheduler loop with sequential CFG: two transformer calls per step."""
    scheduler.set_timesteps(steps)
    calls = []
    for t in scheduler.timesteps:
        outputs = []
        for name, ctx in (("cond", context), ("uncond", torch.zeros_like(context))):
            kwargs = {"x": latents, "t": t.reshape(1), "context": ctx}
            calls.append((name, kwargs))
            if named:
                with model.cache_context(name):
                    outputs.append(model(**kwargs))
            else:
                outputs.append(model(**kwargs))
        noise = outputs[1] + guidance * (outputs[0] - outputs[1])
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents, calls


def test_scheduler_loop_branches_keep_separate_state_and_generations_restart():
    diffusers = pytest.importorskip("diffusers")
    model, inputs = _smooth_wan_style()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    handle = litepatch.apply(model, threshold=0.0, warmup_steps=1)
    with torch.no_grad():
        _, calls = _cfg_loop(model, scheduler, inputs["x"], inputs["context"])
    stats = handle.stats()
    layer = model.blocks[1].self_attn._litepatch
    assert sorted(layer.states) == [0, 1]
    assert layer.states[0] is not layer.states[1]
    steps = sorted({r["step"] for r in stats.records})
    assert steps == [0, 1, 2] and {r["branch"] for r in stats.records} == {0, 1}
    assert all(r["dense"] and r["reason"] == "warm-up" for r in stats.records if r["step"] == 0)
    cfg_cond = [r["kept_tiles"] for r in stats.records if r["branch"] == 0 and r["layer"] == layer.name]

    # Replaying only the cond calls on a fresh patch gives the same skip decisions: no state leaks across branches.
    handle.remove()
    handle = litepatch.apply(model, threshold=0.0, warmup_steps=1)
    with torch.no_grad():
        for name, kwargs in calls:
            if name == "cond":
                model(**kwargs)
    alone = [r["kept_tiles"] for r in handle.stats().records if r["layer"] == layer.name]
    assert alone == cfg_cond
    assert min(cfg_cond) < max(cfg_cond)  # the branch did skip tiles

    # A second generation: warm-up again, then a first sparse call computes every tile.
    handle.clear_stats()
    with torch.no_grad():
        _cfg_loop(model, scheduler, inputs["x"], inputs["context"])
    assert handle.generation == 1  # the replay was generation 0 of this handle
    gen = [r for r in handle.stats().records if r["generation"] == handle.generation]
    assert all(r["dense"] for r in gen if r["step"] == 0)
    assert all(r["kept_fraction"] == 1.0 for r in gen if r["step"] == 1)
    handle.remove()


def test_cache_context_names_the_branch():
    diffusers = pytest.importorskip("diffusers")
    model, inputs = tm.wan_diffusers()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(3)
    before = _instance_attrs(model)
    handle = litepatch.apply(model, threshold=-2.0)
    with torch.no_grad():
        for t in scheduler.timesteps:
            for name in ("cond", "uncond"):
                with model.cache_context(name):
                    model(**{**inputs, "timestep": t.reshape(1)})
    assert sorted(model.blocks[0].attn1._litepatch.states) == ["cond", "uncond"]
    records = handle.stats().records
    assert {r["branch"] for r in records} == {"cond", "uncond"} and {r["step"] for r in records} == {0, 1, 2}
    handle.remove()
    assert _instance_attrs(model) == before


def test_reset_starts_a_new_generation():
    model, inputs = _smooth_wan_style()
    handle = litepatch.apply(model, threshold=0.0)
    for t in (999, 900, 800):
        _run(model, inputs, t)
    state = model.blocks[0].self_attn._litepatch.states[0]
    assert state.read_list().sum() < state.total_tiles()
    handle.reset()
    handle.clear_stats()
    _run(model, inputs, 700)  # would continue the schedule, but reset() forced a new generation
    assert handle.step == 0 and handle.generation == 1
    assert all(r["kept_fraction"] == 1.0 for r in handle.stats().records)
    handle.remove()


def test_skip_states_are_the_live_per_layer_per_branch_states():
    model, inputs = _smooth_wan_style()
    handle = litepatch.apply(model, threshold=0.0, warmup_steps=1)
    assert handle.skip_states() == {name: {} for name in handle.layers}  # nothing ran yet
    for t in (999, 900, 800):
        _run(model, inputs, t)
    states = handle.skip_states()
    assert sorted(states) == sorted(handle.layers)
    for name in handle.layers:
        assert list(states[name]) == [0]
    layer = model.blocks[0].self_attn._litepatch
    state = states[layer.name][0]
    assert state is layer.states[0]
    assert state.read_list().sum() < state.total_tiles()  # the live state, after skipping
    # Writing a read list forces the pattern of the next call (what benchmarks/e2e.py does).
    state.keep.zero_()
    state.keep[..., 0] = 1  # only key tile 0 (must stay listed: the first visited tile)
    handle.clear_stats()
    _run(model, inputs, 700)
    kept = [r for r in handle.stats().records if r["layer"] == layer.name]
    assert kept[0]["kept_tiles"] == state.q_tiles * state.read_list().shape[1]
    handle.reset()
    assert handle.skip_states() == {name: {} for name in handle.layers}
    handle.remove()
    with pytest.raises(RuntimeError, match="was removed"):
        handle.skip_states()


def test_batched_cfg_rows_have_their_own_skip_lists():
    model, inputs = tm.wan_style(batch=2)
    inputs["x"][1] = inputs["x"][1].flip(0)  # the two rows see different tokens
    handle = litepatch.apply(model, threshold=0.0)
    for t in (999, 900):
        _run(model, inputs, t)
    read = model.blocks[0].self_attn._litepatch.states[0].read_list()
    assert read.shape[0] == 2 and not torch.equal(read[0], read[1])
    handle.remove()


def test_pipeline_patches_transformer_and_transformer_2():
    class Pipe:
        pass

    pipe = Pipe()
    pipe.transformer, inputs = tm.wan_style()
    pipe.transformer_2, _ = tm.wan_style(seed=1)
    names = [i.name for i in litepatch.inspect(pipe) if i.sparse]
    assert names == ["blocks.0.self_attn", "blocks.1.self_attn",
                     "transformer_2.blocks.0.self_attn", "transformer_2.blocks.1.self_attn"]
    handle = litepatch.apply(pipe, threshold=-6.0)
    assert handle.layers == names
    _run(pipe.transformer, inputs, 999)  # high-noise expert
    _run(pipe.transformer_2, inputs, 500)  # low-noise expert: the same schedule continues
    assert handle.step == 1 and handle.generation == 0
    assert {r["layer"] for r in handle.stats().records} == set(names)
    assert litepatch.remove(pipe)
    assert "_litepatch_root" not in vars(pipe.transformer_2)


# ------------------------------------------------------------------------------- torch.compile
def test_torch_compile_patched_model_without_graph_breaks():
    model, inputs = _smooth_wan_style()
    handle = litepatch.apply(model, threshold=0.0)
    tm.assert_compiles_like_eager(model, handle, inputs, _run, (999, 900, 800), reason_chars=200)
    handle.remove()
    torch._dynamo.reset()


def test_recipe_for_another_model_is_refused_unless_allowed():
    pytest.importorskip("litepatch.recipes.io")
    from litepatch import ModelFingerprint

    model, _ = tm.wan_style()
    before = _instance_attrs(model)
    recipe = Recipe(name="other", fingerprint=ModelFingerprint(model_class="FluxTransformer2DModel", num_layers=57))
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        litepatch.apply(model, recipe)
    assert _instance_attrs(model) == before
    with pytest.warns(UserWarning, match="attention layer count: recipe 57, model 2"):
        handle = litepatch.apply(model, recipe, allow_fingerprint_mismatch=True)
    assert handle.recipe.name == "other"
    handle.remove()
