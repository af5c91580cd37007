"""What one forward of a demo model asks of a GPU, counted on any machine: kernels and bytes moved outside attention.

The video demo's end-to-end speed-up is capped by the share of a step that is not attention (issue 16). This
counts, on meta tensors (no memory, no GPU, a second), each torch call of one forward as one kernel (views and
shape queries excluded) and the bytes it reads and writes (its tensor arguments and results), for the eager
forward and for ``DemoDiT.fuse_pointwise()``, where each compiled region between attention calls counts as its
GEMMs plus one kernel that reads the region's inputs once and writes its results once (a lower bound: a compiler
may need more than one elementwise kernel where a GEMM sits between two elementwise parts). At the end: those
bytes at a stated memory bandwidth, the attention FLOPs at a stated attention throughput, and the kernel count
times a stated host cost per launch, so which of the three bounds a forward is explicit; the GPU run of ``litepatch demo`` then says which held.

Example:
    $ python benchmarks/demo_forward_census.py --model video
    $ python benchmarks/demo_forward_census.py --model video --batch 2 --bandwidth-tbs 3.0 --host-us 10
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

from litepatch.demo import model as demo

# torch calls that make no kernel: views, shape and metadata queries
NO_KERNEL = {
    "view", "transpose", "unflatten", "expand", "t", "permute", "unbind", "select", "flatten", "split", "unsqueeze",
    "squeeze", "reshape", "view_as_real", "chunk", "detach", "is_inference", "data_ptr", "get_device", "dim", "size",
    "numel", "element_size", "is_floating_point", "__get__", "__getitem__", "__len__", "__bool__", "__format__",
    "__hash__", "__eq__",
}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _bytes(*values) -> int:
    return sum(t.numel() * t.element_size() for value in values for t in _tensors(value))


class Census(TorchFunctionMode):
    """Kernels and bytes per torch call name; calls inside a fused region count as that region, except its GEMMs."""

    def __init__(self):
        super().__init__()
        self.kernels, self.moved, self.fused_depth, self.counting = Counter(), Counter(), 0, False

    def record(self, name: str, moved: int) -> None:
        if self.counting:
            self.kernels[name] += 1
            self.moved[name] += moved

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if (self.fused_depth == 0 or name == "linear") and name not in NO_KERNEL:
            self.record("attention" if name == "scaled_dot_product_attention" else name, _bytes(args, kwargs, out))
        return out


def _fused_ops(census: Census) -> demo.BlockOps:
    """:data:`~litepatch.demo.model.EAGER_OPS` with each region counted as its GEMMs and one kernel."""
    def counted(function, name):
        def run(*args, **kwargs):
            census.fused_depth += 1
            try:
                out = function(*args, **kwargs)
            finally:
                census.fused_depth -= 1
            # the RoPE tables and modulation vectors are read too; small tensors (per-row scales) are not counted
            census.record(f"fused {name}", _bytes([t for t in _tensors((args, kwargs)) if t.numel() > 4096], out))
            return out
        return run
    return demo.BlockOps(*(counted(getattr(demo.EAGER_OPS, f.name), f.name)
                           for f in dataclasses.fields(demo.BlockOps)))


def census(model_name: str, batch: int, fused: bool) -> Census:
    """The second forward's count (the first also builds the RoPE tables)."""
    cfg = demo.preset(model_name)
    counter = Census()
    with torch.device("meta"):
        model = demo.DemoDiT(cfg).to(torch.bfloat16)
    if fused:
        ops = _fused_ops(counter)
        for block in model.blocks:
            block.ops = block.self_attn.ops = block.cross_attn.ops = ops
    latents = torch.empty(batch, cfg.in_channels, cfg.frames, cfg.height, cfg.width, device="meta",
                          dtype=torch.bfloat16)
    cond = torch.zeros(batch, len(cfg.cond_vocab), dtype=torch.long, device="meta")
    with torch.no_grad(), counter:
        for counting in (False, True):
            counter.counting = counting
            model(latents, timestep=torch.full((batch,), 500.0, device="meta"), cond=cond)
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="video", choices=sorted(demo.PRESETS))
    parser.add_argument("--batch", type=int, default=1, help="1: one CFG branch per forward; 2: batched CFG")
    parser.add_argument("--bandwidth-tbs", type=float, default=3.0,
                        help="memory bandwidth elementwise kernels reach, TB/s (an H200 has 4.8 at most)")
    parser.add_argument("--attention-tflops", type=float, default=600.0,
                        help="dense attention throughput, TFLOP/s (flash-attn-4 on an H200 at video shapes)")
    parser.add_argument("--host-us", type=float, default=10.0, help="host time per eager kernel launch, us")
    args = parser.parse_args()
    cfg = demo.preset(args.model)
    flop = 4.0 * args.batch * cfg.heads * cfg.seq_len ** 2 * cfg.head_dim * cfg.layers  # QK^T and PV
    attention_ms = flop / (args.attention_tflops * 1e12) * 1e3
    print(f"{args.model} model, batch {args.batch}, bf16: {cfg.seq_len} tokens, {cfg.layers} self-attention layers; "
          f"self-attention {flop / 1e12:.2f} TFLOP per forward = {attention_ms:.2f} ms at {args.attention_tflops:.0f} "
          "TFLOP/s")
    for fused in (False, True):
        counted = census(args.model, args.batch, fused)
        kernels = sum(counted.kernels.values()) - counted.kernels["attention"]
        moved = sum(counted.moved.values()) - counted.moved["attention"]
        memory_ms, host_ms = moved / (args.bandwidth_tbs * 1e12) * 1e3, kernels * args.host_us / 1e3
        share = attention_ms / (attention_ms + memory_ms)
        label = "fuse_pointwise() regions" if fused else "eager"
        print(f"\n{label}: {kernels} kernels besides attention, {moved / 1e9:.2f} GB "
              f"moved = {memory_ms:.2f} ms at {args.bandwidth_tbs} TB/s; host {host_ms:.2f} ms at {args.host_us} us per "
              f"launch; GPU-bound attention share {share:.0%}")
        for name, moved_by in counted.moved.most_common(8):
            print(f"  {name:<32} {counted.kernels[name]:4d} kernels {moved_by / 1e6:9.1f} MB")
        if host_ms >= attention_ms + memory_ms:
            print("  host-bound at these rates: the host issues kernels slower than the GPU runs them, so skipping "
                  "tiles does not shorten the forward")
            continue
        # end-to-end speed-up at kept fraction k if the forward is GPU-bound: (A + M) / (A k + M)
        gains = ", ".join(f"k={k}: {(attention_ms + memory_ms) / (attention_ms * k + memory_ms):.2f}x"
                          for k in (0.6, 0.5, 0.4))
        print(f"  GPU-bound speed-up from skipping alone (attention time x k): {gains}")
    print("\n(counts: one kernel per torch call; flash-attn-4's attention itself is not counted as bytes)")


if __name__ == "__main__":
    main()
