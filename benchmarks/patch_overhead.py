"""Host time the patcher adds per attention call, on a GPU (issue 4: the product must not stall long runs).

A tiny diffusers Wan transformer (random weights) at a short sequence is host-bound: its forward time is
launch and Python overhead, so ``(patched - unpatched) / attention calls`` is what the patcher adds per
call (interception, plan, state lookup, two kernel launches, stats record), for threshold -inf (the
kernel without the skip test) and -4. ``syncs`` counts the host-device synchronisations torch reports in
one forward.

Example:
    $ python benchmarks/patch_overhead.py --json bench-out/patch_overhead.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=128, num_layers=8, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=64,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="print the host profile of patched forwards")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import diffusers

    import litepatch

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY_WAN).to("cuda", torch.bfloat16).eval()
    latents = torch.randn(1, 16, 2, 32, 32, device="cuda", dtype=torch.bfloat16)  # 512 tokens
    text = torch.randn(1, 16, 32, device="cuda", dtype=torch.bfloat16)
    timesteps = [torch.full((1,), 999.0 - i, device="cuda") for i in range(args.iters)]

    @torch.inference_mode()
    def per_forward_ms() -> float:
        for t in timesteps[:5]:
            model(hidden_states=latents, timestep=t, encoder_hidden_states=text, return_dict=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for t in timesteps:
            model(hidden_states=latents, timestep=t, encoder_hidden_states=text, return_dict=False)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(timesteps) * 1e3

    rows = {"unpatched": per_forward_ms()}
    layers = TINY_WAN["num_layers"]
    for threshold in (float("-inf"), -4.0):
        handle = litepatch.apply(model, threshold=threshold, warmup_steps=0)
        rows[f"patched {threshold}"] = per_forward_ms()
        if args.profile and threshold > float("-inf"):
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(per_forward_ms)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        handle.remove()
    calls = per_call_host_us()
    print(f"{torch.cuda.get_device_name()}, tiny Wan, {layers} self-attention layers, 512 tokens")
    for name, ms in rows.items():
        extra = "" if name == "unpatched" else f"  +{(ms - rows['unpatched']) / layers * 1e3:.0f} us per attention call"
        print(f"{name:<16} {ms:7.2f} ms per forward{extra}")
    print("host time per attention call, [1, 512, 2, 64] bf16 (the GPU part is a few microseconds):")
    for name, us in calls.items():
        print(f"  {name:<44} {us:7.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "layers": layers, "ms_per_forward": rows,
                       "host_us_per_call": calls}, f, indent=1)


@torch.inference_mode()
def per_call_host_us(iters: int = 2000) -> dict[str, float]:
    """Host microseconds per call of each layer of the attention stack, at a tiny shape."""
    import math

    from litepatch.kernels import SkipState, lite_attention, registry

    q, k, v = (torch.randn(1, 512, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    state = SkipState()
    lite_attention(q, k, v, state, threshold=-4.0)
    args = (q, k, v, state.keep, state.anchor, state.kept, *state.must_masks(q.device))
    kw = dict(block_m=state.tiles.block_m, block_n=state.tiles.block_n, threshold=-4.0,
              softmax_scale=1 / math.sqrt(64), use_anchor=True, descending=False)
    candidates = {
        "SDPA (reference point)": lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt),
        "triton_forward (2 launches)": lambda: registry.get("triton").forward(*args, **kw),
        "torch.ops.litepatch.lite_attention_fwd": lambda: torch.ops.litepatch.lite_attention_fwd(
            *args, None, "triton", kw["block_m"], kw["block_n"], -4.0, kw["softmax_scale"], True, False),
        "lite_attention (checks + state + custom op)": lambda: lite_attention(q, k, v, state, threshold=-4.0),
    }
    out = {}
    for name, fn in candidates.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        out[name] = (time.perf_counter() - start) / iters * 1e6
        torch.cuda.synchronize()
    return out


if __name__ == "__main__":
    main()
