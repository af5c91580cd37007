"""Where the patcher's host time per attention call goes, measured by taking pieces out (issue 13's host target).

``patch_overhead.py --trace`` names the functions, but the profiler adds several microseconds to every range and
op, more than most of them cost (``SkipState.count_call``, one ``+= 1``, read 10 us per call under it). Here each
piece is taken out instead (a ``mock.patch`` for the blocks of that variant: a no-op, a cached answer, a constant)
and whole forwards of the tiny Wan are timed in paired rounds with the patched model as it is
(:class:`patch_overhead.ForwardClock`, every variant in each round, rotating order). A variant's saving per call,
``(patched - variant) / layers``, is what that piece costs inside real forwards, cache-cold, without a profiler.

The variants time the same model object (its skip states and plans carry on), each with its own stretch of
decreasing timesteps per model, so the step tracker sees one long generation. Taking a piece out is for timing
only: outputs, lists and statistics are then wrong.

Example (a GPU with the ``cuda`` extra and diffusers):
    $ python benchmarks/host_ablation.py --rounds 60
    $ python benchmarks/host_ablation.py --layers 30 --rounds 40 --json bench-out/host_ablation_L30.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import warnings
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_overhead import CLOCKS, TINY_WAN, ForwardClock, added_per_call  # noqa: E402


class _SharedTimesteps(ForwardClock):
    """A :class:`ForwardClock` whose variants of one model share that model's timesteps (one generation each)."""

    def __init__(self, *args, model_of: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.model_of = model_of

    def _timesteps(self, name: str) -> list[torch.Tensor]:
        return super()._timesteps(self.model_of.get(name, name))


def _patches(*patches) -> contextlib.AbstractContextManager:
    """The ``mock.patch`` objects ``patches`` entered together."""
    stack = contextlib.ExitStack()
    for patch in patches:
        stack.enter_context(patch)
    return stack


class _CachedEmpty:
    """``torch`` as a module sees it, except ``empty``: one tensor per (shape, dtype, device), made once."""

    def __init__(self):
        self._made: dict = {}

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *shape, dtype=None, device=None, **kwargs):
        key = (shape, dtype, device)
        if key not in self._made:
            self._made[key] = torch.empty(*shape, dtype=dtype, device=device, **kwargs)
        return self._made[key]


class _Countdown:
    """A timestep read that costs nothing: each forward one below the last (for ``PendingTimestep.value``)."""

    def __init__(self):
        self.next = 900.0

    def __call__(self, *_pending) -> float:
        self.next -= 1e-3
        return self.next


def _cached_output(query_of):
    """A stand-in for an attention function: an empty tensor shaped as its query, one per shape (no kernel)."""
    made: dict = {}

    def attention(*args, **kwargs):
        q = query_of(*args, **kwargs)
        key = (q.shape, q.dtype, q.device)
        if key not in made:
            made[key] = torch.empty_like(q)
        return made[key]
    return attention


def ablations() -> dict[str, tuple[str, ...] | callable]:
    """Variant name -> factory of the context that takes the piece out, and which models it applies to."""
    from litepatch import layer_patch, root_patch, runtime
    from litepatch.adapters import base, diffusers as diffusers_adapter
    from litepatch.context import PendingTimestep
    from litepatch.kernels import cute_fwd, cute_sm90

    def no_records():  # Runtime.flush without records: only the deferred commits go out
        def flush(self):
            from litepatch.kernels import commits

            commits.flush()
            for layer in self.layers.values():
                layer.last_call = None
        return mock.patch.object(runtime.Runtime, "flush", flush)

    def classify_once():  # each layer's first answer, kept
        real, answers = layer_patch.LayerPatch.classify, {}

        def classify(self, call, compiling=False):
            if self not in answers:
                answers[self] = real(self, call, compiling)
            return answers[self]
        return mock.patch.object(layer_patch.LayerPatch, "classify", classify)

    def direct_repeat():  # lite_attention's front (checks, settings, _Repeat.run_if_same) skipped
        real = layer_patch.lite_attention

        def lite_attention(q, k, v, state, **kwargs):
            if state is not None and state.repeat is not None:
                return state.repeat.run(q, k, v, False)[0]
            return real(q, k, v, state, **kwargs)
        return mock.patch.object(layer_patch, "lite_attention", lite_attention)

    def no_token_counter():
        return mock.patch.object(base.TokenCounter, "__call__", lambda self, args, kwargs: (None, None))

    def no_mask_check():
        real = diffusers_adapter.mask_problem
        return mock.patch.object(diffusers_adapter, "mask_problem",
                                 lambda mask, batch, seq_k: (None, None) if mask is None else real(mask, batch, seq_k))

    return {
        # both paths
        "records (Runtime.flush: stats)": no_records,
        "timestep copy and read (PendingTimestep)": lambda: _patches(
            mock.patch.object(PendingTimestep, "start", lambda self, source: self),
            mock.patch.object(PendingTimestep, "value", _Countdown())),
        "check_reach (pre-hook)": lambda: mock.patch.object(root_patch.RootPatch, "check_reach", lambda self: None),
        "classify (answered once per layer)": classify_once,
        "TokenCounter (adapter)": no_token_counter,
        "mask_problem (adapter)": no_mask_check,
        "output allocations (torch.empty, cached)": lambda: mock.patch.object(cute_sm90, "torch", _CachedEmpty()),
        # sparse path
        "lite_attention front (checks, run_if_same)": direct_repeat,
        "the whole lite_attention call": lambda: mock.patch.object(
            layer_patch, "lite_attention", _cached_output(lambda q, *args, **kwargs: q)),
        "TMA check of q, k, v (all_tma_ready)": lambda: mock.patch.object(cute_sm90, "all_tma_ready",
                                                                          lambda q, k, v: True),
        "deferral bookkeeping (stream, device)": lambda: _patches(
            mock.patch.object(cute_fwd, "_stream_of", lambda device: 0),
            mock.patch.object(cute_fwd, "current_device", lambda: 0)),
        "batched commit launch (per forward)": lambda: mock.patch.object(cute_fwd, "_launch_batch",
                                                                         lambda *args: None),
        # dense path
        "TMA inputs (tma_inputs, dense)": lambda: mock.patch.object(cute_sm90, "tma_inputs",
                                                                    lambda q, k, v: (q, k, v)),
        "the whole dense kernel call (fast_dense)": lambda: mock.patch.object(
            layer_patch, "fast_dense", _cached_output(lambda call: call.q)),
        "flash-attn-4 (the model's own SDPA instead)": lambda: mock.patch.object(
            layer_patch, "fast_dense", lambda call: None),
    }


