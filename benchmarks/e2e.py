"""End-to-end benchmark (issue 4): diffusers WanTransformer3DModel, Wan2.1-1.3B config, random weights.

480p / 81 frames (latents [1, 16, 21, 60, 104] -> 32,760 tokens), a ``--steps``-step loop with
sequential CFG (a cond and an uncond forward per step, as the Wan pipeline runs them), bf16 on CUDA:

* dense: the model unpatched (SDPA as diffusers calls it: default backend, and cuDNN forced);
* patched with ``litepatch.apply`` at forced kept fractions k: after one call creates the skip states,
  every layer's ``SkipState.keep`` is set to a band of round(k·KT) key tiles around each q-tile's
  diagonal. Every patched call writes lists: the default ``--threshold=-1e30`` runs the vote on every tile and
  drops nothing more (write it with "=": argparse reads "-1e30" alone as an option). ``-inf`` is not a choice
  here: the patcher runs such calls on the fastest dense kernel and keeps no lists;
* the attention share of a dense step (30 layers x one attention call at this shape, timed alone,
  over the step time), and the Amdahl prediction ``step(k) = step(1) - layers x (attn(1) - attn(k))``
  against the measured step time.

Forcing the kept fraction writes the read lists of ``handle.skip_states()`` (the patcher's live
per-layer, per-branch :class:`SkipState`) after one call per branch has created them.

Usage::

    python benchmarks/e2e.py --json e2e.json [--steps 10] [--fractions 1.0 0.5 0.25 0.1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)


def run_loop(model, latents, text, steps: int) -> float:
    """Seconds per step of a ``steps``-step sequential-CFG loop (one warm-up step not counted)."""
    timesteps = torch.linspace(999, 1, steps + 1, device=latents.device)
    times = []
    for i, t in enumerate(timesteps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        tt = t.expand(latents.shape[0])
        with model.cache_context("cond") if hasattr(model, "cache_context") else _null():
            model(hidden_states=latents, timestep=tt, encoder_hidden_states=text[0], return_dict=False)
        with model.cache_context("uncond") if hasattr(model, "cache_context") else _null():
            model(hidden_states=latents, timestep=tt, encoder_hidden_states=text[1], return_dict=False)
        torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--json", default="e2e_bench.json")
    parser.add_argument("--threshold", type=float, default=-1e30)
    args = parser.parse_args(argv)

    from diffusers import WanTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import litepatch
    from litepatch.kernels import SkipState, dense_attention, lite_attention, pack_bits, registry

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from kernel import banded_read_list, bench

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = WanTransformer3DModel(**WAN_1_3B).to(device=device, dtype=torch.bfloat16).eval()
    latents = torch.randn(1, 16, 21, 60, 104, device=device, dtype=torch.bfloat16)
    text = torch.randn(2, 1, 512, 4096, device=device, dtype=torch.bfloat16)
    seq = 21 * 30 * 52
    heads, dim, layers = 12, 128, 30
    res = {"gpu": torch.cuda.get_device_name(device), "config": "Wan2.1-1.3B, 480p 81 frames, 32760 tokens",
           "steps": args.steps, "cfg": "sequential"}
    with torch.inference_mode():
        res["dense_step_s"] = run_loop(model, latents, text, args.steps)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            res["dense_cudnn_step_s"] = run_loop(model, latents, text, args.steps)

        # attention alone at this shape: SDPA (default and cuDNN) and ours at each forced fraction
        q, k, v = (torch.randn(1, heads, seq, dim, device=device, dtype=torch.bfloat16) for _ in range(3))
        attn = {"sdpa_default": bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), 2, 10)}
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            attn["sdpa_cudnn"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), 2, 10)
        qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
        attn["dense_attention"] = bench(lambda: dense_attention(qs, ks, vs), 2, 10)
        res["backend"] = registry.select(qs, seq).name
        state = SkipState()
        lite_attention(qs, ks, vs, state, threshold=-math.inf)
        tiles = state.tiles
        bands = {}
        for fraction in args.fractions:
            band = banded_read_list(1, heads, state.q_tiles, state.k_tiles, fraction, tiles.block_m, tiles.block_n,
                                    device)
            bands[fraction] = pack_bits(band)
            state.set_read_words(bands[fraction])
            attn[f"ours_k{fraction}"] = bench(lambda: lite_attention(qs, ks, vs, state, threshold=args.threshold), 2, 10)
        res["attention_ms"] = attn
        res["attention_share_dense"] = layers * 2 * attn["sdpa_default"] / 1e3 / res["dense_step_s"]
        del q, k, v

        handle = litepatch.apply(model, threshold=args.threshold, warmup_steps=0)
        patched = {}
        for fraction in args.fractions:
            handle.reset()
            tt = torch.full((1,), 999.0, device=device)
            with model.cache_context("cond"):
                model(hidden_states=latents, timestep=tt, encoder_hidden_states=text[0], return_dict=False)
            with model.cache_context("uncond"):
                model(hidden_states=latents, timestep=tt, encoder_hidden_states=text[1], return_dict=False)
            n_states = 0
            for branches in handle.skip_states().values():
                for st in branches.values():
                    st.set_read_words(bands[fraction])
                    n_states += 1
            handle.clear_stats()
            step_s = run_loop(model, latents, text, args.steps)
            kept = handle.stats().kept_fraction()
            predicted = res["dense_step_s"] - layers * 2 * (attn["sdpa_default"] - attn[f"ours_k{fraction}"]) / 1e3
            patched[str(fraction)] = dict(
                step_s=step_s, kept_fraction=kept, states=n_states, speedup=res["dense_step_s"] / step_s,
                predicted_step_s=predicted, predicted_speedup=res["dense_step_s"] / predicted)
        handle.remove()
        res["patched"] = patched
    with open(args.json, "w") as fh:
        json.dump(res, fh, indent=2)
    a = attn
    print(f"\nGPU: {res['gpu']}; {res['config']}; {args.steps} steps, sequential CFG, bf16, random weights; "
          f"backend {res['backend']}, threshold {args.threshold}")
    print(f"dense step: {res['dense_step_s']:.3f} s (SDPA default), {res['dense_cudnn_step_s']:.3f} s (SDPA cuDNN)")
    print(f"attention alone per call: SDPA default {a['sdpa_default']:.2f} ms, cuDNN {a['sdpa_cudnn']:.2f} ms; "
          f"attention share of a dense step {100 * res['attention_share_dense']:.0f}%")
    print(f"{'k':>6}{'kept':>8}{'ours attn ms':>14}{'step s':>9}{'speed-up':>10}{'Amdahl pred.':>14}")
    for fraction, row in patched.items():
        print(f"{fraction:>6}{row['kept_fraction']:>8.3f}{a['ours_k' + fraction]:>14.2f}{row['step_s']:>9.3f}"
              f"{row['speedup']:>10.3f}{row['predicted_speedup']:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
