"""The CuTe-DSL kernel's machine code, read on any machine (no GPU needed): registers, spills and its main loop.

Compiles :class:`litepatch.kernels.cute_sm90.LiteAttentionForwardSm90` for sm_90a (``CUTE_DSL_ARCH``) per head
dim, vote on and off, and flash-attn-4's own block-sparse SM90 forward at the same tiles (the baseline the
subclass adds to), disassembles each cubin with ``nvdisasm`` and prints, per kernel:

* ``registers`` at launch and ``local`` memory bytes (spills; 0 expected);
* the main loop (the shortest loop holding both wgmma chains and the exponentials: one key tile of one
  consumer warpgroup): its ``instructions``, its ``global_loads``, and ``overlapped``: the instructions between
  the wait for QK^T (``WARPGROUP.DEPBAR.LE gsb0, 0x1``) and the wait for PV (``0x0``), i.e. the softmax work
  that runs under the PV GEMM (FA3's intra-warpgroup overlap). Fewer instructions per tile and more of them
  overlapped is what the H200 rewards: at D=128 the softmax of one warpgroup is the critical path that the
  other warpgroup's GEMMs must hide.

These are static counts, not times: they say where a kernel change moves the code before a GPU can time it
(``benchmarks/backends.py``). Compiling needs the GPU extra's libraries (``pip install "litepatch[cuda]"``
and ``cuda-bindings``), not a GPU; ``nvdisasm`` comes from the CUDA toolkit or Triton's wheel (``NVDISASM``
overrides).

Usage::

    python benchmarks/cute_sass.py [--head-dims 64 128] [--json cute_sass.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WAIT_QK, WAIT_PV = "WARPGROUP.DEPBAR.LE gsb0, 0x1", "WARPGROUP.DEPBAR.LE gsb0, 0x0"


def tool(name: str) -> str:
    """Path of a CUDA binary tool: ``$NVDISASM``-style override, PATH, then the copy in Triton's wheel."""
    found = os.environ.get(name.upper()) or shutil.which(name)
    if found:
        return found
    try:
        import triton
    except ImportError:
        triton = None
    bundled = triton and Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled and bundled.is_file():
        return str(bundled)
    raise SystemExit(f"{name} not found: install the CUDA toolkit or Triton, or set {name.upper()}")


def instructions(sass: str) -> tuple[list[str], dict[str, int]]:
    """The instruction texts in order, and the index each ``.L_x_N`` label points at."""
    body, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"^\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(body)
            continue
        ins = re.match(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if ins:
            body.append(ins.group(1))
    return body, labels


def main_loop(body: list[str], labels: dict[str, int]) -> list[str]:
    """The shortest loop (a backward branch) holding wgmmas and exponentials: one key tile's work."""
    loops = []
    for end, ins in enumerate(body):
        target = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", ins)
        if target and labels.get(target.group(1), end + 1) <= end:
            loop = body[labels[target.group(1)]: end + 1]
            if any("HGMMA" in i for i in loop) and any("MUFU.EX2" in i for i in loop):
                loops.append(loop)
    if not loops:
        raise ValueError("no main loop found in the kernel's SASS")
    return min(loops, key=len)


def loop_stats(loop: list[str]) -> dict[str, int]:
    inside, overlapped = False, 0
    for ins in loop:
        if WAIT_QK in ins:
            inside = True
        elif WAIT_PV in ins:
            inside = False
        elif inside:
            overlapped += 1
    return {"instructions": len(loop), "overlapped": overlapped,
            "global_loads": sum(re.search(r"\bLDG\b", i) is not None for i in loop)}


def kernel_stats(cubin: str) -> dict[str, int]:
    usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    sass = subprocess.run([tool("nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    stats = {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
             "local": int(re.search(r"LOCAL:(\d+)", usage).group(1))}
    return {**stats, **loop_stats(main_loop(*instructions(sass)))}


def compile_one(head_dim: int, vote: bool, baseline: bool, dump: Path, tail_mode: str | None = None,
                mask_tail: bool = True, ablate: tuple[str, ...] = ()) -> str:
    """Compiles one configuration and returns its cubin (the one file in the dump folder)."""
    import math

    import cutlass.cute as cute
    import torch

    from litepatch.kernels import cute_sm90

    tile_m, batch, heads, seq = cute_sm90.tile_m_for(head_dim), 1, 2, 1024
    q, k, v = (torch.zeros(batch, seq, heads, head_dim, dtype=torch.bfloat16) for _ in range(3))
    q_tiles, k_tiles = math.ceil(seq / tile_m), math.ceil(seq / cute_sm90.TILE_N)
    ints = lambda *shape: torch.zeros(*shape, dtype=torch.int32)  # noqa: E731
    lists = (ints(batch, heads, q_tiles), ints(batch, heads, q_tiles, 1), ints(batch, heads, q_tiles),
             ints(batch, heads, q_tiles, k_tiles))
    for old in dump.glob("*.cubin"):  # the file name does not tell the vote variants apart: one at a time
        old.unlink()
    cute_sm90.compile_sm90(
        q, k, v, torch.empty_like(q), torch.empty(batch, heads, seq), 0.1, None, lists, ints(batch, heads, q_tiles, 1),
        torch.zeros(batch, heads, q_tiles, dtype=torch.int64), ints(batch, heads, q_tiles), vote=vote,
        baseline=baseline, tail_mode=tail_mode, mask_tail=mask_tail, ablate=ablate,
        stream=cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=False),  # no GPU tensors to find a stream on
    )
    (cubin,) = dump.glob("*.cubin")
    return str(cubin)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    dump = Path(tempfile.mkdtemp(prefix="cute_sass_"))
    # read by the DSL and by flash-attn-4 when they are imported: keep the cubins, compile every time
    os.environ.update(CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP="cubin", CUTE_DSL_DUMP_DIR=str(dump),
                      FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED="0")
    kernels = {"flash-attn-4 block-sparse": dict(vote=False, baseline=True),
               "ours, vote off (-inf)": dict(vote=False, baseline=False),
               "ours, vote off, tail branch": dict(vote=False, baseline=False, tail_mode="branch"),
               "ours, vote on": dict(vote=True, baseline=False),
               # keys that fill their last tile (exact there); without the anchor tracking (counts only)
               "ours, vote off, no tail mask": dict(vote=False, baseline=False, mask_tail=False),
               "ours, vote on, no tail mask": dict(vote=True, baseline=False, mask_tail=False),
               "ours, vote off, no anchor": dict(vote=False, baseline=False, ablate=("anchor",))}
    results = {}
    for head_dim in args.head_dims:
        for name, config in kernels.items():
            stats = kernel_stats(compile_one(head_dim, dump=dump, **config))
            results[f"D{head_dim} {name}"] = stats
            print(f"D={head_dim:<4} {name:<28} " + "  ".join(f"{k} {v}" for k, v in stats.items()), flush=True)
    shutil.rmtree(dump, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": "sm_90a", "kernels": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
