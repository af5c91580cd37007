"""Where the patcher's host time per attention call goes, measured by taking pieces out (issue 13's host target).

``patch_overhead.py --trace`` names the functions, but the profiler adds several microseconds to every range and
op, more than most of them cost (``SkipState.count_call``, one ``+= 1``, read 10 us per call under it). Here each
piece is taken out instead (a ``mock.patch`` for the blocks of that variant: a no-op, a cached answer, a constant)
and whole forwards of the tiny Wan are timed in paired rounds with the patched model as it is
(:class:`patch_overhead.ForwardClock`, every variant in each round, each round in a random order: in a rotation the
variants of one model mostly follow each other, and read faster than the model itself). A variant's saving per call,
``(patched - variant) / layers``, is what that piece costs inside real forwards, cache-cold, without a profiler. The
``nothing (control)`` variant takes nothing out: it reads zero but for the run's noise, the scale to read the others
by. Timed by the CPU time of the forwards' thread by default (``--clock``).

The variants time the same model object (its skip states and plans carry on), sharing that model's decreasing
timesteps, so the step tracker sees one long generation. Taking a piece out is for timing only: outputs, lists and
statistics are then wrong. ``--cpu`` times the pieces that exist without a GPU, around patch_overhead.py's null
kernel.

On this repository's 2-core CPU (30 rounds) the control spread over +-30 us per call, more than any single piece of
the patcher's Python costs: only the GPU hosts' runs (and more rounds) resolve them.

Example (a GPU with the ``cuda`` extra and diffusers):
    $ python benchmarks/host_ablation.py --rounds 60
    $ python benchmarks/host_ablation.py --layers 30 --rounds 40 --json bench-out/host_ablation_L30.json
    $ python benchmarks/host_ablation.py --cpu --rounds 30
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import statistics
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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
        values = self._timestep_values(self.model_of.get(name, name))
        timesteps = [torch.full((1,), value, device=self.latents.device) for value in values]
        _HOST_VALUES.clear()  # each tensor's value by its address, for a timestep read that costs nothing
        _HOST_VALUES.update((t.data_ptr(), value) for t, value in zip(timesteps, values))
        return timesteps


# The values of the block's timesteps by their tensors' addresses, and the one the running forward copies: the
# timestep ablation's read gives the forward its own value, without the copy or a sync (a stand-in value that did
# not follow the clock's would reach the step tracker as a new generation: states reset, calls through the forward)
_HOST_VALUES: dict[int, float] = {}
_STARTED: list[float] = []


def _start_without_copy(pending, source: torch.Tensor):
    value = _HOST_VALUES.get(source.data_ptr())
    if value is None:
        raise RuntimeError("host_ablation: a forward's timestep is not one the clock made; the timestep ablation "
                           "cannot stand in for its read")
    _STARTED[:] = [value]
    return pending


def _read_without_sync(pending) -> float:
    return _STARTED[0]


def _patches(*patches) -> contextlib.AbstractContextManager:
    """The ``mock.patch`` objects ``patches`` entered together."""
    stack = contextlib.ExitStack()
    for patch in patches:
        stack.enter_context(patch)
    return stack


class _CachedEmpty:
    """``torch`` as a module sees it, except ``empty`` and ``empty_like``: one tensor per (shape, dtype, device), made
    once."""

    def __init__(self):
        self._made: dict = {}

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *shape, dtype=None, device=None, **kwargs):
        key = (shape, dtype, device)
        if key not in self._made:
            self._made[key] = torch.empty(*shape, dtype=dtype, device=device, **kwargs)
        return self._made[key]

    def empty_like(self, t: torch.Tensor, **kwargs):
        key = (t.shape, t.dtype, t.device)
        if key not in self._made:
            self._made[key] = torch.empty_like(t, **kwargs)
        return self._made[key]


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


BOTH, SPARSE, DENSE = ("sparse", "dense"), ("sparse",), ("dense",)


def ablations(gpu: bool = True) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """Variant name -> (the paths it applies to, factory of the context that takes the piece out). ``gpu=False``: the
    pieces a CPU run has (no CuTe backend, timesteps read at once)."""
    from litepatch import layer_patch, root_patch, runtime
    from litepatch.adapters import base, diffusers as diffusers_adapter

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

    def no_again_key():  # attend_again's comparison of the call with the one it repeats: every call matches
        return mock.patch.object(layer_patch, "_again_key", lambda *args: ())

    def no_token_counter():
        return mock.patch.object(base.TokenCounter, "__call__", lambda self, args, kwargs: (None, None))

    def no_mask_check():
        real = diffusers_adapter.mask_problem
        return mock.patch.object(diffusers_adapter, "mask_problem",
                                 lambda mask, batch, seq_k: (None, None) if mask is None else real(mask, batch, seq_k))

    found = {
        # a control: the same model and setting under another name, nothing taken out (reads 0 but for noise)
        "nothing (control)": (BOTH, contextlib.nullcontext),
        "records (Runtime.flush: stats)": (BOTH, no_records),
        "check_reach (pre-hook)": (BOTH, lambda: mock.patch.object(root_patch.RootPatch, "check_reach",
                                                                   lambda self: None)),
        "classify (answered once per layer)": (BOTH, classify_once),
        "TokenCounter (adapter)": (BOTH, no_token_counter),
        "mask_problem (adapter)": (BOTH, no_mask_check),
        "attend_again's key (the call compared)": (SPARSE, no_again_key),
        "the whole kernel call (repeat_call)": (SPARSE, lambda: mock.patch.object(
            layer_patch, "repeat_call", _cached_output(lambda state, repeat, q, *args: q))),
    }
    return {**found, **_gpu_ablations()} if gpu else found


def _gpu_ablations() -> dict[str, tuple[tuple[str, ...], Callable]]:
    """The pieces of the GPU path: the timestep copy, the CuTe backend's and flash-attn-4's launches."""
    from litepatch import layer_patch
    from litepatch.context import PendingTimestep
    from litepatch.kernels import cute_fwd, cute_sm90

    return {
        "timestep copy and read (PendingTimestep)": (BOTH, lambda: _patches(
            mock.patch.object(PendingTimestep, "start", _start_without_copy),
            mock.patch.object(PendingTimestep, "value", _read_without_sync))),
        "output allocations (torch.empty, cached)": (BOTH, lambda: mock.patch.object(cute_sm90, "torch",
                                                                                     _CachedEmpty())),
        "TMA check of q, k, v (all_tma_ready)": (SPARSE, lambda: mock.patch.object(cute_sm90, "all_tma_ready",
                                                                                   lambda q, k, v: True)),
        "deferral bookkeeping (stream, device)": (SPARSE, lambda: _patches(
            mock.patch.object(cute_fwd, "_stream_of", lambda device: 0),
            mock.patch.object(cute_fwd, "current_device", lambda: 0))),
        "batched commit launch (per forward)": (SPARSE, lambda: mock.patch.object(cute_fwd, "_launch_batch",
                                                                                  lambda *args: None)),
        "TMA inputs (tma_inputs, dense)": (DENSE, lambda: mock.patch.object(cute_sm90, "tma_inputs",
                                                                            lambda q, k, v: (q, k, v))),
        "the whole dense kernel call (fast_dense)": (DENSE, lambda: mock.patch.object(
            layer_patch, "fast_dense", _cached_output(lambda call: call.q))),
        "flash-attn-4 (the model's own SDPA instead)": (DENSE, lambda: mock.patch.object(
            layer_patch, "fast_dense", lambda call: None)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--iters", type=int, default=2, help="forwards per variant and round")
    parser.add_argument("--layers", type=int, default=TINY_WAN["num_layers"])
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="thread",
                        help="the CPU time of the thread that runs the forwards (default: steadier on a shared host), "
                             "or the wall clock")
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU with patch_overhead.py's null kernel: the pieces without a GPU kernel")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("host_ablation.py times the GPU path (CuTe kernels) on a CUDA GPU; --cpu times the rest")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    setup = _cpu_setup(args.layers) if args.cpu else _gpu_setup(args.layers)
    models, settings, model_of = dict(setup.references), dict(setup.reference_settings), {}
    for path, (patched, base_setting) in setup.paths.items():
        models[path], settings[path] = patched, base_setting
        for name, (paths, factory) in ablations(gpu=not args.cpu).items():
            if path in paths:
                variant = f"{path} without {name}"
                models[variant], model_of[variant] = patched, path
                settings[variant] = functools.partial(_both, base_setting, factory)
    clock = _SharedTimesteps(setup.latents, setup.text, args.iters, setup.synchronize, CLOCKS[args.clock],
                             model_of=model_of)
    times = clock.paired_rounds(models, args.rounds, settings, shuffle=True)
    print(f"{setup.device}, tiny Wan, {args.layers} self-attention layers, {setup.tokens} tokens; {args.rounds} "
          f"paired rounds of {args.iters} forwards per variant, {args.clock} clock; unpatched "
          f"{statistics.median(times['unpatched']):.0f} us per forward")
    results = {path: _print_path(path, times, setup.reference_of[path], model_of, args.layers) for path in setup.paths}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": setup.device, "layers": args.layers, "rounds": args.rounds,
                       "forwards_per_round": args.iters, "clock": args.clock, "results": results,
                       "us_per_forward_per_round": times}, f, indent=1)


def _both(first, second) -> contextlib.AbstractContextManager:
    return _patches(first(), second())


def _print_path(path: str, times: dict, reference: str, model_of: dict, layers: int) -> dict:
    """Prints (and returns) a path's added time over its unpatched reference and each variant's saving."""
    added = added_per_call(times[path], times[reference], layers)
    print(f"{path} path, as it is: {added[0]:+.1f} us per attention call over {reference} "
          f"(quartiles {added[1]:+.1f} .. {added[2]:+.1f}); saved per call by taking out:")
    saved_by = {}
    for variant, of in model_of.items():
        if of == path:
            median, low, high = saved_by[variant] = added_per_call(times[path], times[variant], layers)
            print(f"  {variant[len(path) + 9:]:<44} {median:+6.1f} us  (quartiles {low:+.1f} .. {high:+.1f})")
    return {"added_us_per_call": added, "saved_us_per_call": saved_by}


@dataclass
class _Setup:
    """The models of one run: the unpatched references, and per path its patched model and base setting."""

    device: str
    tokens: int
    latents: torch.Tensor
    text: torch.Tensor
    synchronize: Callable
    references: dict  # name -> unpatched model
    reference_settings: dict  # name -> setting factory
    reference_of: dict  # path -> the reference it is compared with
    paths: dict  # path -> (patched model, setting factory)


def _gpu_setup(layers: int) -> _Setup:
    import diffusers

    import litepatch

    model = diffusers.WanTransformer3DModel(**dict(TINY_WAN, num_layers=layers)).to("cuda", torch.bfloat16).eval()
    latents = torch.randn(1, 16, 2, 32, 32, device="cuda", dtype=torch.bfloat16)  # 512 tokens
    text = torch.randn(1, 16, 32, device="cuda", dtype=torch.bfloat16)
    paths = {}
    for path, threshold in (("sparse", -4.0), ("dense", float("-inf"))):
        patched = copy.deepcopy(model)
        litepatch.apply(patched, threshold=threshold, warmup_steps=0)
        paths[path] = (patched, contextlib.nullcontext)
    return _Setup(torch.cuda.get_device_name(), 512, latents, text, torch.cuda.synchronize, {"unpatched": model}, {},
                  {"sparse": "unpatched", "dense": "unpatched"}, paths)


def _cpu_setup(layers: int) -> _Setup:
    """patch_overhead.py --cpu's models: the null kernel on the sparse path, compared with a null SDPA (cross
    attention, which stays dense, null on both sides); the dense (warm-up) path with the model's own SDPA."""
    import diffusers

    import litepatch
    from patch_overhead import CPU_WAN, NULL_BACKEND, _register_null_backend

    torch.set_num_threads(1)
    _register_null_backend()
    model = diffusers.WanTransformer3DModel(**dict(CPU_WAN, num_layers=layers)).eval()
    latents, text = torch.randn(1, 4, 1, 16, 16), torch.randn(1, 16, 16)  # 64 tokens: host-bound
    null_sdpa = functools.partial(mock.patch.object, torch.nn.functional, "scaled_dot_product_attention",
                                  lambda query, key, value, **kwargs: query)
    sparse, dense = copy.deepcopy(model), copy.deepcopy(model)
    litepatch.apply(sparse, threshold=-4.0, warmup_steps=0, backend=NULL_BACKEND)
    litepatch.apply(dense, threshold=-4.0, warmup_steps=10**6, backend=NULL_BACKEND)
    return _Setup("CPU (1 thread, null kernel)", 64, latents, text, lambda: None,
                  {"unpatched": model, "unpatched, null SDPA": copy.deepcopy(model)},
                  {"unpatched, null SDPA": null_sdpa}, {"sparse": "unpatched, null SDPA", "dense": "unpatched"},
                  {"sparse": (sparse, null_sdpa), "dense": (dense, contextlib.nullcontext)})


if __name__ == "__main__":
    main()
