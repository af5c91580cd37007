"""LiteAttention kernel benchmark (issue 4): one run, one table, one JSON.

Rows, at the Wan2.1-14B-720p shape (B1, H40, S=75,600, D=128) and the Wan2.1-1.3B-480p shape
(B1, H12, S=32,760, D=128), bf16:

* dense TFLOP/s (4·B·H·S²·D per call) of ours (threshold -inf, every tile), SDPA flash, SDPA cuDNN,
  flash-attn when installed, and the ratios ours/each;
* forced kept fractions k: the read list set directly to a band of round(k·KT) key tiles around each
  q-tile's diagonal (video-like locality); our time / our dense time, and FlexAttention with the same
  128x64 block mask (compiled), time / its own dense time and ours/flex;
* the skip test's overhead at k = 1.0 (test and list writing on, with a threshold no tile fails, vs off);
* bytes of skip state per layer per branch.

Usage::

    python benchmarks/kernel.py --json kernel.json            # the issue's rows
    python benchmarks/kernel.py --sweep                       # also warps/stages/tile sweep

Timing: CUDA events around each call; the calls compared in a row run interleaved, one of each per\nround, and a ratio is the median over ``--reps`` rounds of the ratio within a round (robust to clock\nand power drift on a shared GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"wan14b-720p": (1, 40, 75600, 128), "wan1.3b-480p": (1, 12, 32760, 128)}
FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.1, 0.05)


def bench(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    return statistics.median(interleaved({"fn": (None, fn)}, warmup, reps)["fn"])


def interleaved(calls: dict, warmup: int, reps: int) -> dict[str, list[float]]:
    """Milliseconds of each ``name: (setup, fn)`` over ``reps`` rounds, one call of each per round.

    Interleaving makes the ratios robust to clock and power drift on a shared GPU: a ratio is taken
    within a round (see :func:`median_ratio`). ``setup()`` (e.g. writing a read list) is not timed.
    """
    for _ in range(warmup):
        for setup, fn in calls.values():
            if setup:
                setup()
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        # Keep the GPU busy while the host queues the round, so that each pair of events brackets
        # kernel time only, not the host's launch overhead (hundreds of microseconds per patched call
        # on the device's host, more than a whole call at Flux's shape): ~25 ms covers a round of 30 calls.
        torch.cuda._sleep(50_000_000)
        events = []
        for setup, fn in calls.values():
            if setup:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        for name, (start, end) in zip(calls, events):
            times[name].append(start.elapsed_time(end))
    return times


def median_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``time[num] / time[den]`` measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def banded_read_list(batch, heads, q_tiles, k_tiles, fraction, block_m, block_n, device):
    """Bool ``[QT, KT]``: ``round(fraction · KT)`` (at least 1) key tiles centred on each q-tile's diagonal."""
    width = max(1, round(fraction * k_tiles))
    centre = ((torch.arange(q_tiles, device=device) * block_m + block_m // 2) // block_n).clamp(max=k_tiles - 1)
    start = (centre - width // 2).clamp(min=0, max=k_tiles - width)
    cols = torch.arange(k_tiles, device=device)
    return (cols[None, :] >= start[:, None]) & (cols[None, :] < start[:, None] + width)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--json", default="kernel_bench.json")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--sweep", action="store_true", help="also time warps/stages/tile variants (dense)")
    parser.add_argument("--no-flex", action="store_true")
    args = parser.parse_args(argv)

    from litepatch.kernels import SkipState, pack_bits
    from litepatch.kernels import triton_fwd

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    results = {"gpu": gpu, "torch": torch.__version__, "shapes": {}}
    import triton
    results["triton"] = triton.__version__
    try:
        import flash_attn
        flash = flash_attn.flash_attn_func
        results["flash_attn"] = flash_attn.__version__
    except ImportError:
        flash = None
    lines = [f"GPU: {gpu}, torch {torch.__version__}, triton {triton.__version__}, bf16, D=128"]
    for name in args.shapes:
        batch, heads, seq, dim = SHAPES[name]
        flops = 4.0 * batch * heads * seq * seq * dim
        tflops = lambda ms: flops / ms / 1e9  # noqa: E731
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(batch, seq, heads, dim, device=device, dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        tiles = triton_fwd.tiles_for_head_dim(dim)
        state = SkipState()
        state.initialize((batch, heads, seq, seq), tiles, device, (), ())
        must_q, must_k = state.must_masks(device)
        full_keep = state.read_words()
        scale = 1.0 / math.sqrt(dim)
        row = {"shape": [batch, heads, seq, dim], "tiles": [tiles.block_m, tiles.block_n],
               "state_bytes": state.nbytes(), "launch": list(triton_fwd.launch_config(dim, tiles.block_m,
                                                                                     tiles.block_n))}

        def ours(threshold=-math.inf, **kw):
            def call():
                triton_fwd.triton_forward(q, k, v, *state.buffers(), must_q, must_k,
                                          block_m=tiles.block_m, block_n=tiles.block_n, threshold=threshold,
                                          softmax_scale=scale, use_anchor=True, descending=False, **kw)
            return call

        qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(backend):
            def call():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(qh, kh, vh)
            return call

        calls = {"ours": (None, ours()), "sdpa_flash": (None, sdpa(SDPBackend.FLASH_ATTENTION))}
        try:
            sdpa(SDPBackend.CUDNN_ATTENTION)()
            calls["sdpa_cudnn"] = (None, sdpa(SDPBackend.CUDNN_ATTENTION))
        except RuntimeError as err:
            print(f"cuDNN SDPA unavailable: {err}", file=sys.stderr)
        if flash is not None:
            calls["flash_attn"] = (None, lambda: flash(q, k, v))
        times = interleaved(calls, args.warmup, args.reps)
        t = {key: statistics.median(ms) for key, ms in times.items()}
        row["dense_ms"] = t
        row["dense_tflops"] = {key: tflops(ms) for key, ms in t.items()}
        row["ours_over"] = {key: median_ratio(times, "ours", key) for key in t if key != "ours"}
        # skip test + list writing on (threshold no tile fails) vs off, at k = 1.0; the first call at -10
        # starts from the full list each time (written back untimed)
        reset = lambda: state.set_read_words(full_keep)  # noqa: E731
        times = interleaved({"off": (reset, ours()), "test": (reset, ours(threshold=-1e30)),
                             "first": (reset, ours(threshold=-10.0))}, args.warmup, args.reps)
        row["skip_test_overhead"] = median_ratio(times, "test", "off") - 1.0
        row["first_call_thr-10_over_dense"] = median_ratio(times, "first", "off")
        row["first_call_thr-10_written_fraction"] = float(state.read_list().float().mean())
        state.set_read_words(full_keep)
        # forced kept fractions
        q_tiles, k_tiles = state.q_tiles, state.k_tiles
        fr_rows = {}
        flex = None if args.no_flex else make_flex(qh, kh, vh, tiles, q_tiles, k_tiles, seq)
        calls, kept_fracs = {}, {}
        for fraction in FRACTIONS:
            band = banded_read_list(batch, heads, q_tiles, k_tiles, fraction, tiles.block_m, tiles.block_n, device)
            kept_fracs[fraction] = float(band.float().mean())
            keep = pack_bits(band).expand(batch, heads, -1, -1).contiguous()
            calls[f"ours {fraction}"] = (lambda keep=keep: state.set_read_words(keep), ours())
            if flex is not None:
                try:
                    flex(band)()
                    calls[f"flex {fraction}"] = (None, flex(band))
                except Exception as err:  # noqa: BLE001 - report and go on
                    print(f"flex failed at k={fraction}: {err}", file=sys.stderr)
        times = interleaved(calls, args.warmup, args.reps)
        for fraction in FRACTIONS:
            entry = {"kept": kept_fracs[fraction], "ms": statistics.median(times[f"ours {fraction}"]),
                     "over_dense": median_ratio(times, f"ours {fraction}", "ours 1.0")}
            if f"flex {fraction}" in times and "flex 1.0" in times:
                entry.update(flex_ms=statistics.median(times[f"flex {fraction}"]),
                             flex_over_dense=median_ratio(times, f"flex {fraction}", "flex 1.0"),
                             ours_over_flex=median_ratio(times, f"ours {fraction}", f"flex {fraction}"))
            fr_rows[str(fraction)] = entry
        state.set_read_words(full_keep)
        row["fractions"] = fr_rows
        if args.sweep:
            sweep = {}
            variants = [(tiles.block_m, tiles.block_n, w, st) for w, st in ((4, 2), (4, 3), (8, 2), (8, 3))]
            variants += [(128, 64, 4, 2), (128, 64, 8, 3), (256, 64, 8, 3)]
            for block_m, block_n, warps, stages in variants:
                other = SkipState()
                other.initialize((batch, heads, seq, seq), triton_fwd.TileConfig(block_m, block_n), device, (), ())
                for threshold in (-math.inf, -1e30):
                    def call(other=other, block_m=block_m, block_n=block_n, warps=warps, stages=stages, thr=threshold):
                        triton_fwd.triton_forward(
                            q, k, v, *other.buffers(), *other.must_masks(device), block_m=block_m,
                            block_n=block_n, threshold=thr, softmax_scale=scale, use_anchor=True, descending=False,
                            num_warps=warps, num_stages=stages)
                    key = f"{block_m}x{block_n} w{warps} s{stages}{' +test' if threshold > -math.inf else ''}"
                    try:
                        sweep[key] = tflops(bench(call, 1, 3))
                    except Exception as err:  # noqa: BLE001
                        sweep[key] = f"error {type(err).__name__}: {err}"[:200]
            row["sweep_tflops"] = sweep
        results["shapes"][name] = row
        lines += format_rows(name, row)
        del q, k, v, qh, kh, vh
        torch.cuda.empty_cache()
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=2)
    print("\n".join(lines))
    return 0


def make_flex(qh, kh, vh, tiles, q_tiles, k_tiles, seq):
    """Returns ``band -> call`` running compiled FlexAttention with that tile pattern as full 128x64 blocks."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention)
    batch, heads = qh.shape[:2]

    def make(band):
        counts = band.sum(-1).to(torch.int32)
        order = torch.argsort((~band).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # listed tiles first
        expand = lambda t: t.expand(batch, heads, *t.shape).contiguous()  # noqa: E731
        block_mask = BlockMask.from_kv_blocks(
            expand(torch.zeros_like(counts)), expand(order), expand(counts), expand(order),
            BLOCK_SIZE=(tiles.block_m, tiles.block_n), seq_lengths=(seq, seq))

        def call():
            compiled(qh, kh, vh, block_mask=block_mask)
        return call
    return make


def format_rows(name, row) -> list[str]:
    b, h, s, d = row["shape"]
    out = [f"\n== {name}: B{b} H{h} S={s} D={d}, tiles {row['tiles'][0]}x{row['tiles'][1]}, launch (warps, stages) "
           f"{row['launch']}, skip state {row['state_bytes'] / 2**20:.2f} MiB per layer per branch"]
    out.append(f"{'dense':<14}{'ms':>10}{'TFLOP/s':>10}{'ours/x (time)':>16}")
    for key, ms in row["dense_ms"].items():
        ratio = "" if key == "ours" else f"{row['ours_over'][key]:.3f}  (x{1 / row['ours_over'][key]:.3f} speed)"
        out.append(f"{key:<14}{ms:>10.2f}{row['dense_tflops'][key]:>10.1f}  {ratio}")
    out.append(f"skip test + list writing at k=1.0: {100 * row['skip_test_overhead']:+.1f}% ; first call at "
               f"threshold -10 from a full list: {row['first_call_thr-10_over_dense']:.3f} x dense")
    out.append(f"{'k target':<10}{'kept':>8}{'ms':>10}{'t/t(1)':>8}{'<=k+.02':>9}{'flex ms':>10}{'flex t/t1':>10}"
               f"{'ours/flex':>10}")
    for fraction, e in row["fractions"].items():
        ok = e["over_dense"] <= float(fraction) + 0.02
        out.append(f"{fraction:<10}{e['kept']:>8.3f}{e['ms']:>10.2f}{e['over_dense']:>8.3f}{'yes' if ok else 'NO':>9}"
                   f"{e.get('flex_ms', float('nan')):>10.2f}{e.get('flex_over_dense', float('nan')):>10.3f}"
                   f"{e.get('ours_over_flex', float('nan')):>10.3f}")
    if "sweep_tflops" in row:
        out.append("sweep (dense TFLOP/s): " + ", ".join(
            f"{k}: {v:.0f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row["sweep_tflops"].items()))
    return out


if __name__ == "__main__":
    start = time.time()
    code = main()
    print(f"benchmark wall time {time.time() - start:.0f} s")
    sys.exit(code)
