"""How far a Triton FlashAttention forward gets on Hopper: dense variants of our kernel's inner loop.

Each variant is the dense path of ``kernels/triton_fwd.py`` (TMA descriptors, exp2 online softmax,
K/V tiles read through a visit list) with one FA3-style idea switched on, timed against PyTorch SDPA's
cuDNN backend in the same run, at the Wan2.1-14B-720p and 1.3B-480p shapes (bf16, D=128):

* ``tiles`` / ``warps`` / ``stages`` / ``maxnreg``: tile shape, warps (8 = two consumer warpgroups
  of 64 rows each), pipeline depth and the register budget;
* ``direct``: key tiles in order (no visit-list load), to price the indirection;
* ``prefetch_qk``: intra-warpgroup overlap by hand (FA3 §3.2): S = QK^T of the next tile is issued
  before the softmax of the current one, so the async wgmma can run under the exponentials;
* ``warp_specialize``: ``tl.range(..., warp_specialize=True)`` (producer/consumer warps, Triton's
  automatic ping-pong), reported as failed when Triton cannot compile it;
* ``emulated_exp2``: FA4's trick, a share of the exponentials computed by a polynomial on the FMA
  pipes so that the MUFU unit (16 exp2/clock/SM, half the matmul time of a 128x128 tile) is no
  longer the bottleneck;
* ``persistent``: one program per SM walking (head, q-tile) work items, heads outermost so that the
  programs in flight share K/V in L2.

Example:
    $ python benchmarks/kernel_variants.py --json bench-out/kernel_variants.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
SHAPES = {"720p": (1, 40, 75600), "480p": (1, 12, 32760)}


@triton.jit
def _qk(q, k_desc, row0, col, j, seq, BLOCK_N: tl.constexpr, HAS_TAIL: tl.constexpr):
    qk = tl.dot(q, k_desc.load([row0 + j * BLOCK_N, col]).T)
    if HAS_TAIL:
        limit = seq - j * BLOCK_N
        if limit < BLOCK_N:
            qk = tl.where(tl.arange(0, BLOCK_N)[None, :] < limit, qk, float("-inf"))
    return qk


@triton.jit
def _exp2_fma(x):
    """2**x for x <= 0 on the FMA/ALU pipes (FA4's trick): round-to-nearest through a magic add, a
    degree-3 polynomial of the fraction (max relative error 7.7e-5, below bf16's 3.9e-3), and the
    integer part added into the exponent bits."""
    x = tl.maximum(x, -125.0)
    y = x + 12582912.0  # 1.5 * 2**23: the low mantissa bits of y now hold round(x)
    f = x - (y - 12582912.0)  # in [-0.5, 0.5]
    p = 0.05508868 * f + 0.24260405
    p = p * f + 0.69327624
    p = p * f + 0.99992894
    bits = p.to(tl.int32, bitcast=True) + (y.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp2_split(x, EMULATED: tl.constexpr):
    """2**x with every second column (EMULATED = 2) on the FMA pipes instead of MUFU. The split is
    register-local (a thread holds column pairs of the wgmma accumulator: no shared-memory traffic in
    the PTX); a quarter split needs a layout conversion through shared memory and does not fit."""
    if EMULATED == 0:
        return tl.math.exp2(x)
    rows: tl.constexpr = x.shape[0]
    cols: tl.constexpr = x.shape[1]
    a, b = tl.split(tl.reshape(x, [rows, cols // 2, 2]))
    return tl.reshape(tl.join(tl.math.exp2(a), _exp2_fma(b)), [rows, cols])


@triton.jit
def _softmax_pv(qk, v, m_i, l_i, acc, qk_scale, EMULATED: tl.constexpr = 0):
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = _exp2_split(qk * qk_scale - m_new[:, None], EMULATED)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc


@triton.jit
def _attend_rows(q_desc, k_desc, v_desc, out_ptr, visit_ptr, qk_scale, seq, heads, k_tiles, pid_m, bh,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, STAGES: tl.constexpr,
                 DIRECT: tl.constexpr, PREFETCH_QK: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                 HAS_TAIL: tl.constexpr, EMULATED: tl.constexpr):
    b = bh // heads
    h = bh % heads
    row0 = b * seq
    col = h * HEAD_DIM
    q = q_desc.load([row0 + pid_m * BLOCK_M, col])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    visit_row = visit_ptr + (bh * tl.cdiv(seq, BLOCK_M) + pid_m).to(tl.int64) * k_tiles
    if PREFETCH_QK:
        j = tl.load(visit_row).to(tl.int32)
        qk = _qk(q, k_desc, row0, col, j, seq, BLOCK_N, HAS_TAIL)
        for it in tl.range(1, k_tiles, num_stages=STAGES):
            j_next = tl.load(visit_row + it).to(tl.int32)
            qk_next = _qk(q, k_desc, row0, col, j_next, seq, BLOCK_N, HAS_TAIL)
            v = v_desc.load([row0 + j * BLOCK_N, col])
            m_i, l_i, acc = _softmax_pv(qk, v, m_i, l_i, acc, qk_scale, EMULATED)
            qk = qk_next
            j = j_next
        m_i, l_i, acc = _softmax_pv(qk, v_desc.load([row0 + j * BLOCK_N, col]), m_i, l_i, acc, qk_scale, EMULATED)
    else:
        for it in tl.range(0, k_tiles, num_stages=STAGES, warp_specialize=WARP_SPECIALIZE):
            if DIRECT:
                j = it
            else:
                j = tl.load(visit_row + it).to(tl.int32)
            qk = _qk(q, k_desc, row0, col, j, seq, BLOCK_N, HAS_TAIL)
            m_i, l_i, acc = _softmax_pv(qk, v_desc.load([row0 + j * BLOCK_N, col]), m_i, l_i, acc, qk_scale, EMULATED)
    out = acc / l_i[:, None]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = out_ptr + (row0 + offs_m).to(tl.int64)[:, None] * (heads * HEAD_DIM) + col + offs_d[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m < seq)[:, None])


@triton.jit
def _dense_kernel(q_desc, k_desc, v_desc, out_ptr, visit_ptr, qk_scale, seq, heads, k_tiles, n_work,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, STAGES: tl.constexpr,
                  DIRECT: tl.constexpr, PREFETCH_QK: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                  PERSISTENT: tl.constexpr, HAS_TAIL: tl.constexpr, EMULATED: tl.constexpr):
    if PERSISTENT:
        q_tiles = tl.cdiv(seq, BLOCK_M)
        for work in range(tl.program_id(0), n_work, tl.num_programs(0)):
            _attend_rows(q_desc, k_desc, v_desc, out_ptr, visit_ptr, qk_scale, seq, heads, k_tiles,
                         work % q_tiles, work // q_tiles, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, DIRECT,
                         PREFETCH_QK, WARP_SPECIALIZE, HAS_TAIL, EMULATED)
    else:
        _attend_rows(q_desc, k_desc, v_desc, out_ptr, visit_ptr, qk_scale, seq, heads, k_tiles,
                     tl.program_id(0), tl.program_id(1), BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, DIRECT,
                     PREFETCH_QK, WARP_SPECIALIZE, HAS_TAIL, EMULATED)


def run_variant(q, k, v, variant: dict):
    """One dense forward of ``variant`` on ``[B, S, H, D]`` inputs (one batch row: the TMA zero fill
    pads the ragged last tile, which the kernel masks)."""
    batch, seq, heads, dim = q.shape
    bm, bn = variant["tiles"]
    q_tiles, k_tiles = math.ceil(seq / bm), math.ceil(seq / bn)
    visit = variant.get("_visit")
    if visit is None or visit.shape[-1] != k_tiles:
        visit = torch.arange(k_tiles, dtype=torch.int16, device=q.device).repeat(batch * heads * q_tiles, 1)
        variant["_visit"] = visit
    rows = batch * seq
    descs = [TensorDescriptor(t, [rows, heads * dim], [heads * dim, 1], [b, dim]) for t, b in ((q, bm), (k, bn), (v, bn))]
    out = torch.empty_like(q)
    n_work = batch * heads * q_tiles
    grid = (min(n_work, torch.cuda.get_device_properties(q.device).multi_processor_count),) if variant.get("persistent") \
        else (q_tiles, batch * heads)
    extra = {"maxnreg": variant["maxnreg"]} if variant.get("maxnreg") else {}
    _dense_kernel[grid](
        *descs, out, visit, dim ** -0.5 * LOG2E, seq, heads, k_tiles, n_work,
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=dim, STAGES=variant["stages"], DIRECT=variant.get("direct", False),
        PREFETCH_QK=variant.get("prefetch_qk", False), WARP_SPECIALIZE=variant.get("warp_specialize", False),
        PERSISTENT=variant.get("persistent", False), HAS_TAIL=seq % bn != 0, EMULATED=variant.get("emulated_exp2", 0), num_warps=variant["warps"], num_stages=variant["stages"], **extra,
    )
    return out


VARIANTS = [
    {"name": "ours (128x128, 8 warps, 3 stages)", "tiles": (128, 128), "warps": 8, "stages": 3},
    {"name": "direct tile order", "tiles": (128, 128), "warps": 8, "stages": 3, "direct": True},
    {"name": "2 stages", "tiles": (128, 128), "warps": 8, "stages": 2},
    {"name": "4 stages", "tiles": (128, 128), "warps": 8, "stages": 4},
    {"name": "128x64, 4 warps, 2 stages (issue's baseline)", "tiles": (128, 64), "warps": 4, "stages": 2},
    {"name": "128x64, 8 warps, 3 stages", "tiles": (128, 64), "warps": 8, "stages": 3},
    {"name": "256x128, 16 warps, 2 stages", "tiles": (256, 128), "warps": 16, "stages": 2},
    {"name": "256x64, 8 warps, 3 stages", "tiles": (256, 64), "warps": 8, "stages": 3},
    {"name": "maxnreg 240", "tiles": (128, 128), "warps": 8, "stages": 3, "maxnreg": 240},
    {"name": "maxnreg 168", "tiles": (128, 128), "warps": 8, "stages": 3, "maxnreg": 168},
    {"name": "prefetch QK (intra-warpgroup overlap)", "tiles": (128, 128), "warps": 8, "stages": 3, "prefetch_qk": True},
    {"name": "prefetch QK, 128x64", "tiles": (128, 64), "warps": 8, "stages": 3, "prefetch_qk": True},
    {"name": "prefetch QK, 2 stages", "tiles": (128, 128), "warps": 8, "stages": 2, "prefetch_qk": True},
    {"name": "warp_specialize", "tiles": (128, 128), "warps": 8, "stages": 3, "warp_specialize": True},
    {"name": "warp_specialize, 4 warps, 128x64", "tiles": (128, 64), "warps": 4, "stages": 2, "warp_specialize": True},
    {"name": "exp2 of 1/2 the columns on FMA (FA4 trick)", "tiles": (128, 128), "warps": 8, "stages": 3,
     "emulated_exp2": 2},
    {"name": "exp2 1/2 on FMA, 128x64, 4 warps, 2 stages", "tiles": (128, 64), "warps": 4, "stages": 2,
     "emulated_exp2": 2},
    {"name": "exp2 1/2 on FMA, warp_specialize", "tiles": (128, 128), "warps": 8, "stages": 3,
     "emulated_exp2": 2, "warp_specialize": True},
    {"name": "exp2 1/2 on FMA, prefetch QK", "tiles": (128, 128), "warps": 8, "stages": 3,
     "emulated_exp2": 2, "prefetch_qk": True},
    {"name": "persistent grid", "tiles": (128, 128), "warps": 8, "stages": 3, "persistent": True},
    {"name": "persistent + prefetch QK", "tiles": (128, 128), "warps": 8, "stages": 3, "persistent": True,
     "prefetch_qk": True},
]


def bench(fn, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` timed calls (after a warm-up)."""
    return triton.testing.do_bench(fn, warmup=max(25, reps), rep=reps * 10, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="720p,480p")
    parser.add_argument("--reps", type=int, default=20, help="milliseconds per timing is ~10x this")
    parser.add_argument("--only", default="", help="comma-separated substrings of variant names to run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    results = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
               "shapes": {}}
    variants = [v for v in VARIANTS if not args.only or any(s in v["name"] for s in args.only.split(","))]
    for shape_name in args.shapes.split(","):
        batch, heads, seq = SHAPES[shape_name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(batch, seq, heads, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        flops = 4 * batch * heads * seq * seq * 128
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
            cudnn_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt), args.reps)
        rows = []
        print(f"\n{shape_name} (B{batch} H{heads} S={seq}, bf16, D=128) on {results['device']}: "
              f"SDPA-cuDNN {flops / cudnn_ms / 1e9:.0f} TFLOP/s")
        print(f"{'variant':<46} {'TFLOP/s':>8} {'vs cuDNN':>9}  note")
        from litepatch.kernels import SkipState, lite_attention

        state = SkipState()
        ours_ms = bench(lambda: lite_attention(q, k, v, state, threshold=-math.inf), args.reps)
        rows.append({"name": "litepatch kernel, threshold -inf", "ms": ours_ms, "tflops": flops / ours_ms / 1e9,
                     "vs_cudnn": cudnn_ms / ours_ms})
        print(f"{rows[-1]['name']:<46} {rows[-1]['tflops']:>8.0f} {rows[-1]['vs_cudnn']:>8.3f}x")
        for variant in variants:
            row = {"name": variant["name"], **{k_: v_ for k_, v_ in variant.items() if not k_.startswith("_")}}
            try:
                start = time.perf_counter()
                out = run_variant(q, k, v, variant)
                torch.cuda.synchronize()
                row["compile_s"] = time.perf_counter() - start
                row["max_err"] = (out.float() - ref.float()).abs().max().item()
                ms = bench(lambda: run_variant(q, k, v, variant), args.reps)
                row.update(ms=ms, tflops=flops / ms / 1e9, vs_cudnn=cudnn_ms / ms)
            except Exception as exc:  # a variant Triton cannot compile is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            rows.append(row)
            if "error" in row:
                print(f"{row['name']:<46} {'-':>8} {'-':>9}  FAILED {row['error']}")
            else:
                note = "" if row["max_err"] < 2e-2 else f"WRONG (max err {row['max_err']:.3g})"
                print(f"{row['name']:<46} {row['tflops']:>8.0f} {row['vs_cudnn']:>8.3f}x  {note}")
            variant.pop("_visit", None)
        results["shapes"][shape_name] = {"cudnn_ms": cudnn_ms, "cudnn_tflops": flops / cudnn_ms / 1e9, "variants": rows}
        del q, k, v, qt, kt, vt, ref
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