SPARSE_ONLY = (
    "lite_attention front", "the whole lite_attention", "TMA check", "deferral bookkeeping", "batched commit")
DENSE_ONLY = ("TMA inputs", "the whole dense", "flash-attn-4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--iters", type=int, default=2, help="forwards per variant and round")
    parser.add_argument("--layers", type=int, default=TINY_WAN["num_layers"])
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="thread",
                        help="the CPU time of the thread that runs the forwards (default: steadier on a shared host), "
                             "or the wall clock")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_ablation.py times the GPU path (CuTe kernels): it needs a CUDA GPU")
    warnings.simplefilter("ignore")
    import diffusers

    import litepatch

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**dict(TINY_WAN, num_layers=args.layers)).to("cuda", torch.bfloat16).eval()
    latents = torch.randn(1, 16, 2, 32, 32, device="cuda", dtype=torch.bfloat16)  # 512 tokens
    text = torch.randn(1, 16, 32, device="cuda", dtype=torch.bfloat16)
    models, settings, model_of = {"unpatched": model}, {}, {}
    for path, threshold in (("sparse", -4.0), ("dense", float("-inf"))):
        patched = copy.deepcopy(model)
        litepatch.apply(patched, threshold=threshold, warmup_steps=0)
        models[path] = patched
        for name, factory in ablations().items():
            if name.startswith(DENSE_ONLY if path == "sparse" else SPARSE_ONLY):
                continue
            variant = f"{path} without {name}"
            models[variant], settings[variant], model_of[variant] = patched, factory, path
    clock = _SharedTimesteps(latents, text, args.iters, torch.cuda.synchronize, CLOCKS[args.clock], model_of=model_of)
    times = clock.paired_rounds(models, args.rounds, settings)
    layers = args.layers
    print(f"{torch.cuda.get_device_name()}, tiny Wan, {layers} self-attention layers, 512 tokens; {args.rounds} "
          f"paired rounds of {args.iters} forwards per variant, {args.clock} clock; unpatched "
          f"{statistics.median(times['unpatched']):.0f} us per forward")
    results: dict = {}
    for path in ("sparse", "dense"):
        added = added_per_call(times[path], times["unpatched"], layers)
        print(f"{path} path, as it is: {added[0]:+.1f} us per attention call over unpatched "
              f"(quartiles {added[1]:+.1f} .. {added[2]:+.1f}); saved per call by taking out:")
        results[path] = {"added_us_per_call": added, "saved_us_per_call": {}}
        for variant in models:
            if model_of.get(variant) != path:
                continue
            saved = added_per_call(times[path], times[variant], layers)
            results[path]["saved_us_per_call"][variant] = saved
            low, high = saved[1:]
            print(f"  {variant[len(path) + 9:]:<44} {saved[0]:+6.1f} us  (quartiles {low:+.1f} .. {high:+.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "layers": layers, "rounds": args.rounds,
                       "forwards_per_round": args.iters, "clock": args.clock, "results": results,
                       "us_per_forward_per_round": times},
                      f, indent=1)


if __name__ == "__main__":
    main()
