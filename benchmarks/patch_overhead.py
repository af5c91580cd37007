"""Host time the patcher adds per attention call, on a GPU (issue 4: the product must not stall long runs).

A tiny diffusers Wan transformer (random weights) at a short sequence is host-bound: its forward time is
launch and Python overhead, so ``(patched - unpatched) / attention calls`` is what the patcher adds per
call (interception, plan, state lookup, the list, attention and commit launches, stats record) at threshold -4,
and the interception alone at -inf (nothing to skip: the call runs the model's own attention).

On a machine without a GPU, ``--cpu`` measures the same on CPU with a *null* LiteAttention backend (registered
for the run: it returns its query as the output and leaves the skip state as it is), so the numbers are the
patcher's host time alone: interception, plan, registry checks, stats record; like the CuTe backend, it repeats a
state's last call (``Backend.repeat``). Two rows:

* ``dense path``: warm-up calls (litepatch looks at the call and runs the model's own attention);
  added host time = (patched - unpatched) / attention calls;
* ``sparse path``: calls that go to the (null) kernel; added host time = (patched - unpatched) / calls, the
  unpatched model's SDPA replaced by a null function for the run, so neither side computes attention.

Whole forwards are timed in paired rounds (:class:`ForwardClock`): each round runs a short block of forwards on
every model (unpatched and patched copies of one model) in a rotating order, synchronised around each block, and
the printed number is the median of the per-round differences with its quartiles. Runs of the earlier form (all
of one model's forwards, then all of the other's) drifted with the host: the same tree read +93 and +358 us per
call on one H200, and 36 or 125 us on this repository's CPU.

``--calls`` counts instead of timing: the function calls (Python and C, as ``cProfile`` counts them) a patched
sparse forward makes beyond the unpatched one's, per attention call and by function. Unlike host time, the count
does not drift with the machine, so a change that cuts host time shows in it on any CPU.

``--breakdown`` also prints where a sparse forward's patcher time goes, function by function: with ``--cpu``
around the null kernel and SDPA, on a GPU around its kernels (there ``PendingTimestep.value`` is the wait for the
forward's GPU timestep, at its first attention call).

``--clock thread`` times the forwards by the CPU time of the thread that runs them instead of the wall clock: on the
shared H100 hosts the paired rounds' quartiles shrank from about +-100 to +-10 us per call (session 23).

Example:
    $ python benchmarks/patch_overhead.py --json bench-out/patch_overhead.json
    $ python benchmarks/patch_overhead.py --clock thread --layers 30 --rounds 30
    $ python benchmarks/patch_overhead.py --rounds 10 --breakdown
    $ python benchmarks/patch_overhead.py --cpu
    $ python benchmarks/patch_overhead.py --cpu --rounds 10 --breakdown
    $ python benchmarks/patch_overhead.py --cpu --calls
    $ python benchmarks/patch_overhead.py --rounds 10 --trace
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch

TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=128, num_layers=8, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=64,
)

# --cpu's: smaller still than TINY_WAN, for the less the rest of the forward costs, the less its noise hides
CPU_WAN = dict(TINY_WAN, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2, help="forwards per model and round")
    parser.add_argument("--json", default=None)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="time forwards by the wall clock or by the CPU time of the thread that runs them")
    parser.add_argument("--profile", action="store_true", help="print the host profile of patched forwards")
    parser.add_argument("--breakdown", action="store_true",
                        help="host time of the patcher's functions inside sparse forwards, per forward (on the CPU "
                             "with --cpu: null kernel and SDPA; else the GPU's kernels)")
    parser.add_argument("--cpu", action="store_true", help="CPU, null kernel: the patcher's host time alone")
    parser.add_argument("--calls", action="store_true",
                        help="count the function calls a sparse forward adds per attention call, by function, instead "
                             "of timing (deterministic: compare trees on any machine)")
    parser.add_argument("--trace", action="store_true",
                        help="like --breakdown, under torch.profiler: each function's own host time and the ops and "
                             "CUDA API calls inside it")
    parser.add_argument("--breakdown-forwards", type=int, default=300,
                        help="sparse forwards timed by --breakdown (at most 100 on a GPU)")
    parser.add_argument("--rounds", type=int, default=150,
                        help="paired rounds (medians and quartiles of the per-round differences are printed)")
    parser.add_argument("--layers", type=int, default=TINY_WAN["num_layers"],
                        help="transformer blocks of the tiny Wan: a forward's own patcher costs (the root's pre-hook, "
                             "the records' flush) are shared by its layers, so per call they shrink with more, as in "
                             "real models (Wan2.1-1.3B: 30 blocks, 14B: 40)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.cpu:
        return cpu_main(args)
    import statistics

    import diffusers

    import litepatch

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**dict(TINY_WAN, num_layers=args.layers)).to("cuda", torch.bfloat16).eval()
    latents = torch.randn(1, 16, 2, 32, 32, device="cuda", dtype=torch.bfloat16)  # 512 tokens
    text = torch.randn(1, 16, 32, device="cuda", dtype=torch.bfloat16)

    layers = args.layers
    thresholds = (float("-inf"), -4.0)
    models = {"unpatched": model}
    for threshold in thresholds:  # copies made before any patch: the same weights, patched once each
        models[f"patched {threshold}"] = copy.deepcopy(model)
        litepatch.apply(models[f"patched {threshold}"], threshold=threshold, warmup_steps=0)
    clock = ForwardClock(latents, text, args.iters, torch.cuda.synchronize, CLOCKS[args.clock])
    if args.calls:
        print_added_calls(clock, models["patched -4.0"], model, layers, {})
        return
    times = clock.paired_rounds(models, args.rounds)
    added = {name: added_per_call(times[name], times["unpatched"], layers) for name in models if name != "unpatched"}
    if args.breakdown or args.trace:
        for threshold in thresholds:
            print_breakdown(model, latents, text, layers, forwards=min(100, args.breakdown_forwards), backend="auto",
                            threshold=threshold, trace=args.trace)
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(clock.paired_rounds, {"patched -4.0": models["patched -4.0"]}, 3)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    unpatched_ms = statistics.median(times["unpatched"]) / 1e3
    calls = per_call_host_us()
    print(f"{torch.cuda.get_device_name()}, tiny Wan, {layers} self-attention layers, 512 tokens; {args.rounds} "
          f"rounds of {args.iters} forwards per model, paired; {args.clock} clock")
    print(f"{'unpatched':<16} {unpatched_ms:7.2f} ms per forward")
    for name, (median, low, high) in added.items():
        print(f"{name:<16} {median:+7.0f} us per attention call (quartiles of the paired rounds {low:+.0f} .. {high:+.0f})")
    print("host time per attention call, [1, 512, 2, 64] bf16 (the GPU part is a few microseconds):")
    for name, us in calls.items():
        print(f"  {name:<44} {us:7.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "layers": layers, "rounds": args.rounds,
                       "forwards_per_round": args.iters, "clock": args.clock, "unpatched_ms_per_forward": unpatched_ms,
                       "added_us_per_attention_call": {name: v[0] for name, v in added.items()},
                       "added_us_quartiles": {name: v[1:] for name, v in added.items()},
                       "us_per_forward_per_round": times, "host_us_per_call": calls}, f, indent=1)


# --clock: wall time, or the CPU time of the thread that runs the forwards, which leaves out the time the host took it
# off its CPU (other tenants of a shared machine: the H100 hosts' paired rounds spread over +-100 us per call of wall
# time); the waits for the GPU spin, and count, in both
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


class ForwardClock:
    """Per-forward wall time of several models, measured in paired rounds.

    Each round times one block of ``forwards`` forwards per model (the models in a rotating order), synchronised
    before and after each block, so every model's blocks meet the same drift of the host's speed; a round's
    difference between two models is then a paired sample. Each model sees a generation that never ends: its
    timesteps keep decreasing from round to round, as in one long denoising loop.
    """

    def __init__(self, latents: torch.Tensor, text: torch.Tensor, forwards: int, synchronize,
                 clock=time.perf_counter):
        self.latents, self.text, self.forwards, self.synchronize = latents, text, forwards, synchronize
        self.clock = clock  # time.perf_counter (wall) or time.thread_time (this thread's CPU time: CLOCKS)
        self._made: dict[str, int] = {}

    def _timestep_values(self, name: str) -> list[float]:
        first = self._made.get(name, 0)
        self._made[name] = first + self.forwards
        return [999.0 - 1e-3 * n for n in range(first, first + self.forwards)]

    def _timesteps(self, name: str) -> list[torch.Tensor]:
        return [torch.full((1,), value, device=self.latents.device) for value in self._timestep_values(name)]

    @torch.inference_mode()
    def _block_us(self, name: str, model, setting) -> float:
        timesteps = self._timesteps(name)
        with setting():
            self.synchronize()
            start = self.clock()
            for t in timesteps:
                model(hidden_states=self.latents, timestep=t, encoder_hidden_states=self.text, return_dict=False)
            self.synchronize()
        return (self.clock() - start) / self.forwards * 1e6

    def paired_rounds(self, models: dict, rounds: int, settings: dict | None = None,
                      shuffle: bool = False) -> dict[str, list[float]]:
        """Microseconds per forward of each model (``name -> module``), one number per round; ``settings`` (name ->
        context manager factory) is entered around that model's blocks. One untimed round first.

        ``shuffle``: each round in its own random order (seeded) instead of a rotation. Where several names time one
        module (host_ablation.py's variants), a rotation puts most of them after a block of the same module and the
        first after another's, whose first forward finds the caches holding the other module (on this CPU +35 us per
        call for a variant that changes nothing); in random orders every name meets the same predecessors."""
        import contextlib
        import random

        settings = settings or {}
        names = list(models)
        times: dict[str, list[float]] = {name: [] for name in names}
        for index in range(-1, rounds):
            shift = index % len(names)
            order = random.Random(index).sample(names, len(names)) if shuffle else names[shift:] + names[:shift]
            for name in order:
                us = self._block_us(name, models[name], settings.get(name, contextlib.nullcontext))
                if index >= 0:
                    times[name].append(us)
        return times

    def calls_per_forward(self, model, setting, forwards: int = 20) -> dict[str, float]:
        """Function calls per forward of ``model`` by function (``file:line(name)``; Python and C functions, as
        ``cProfile`` counts them), after one untimed block."""
        import cProfile
        import collections
        import pstats

        self._block_us("calls", model, setting)
        profiler = cProfile.Profile()
        saved, self.forwards = self.forwards, forwards
        try:
            profiler.runcall(self._block_us, "calls", model, setting)
        finally:
            self.forwards = saved
        counts: collections.Counter = collections.Counter()
        for (path, line, name), (_, calls, *_rest) in pstats.Stats(profiler).stats.items():
            counts[f"{'/'.join(path.split('/')[-2:])}:{line}({name})"] = calls / forwards
        return counts


def print_added_calls(clock: ForwardClock, patched, unpatched, layers: int, settings: dict,
                      top: int = 25) -> tuple[float, float]:
    """Prints the calls a patched forward makes beyond an unpatched one, per attention call, the functions with the
    largest differences first (negative: the unpatched model's own attention path, which the patch bypasses).
    Returns (all calls, Python functions' calls) per attention call."""
    import contextlib

    null = contextlib.nullcontext
    added = clock.calls_per_forward(patched, settings.get("patched", null))
    added.subtract(clock.calls_per_forward(unpatched, settings.get("unpatched", null)))
    total = sum(added.values()) / layers
    python = sum(count for name, count in added.items() if not name.startswith("~")) / layers
    print(f"function calls a sparse forward adds per attention call ({layers} layers): {total:+.1f}, of them Python "
          f"functions (a frame each, the costlier kind) {python:+.1f}")
    for name, count in sorted(added.items(), key=lambda item: -abs(item[1]))[:top]:
        if abs(count) >= 0.5:
            print(f"  {count / layers:+6.2f}  {name}")
    return total, python


def added_per_call(patched: list[float], unpatched: list[float], layers: int) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of the paired rounds' added microseconds per attention call."""
    import statistics

    diffs = [(p - u) / layers for p, u in zip(patched, unpatched)]
    if len(diffs) < 2:
        return diffs[0], diffs[0], diffs[0]
    low, _, high = statistics.quantiles(diffs, n=4)
    return statistics.median(diffs), low, high


def hot_loop_us(call, iters: int = 2000, warmup: int = 100, synchronize=None) -> float:
    """Host microseconds per ``call()`` made ``iters`` times back to back after ``warmup`` untimed calls (a hot loop:
    caches warm, unlike calls inside a forward); ``synchronize`` (a GPU's) before the timed calls and after them,
    outside the time."""
    for _ in range(warmup):
        call()
    if synchronize is not None:
        synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    us = (time.perf_counter() - start) / iters * 1e6
    if synchronize is not None:
        synchronize()
    return us


@torch.inference_mode()
def per_call_host_us(iters: int = 2000) -> dict[str, float]:
    """Host microseconds per call of each layer of the attention stack, at a tiny shape."""
    import math

    from litepatch.kernels import SkipState, lite_attention, registry

    q, k, v = (torch.randn(1, 512, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    state = SkipState()
    lite_attention(q, k, v, state, threshold=-4.0)
    args = (q, k, v, *state.buffers(), *state.must_masks(q.device))
    kw = dict(block_m=state.tiles.block_m, block_n=state.tiles.block_n, threshold=-4.0,
              softmax_scale=1 / math.sqrt(64), use_anchor=True, descending=False)
    candidates = {
        "SDPA (reference point)": lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt),
        **_cute_rows(q, k, v, state, args, kw),
        "triton_forward (2 launches)": lambda: registry.get("triton").forward(*args, **kw),
        "torch.ops.litepatch.lite_attention_fwd": lambda: torch.ops.litepatch.lite_attention_fwd(
            *args, None, "triton", kw["block_m"], kw["block_n"], -4.0, kw["softmax_scale"], True, False),
        "lite_attention (checks + state + backend)": lambda: lite_attention(q, k, v, state, threshold=-4.0),
    }
    return {name: hot_loop_us(fn, iters, warmup=50, synchronize=torch.cuda.synchronize)
            for name, fn in candidates.items()}


def _cute_rows(q, k, v, state, args, kw) -> dict:
    """The CuTe backend's host time, stage by stage (empty where it cannot run): flash-attn-4's dense call, the
    CuTe LiteAttention call alone (lists ready), and the whole backend call (list kernel + CuTe + commit kernel)."""
    from litepatch.kernels import registry

    if "cute" not in registry.available_backends() or registry.get("cute").refusal(q, k.shape[1]) is not None:
        return {}
    from unittest import mock

    from flash_attn.cute import interface as fa4_interface

    from litepatch.kernels import cute_fwd
    from litepatch.kernels import launch as launch_module
    from litepatch.kernels.cute_sm90 import run_sm90
    from litepatch.kernels.launch import launch
    from litepatch.kernels.state import derived_from

    keep = state.buffers().keep
    batch, heads, q_tiles, _ = keep.shape
    cute_forward = registry.get("cute").forward
    cute_forward(*args, **kw)  # the lists below now hold this call's: the state's own (a small state) or the shared
    own = derived_from(keep)
    slot, count, tail, index, votes = own.views if own is not None else cute_fwd.scratch_views(keep, state.k_tiles)
    lists = (*cute_fwd.no_masked_blocks(q.device, batch, heads, q_tiles), count, index)
    out, lse = run_sm90(q, k, v, lists, votes, slot, tail, softmax_scale=kw["softmax_scale"], threshold=-4.0,
                        seqused_k=None)

    def without_cute_call():  # the list and commit launches and the Python around them
        with mock.patch.object(cute_fwd, "run_sm90", lambda *a, **k: (out, lse)):
            cute_forward(*args, **kw)

    anchor, kept = args[4], args[5]
    order = cute_fwd.launch_options(state.k_tiles, use_anchor=kw["use_anchor"], descending=kw["descending"],
                                    key_mask=False)

    list_args = ((batch * heads * q_tiles,), keep, anchor, count, index, count, tail, votes, slot, kept, q_tiles,
                 state.k_tiles, keep.shape[-1], heads)

    def list_launch():  # one Triton launch, bound by Triton
        cute_fwd._list_kernel[list_args[0]](*list_args[1:], **order)

    def reused_launch():  # the same launch as cute_forward makes it (litepatch.kernels.launch)
        launch(cute_fwd._list_kernel, *list_args, **order)

    others = dict(launch_module._RUNNERS)
    launch_module._RUNNERS.clear()
    reused_launch()  # bound by Triton: the one entry is this launch's
    ((runner, trailing, _),) = launch_module._RUNNERS.values()
    launch_module._RUNNERS.update(others)
    constexprs = [order[name] for name in trailing]

    def tritons_launcher():  # the reused compiled kernel through Triton's own launcher (before the direct one)
        runner(*list_args[1:], *constexprs)

    return {
        "cute_forward minus its CuTe call (mocked)": without_cute_call,
        "one Triton launch (the list kernel), bound": list_launch,
        "the same launch, reused (as cute_forward)": reused_launch,
        "the same launch, reused through Triton's launcher": tritons_launcher,
        "flash-attn-4 dense, its interface (_flash_attn_fwd)": lambda: fa4_interface._flash_attn_fwd(q, k, v)[0],
        "flash-attn-4 dense, launched directly (dense_attention)": lambda: cute_fwd.flash_attn_4_dense(q, k, v),
        "CuTe LiteAttention call alone (run_sm90)": lambda: run_sm90(
            q, k, v, lists, votes, slot, tail, softmax_scale=kw["softmax_scale"], threshold=-4.0, seqused_k=None),
        "cute_forward (list + CuTe + commit kernels)": lambda: cute_forward(*args, **kw),
    }


NULL_BACKEND = "null-cpu"


@torch.inference_mode()
def per_layer_call_us(model, latents, rounds: int, null_sdpa) -> dict[str, float]:
    """One self-attention module called alone, patched (null kernel) vs unpatched (null SDPA), interleaved: the
    interception's own host time without the rest of the forward's noise; plus the root pre-hook per layer."""
    import statistics
    from unittest import mock

    import litepatch

    attn = model.blocks[0].attn1
    hidden = torch.randn(1, latents[0, 0].numel() // 4, attn.to_q.in_features)
    rotary = model.rope(latents)

    calls, hooks = [], []
    for _ in range(rounds):
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", null_sdpa):
            unpatched = hot_loop_us(lambda: attn(hidden, None, None, rotary))
        handle = litepatch.apply(model, threshold=-4.0, backend=NULL_BACKEND)
        layer = attn._litepatch
        root = model._litepatch_root
        kwargs = dict(hidden_states=latents, timestep=torch.full((1,), 999.0), encoder_hidden_states=None)
        root.pre_hook(model, (), kwargs)

        def call():
            layer.last_call = None  # as in a forward: one call per plan
            attn(hidden, None, None, rotary)

        calls.append(hot_loop_us(call) - unpatched)
        hooks.append(hot_loop_us(lambda: root.pre_hook(model, (), kwargs), 300) / len(handle.layers))
        handle.remove()
    return {"one attention module, patched - unpatched": statistics.median(calls),
            "root pre-hook (plans, records), per layer": statistics.median(hooks)}


def _register_null_backend() -> None:
    """A CPU backend that computes nothing: the host cost of the patcher without any kernel."""
    from litepatch.kernels import registry
    from litepatch.kernels.state import TileConfig

    lse = {}

    def null_forward(q, k, v, keep, anchor, kept, must_q, must_k, key_valid, **kwargs):
        # q itself as the output: no allocation, and no uninitialised memory (denormals would slow the next layers)
        shape = (q.shape[0], q.shape[2], q.shape[1])
        if shape not in lse:  # made once: torch.zeros per call would be the null kernel's own cost
            lse[shape] = torch.zeros(shape)
        return q, lse[shape]

    def null_repeat(q, k, v, keep, anchor, kept, must_q, must_k, key_valid, **kwargs):
        # the same null call again on new inputs, as the CuTe backend repeats its calls (Backend.repeat)
        return lambda q, k, v, lse_wanted=True: null_forward(q, k, v, keep, anchor, kept, must_q, must_k, key_valid)

    registry.register_backend(registry.Backend(
        name=NULL_BACKEND, forward=null_forward, tiles=lambda head_dim, tiles=TileConfig(128, 64): tiles,
        constraints=registry.Constraints(device_types=("cpu",), dtypes=(torch.float32,)), repeat=null_repeat))


def cpu_main(args) -> None:
    import diffusers

    import litepatch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    _register_null_backend()
    model = diffusers.WanTransformer3DModel(**dict(CPU_WAN, num_layers=args.layers)).eval()
    latents = torch.randn(1, 4, 1, 16, 16)  # 64 tokens: the forward is host-bound
    text = torch.randn(1, 16, 16)
    layers = args.layers

    q = torch.randn(1, 2, 64, 16)
    with torch.inference_mode():
        sdpa_us = hot_loop_us(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    import statistics
    from unittest import mock

    def null_sdpa(query, key, value, **kwargs):  # the unpatched model's attention, computing nothing
        return query

    def null_attention():
        return mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", null_sdpa)

    if args.calls:
        sparse = copy.deepcopy(model)
        litepatch.apply(sparse, threshold=-4.0, warmup_steps=0, backend=NULL_BACKEND)
        clock = ForwardClock(latents, text, args.iters, lambda: None, CLOCKS[args.clock])
        total = print_added_calls(clock, sparse, model, layers, {"patched": null_attention, "unpatched": null_attention},
                                  top=40)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": "cpu", "layers": layers, "added_calls_per_attention_call": total[0],
                           "added_python_calls_per_attention_call": total[1]}, f, indent=1)
        return
    models = {name: copy.deepcopy(model) for name in ("unpatched", "warm-up", "unpatched, null SDPA", "sparse")}
    litepatch.apply(models["warm-up"], threshold=-4.0, warmup_steps=10**6, backend=NULL_BACKEND)
    litepatch.apply(models["sparse"], threshold=-4.0, warmup_steps=0, backend=NULL_BACKEND)
    # cross-attention stays dense: null there too, as on the unpatched side
    settings = {"unpatched, null SDPA": null_attention, "sparse": null_attention}
    clock = ForwardClock(latents, text, args.iters, lambda: None, CLOCKS[args.clock])
    times = clock.paired_rounds(models, args.rounds, settings)
    unpatched = statistics.median(times["unpatched"])
    rows = {
        "dense path (warm-up: the model's own SDPA)": added_per_call(times["warm-up"], times["unpatched"], layers),
        "sparse path (null kernel vs a null SDPA)": added_per_call(times["sparse"], times["unpatched, null SDPA"],
                                                                   layers),
    }
    rows.update(per_layer_call_us(model, latents, min(args.rounds, 5), null_sdpa))
    if args.breakdown or args.trace:
        print_breakdown(model, latents, text, layers, null_sdpa, forwards=args.breakdown_forwards, trace=args.trace)
        print_breakdown(model, latents, text, layers, forwards=args.breakdown_forwards, backend=NULL_BACKEND,
                        threshold=float("-inf"), trace=args.trace)
    print(f"CPU (1 thread), tiny Wan (2 heads x 16), {layers} self-attention layers, 64 tokens, fp32; unpatched "
          f"forward {unpatched:.0f} us, SDPA alone {sdpa_us:.1f} us per call; {args.rounds} paired rounds of {args.iters} forwards")
    for name, value in rows.items():
        median, low, high = value if isinstance(value, tuple) else (value, value, value)
        quartiles = f"  (quartiles {low:+.1f} .. {high:+.1f})" if isinstance(value, tuple) else ""
        print(f"  {name:<44} {median:+6.1f} us host time per attention call{quartiles}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "cpu", "layers": layers, "unpatched_us": unpatched, "sdpa_us": sdpa_us,
                       "added_host_us_per_call": rows}, f, indent=1)


# The patcher's functions on a sparse call's path, by where they live: (module, owner attribute or None, name).
BREAKDOWN = (
    ("litepatch.root_patch", "RootPatch", "pre_hook"), ("litepatch.context", "CallReader", "read_source"),
    ("litepatch.runtime", "Runtime", "start_forward"), ("litepatch.runtime", "Runtime", "settle"),
    ("litepatch.context", "StepTracker", "observe"), ("litepatch.runtime", "Runtime", "flush"),
    ("litepatch.layer_patch", "LayerPatch", "make_plan"), ("litepatch.layer_patch", "LayerPatch", "attend"),
    ("litepatch.layer_patch", "LayerPatch", "_form"), ("litepatch.layer_patch", None, "lite_attention"),
    ("litepatch.kernels.interface", None, "_check_inputs"), ("litepatch.kernels.registry", None, "select"),
    ("litepatch.kernels.state", "SkipState", "prepare"), ("litepatch.context", "PendingTimestep", "value"),
    ("litepatch.context", "PendingTimestep", "start"), ("litepatch.layer_patch", "LayerPatch", "classify"),
    ("litepatch.layer_patch", "LayerPatch", "_dense_total"), ("litepatch.layer_patch", None, "fast_dense"),
    ("litepatch.dense_routing", None, "faster_dense_attention"),
    ("litepatch.kernels.interface", "_Repeat", "run_if_same"), ("litepatch.layer_patch", "LayerPatch", "attend_again"),
    ("litepatch.layer_patch", None, "repeat_call"),
)
# Inside the kernel call on a GPU (the CuTe backend's steps and the interface's), and the records' flush: where the
# sparse path's time goes beyond the patcher's own functions
GPU_BREAKDOWN = (
    ("litepatch.kernels.cute_fwd", None, "launch"), ("litepatch.kernels.cute_fwd", None, "run_sm90"),
    ("litepatch.kernels.cute_fwd", None, "run_dense_sm90"), ("litepatch.kernels.cute_fwd", None, "scratch_views"),
    ("litepatch.kernels.cute_fwd", None, "no_masked_blocks"), ("litepatch.kernels.cute_fwd", None, "launch_options"),
    ("litepatch.kernels.cute_fwd", None, "_prefix_lengths"), ("litepatch.kernels.cute_sm90", None, "tma_inputs"),
    ("litepatch.kernels.interface", None, "normalize_ranges"), ("litepatch.kernels.interface", None, "key_mask_from"),
    ("litepatch.kernels.state", "SkipState", "must_masks"), ("litepatch.kernels.state", "SkipState", "count_call"),
    ("litepatch.kernels.state", "SkipState", "descending"), ("litepatch.layer_patch", "LayerPatch", "flush"),
    ("litepatch.stats", "CallLog", "add"), ("litepatch.layer_patch", "LayerPatch", "_current_plan"),
)


def print_breakdown(model, latents, text, layers: int, null_sdpa=None, forwards: int = 300,
                    backend: str = NULL_BACKEND, threshold: float = -4.0, trace: bool = False) -> None:
    """Microseconds per forward spent in each of :data:`BREAKDOWN` during forwards at ``threshold`` (-inf: the
    dense path, flash-attn-4 on a GPU; the model's own SDPA on the CPU), measured inside real
    forwards: cache-cold, as a model runs them (isolated micro-benchmarks read 2-3x lower). On the CPU with the null
    kernel and a null SDPA; on CUDA (``backend="auto"``, ``null_sdpa=None``) with the real ones, where
    ``PendingTimestep.value`` is the wait for the forward's GPU timestep (at its first attention call). Nested
    functions count in their callers too; each wrapper adds about half a microsecond.

    ``trace``: the functions become ``torch.profiler`` ranges and the forwards run under the profiler, which then
    splits each function's host time into what it spends itself (Python, and C code the profiler does not see: the
    CuTe kernel's TVM-FFI call) and each torch op and CUDA API call inside it (``aten::empty``, ``cuLaunchKernel``,
    ...), per forward (:func:`print_ranges`). The profiler adds its own cost to every op, so compare rows of one run."""
    import collections
    import contextlib
    import functools
    import importlib
    from unittest import mock

    import litepatch

    spent, calls, patches = collections.Counter(), collections.Counter(), []
    for module_name, owner_name, name in BREAKDOWN + (GPU_BREAKDOWN if latents.is_cuda else ()):
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        label = f"{owner_name}.{name}" if owner_name else name

        def timed(*args, _f=getattr(owner, name), _label=label, **kwargs):
            start = time.perf_counter_ns()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter_ns() - start
                calls[_label] += 1

        def ranged(*args, _f=getattr(owner, name), _label=label, **kwargs):
            with torch.profiler.record_function(_label):
                return _f(*args, **kwargs)

        wrapper = ranged if trace else timed
        patches.append(mock.patch.object(owner, name, functools.wraps(getattr(owner, name))(wrapper)))
    labels = {f"{owner}.{name}" if owner else name for _, owner, name in BREAKDOWN + GPU_BREAKDOWN}
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if latents.is_cuda
                                                          else [])
    profiler = torch.profiler.profile(activities=activities) if trace else None
    for patch in patches:  # before apply: the root's forward hook binds pre_hook when it is installed
        patch.start()
    try:
        handle = litepatch.apply(model, threshold=threshold, warmup_steps=0, backend=backend)
        sdpa = (contextlib.nullcontext() if null_sdpa is None
                else mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", null_sdpa))
        timesteps = [torch.full((1,), 999.0 - i, device=latents.device) for i in range(30 + forwards)]
        with torch.inference_mode(), sdpa:
            for i, timestep in enumerate(timesteps):
                if i == 30:
                    spent.clear(), calls.clear()
                    _synchronize(latents.device)
                    if profiler is not None:
                        profiler.start()
                    start = time.perf_counter()
                model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)
            _synchronize(latents.device)
            per_forward_us = (time.perf_counter() - start) / forwards * 1e6
            if profiler is not None:
                profiler.stop()
        handle.remove()
    finally:
        for patch in patches:
            patch.stop()
    kernel = "null kernel" if null_sdpa is not None else f"{latents.device.type} kernels"
    setting = (f"at threshold {threshold} ({layers} layers, {kernel}, {forwards} forwards, {per_forward_us:.0f} us per "
               "forward")
    if profiler is not None:
        return print_ranges(profiler.events(), labels, forwards, setting)
    print(f"where a forward's patcher time goes {setting}):")
    for label, ns in spent.most_common():
        print(f"  {label:<28} {ns / forwards / 1e3:7.1f} us per forward  ({calls[label] / forwards:.0f} calls)")


def print_ranges(events, labels: set[str], forwards: int, setting: str, top: int = 40) -> None:
    """Prints, per forward, the host time of each profiler range in ``labels`` that is its own (``self``) and that of
    every op and CUDA API call run directly inside it, by the innermost range that holds it; the largest first."""
    import collections

    spent, calls = collections.Counter(), collections.Counter()
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        owner = event if event.name in labels else event.cpu_parent
        while owner is not None and owner.name not in labels:
            owner = owner.cpu_parent
        if owner is None:
            continue  # the model's own ops, outside the patcher's functions
        row = ("self", owner.name) if owner is event else (owner.name, event.name)
        spent[row] += event.self_cpu_time_total
        calls[row] += 1
    print(f"host time inside the patcher's functions {setting}; torch.profiler, self time of each range and of the ops "
          f"and CUDA calls inside it, per forward):")
    for (owner, name), us in spent.most_common(top):
        where = f"{name} (its own)" if owner == "self" else f"{owner} > {name}"
        print(f"  {where:<64} {us / forwards:7.1f} us  ({calls[owner, name] / forwards:.1f} calls)")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
