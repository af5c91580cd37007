"""Whether TVM-FFI converts torch tensors through the C DLPack exchange, and what a call costs per tensor argument.

Every CuTe-DSL launch (the CuTe LiteAttention kernel: 12 tensors; flash-attn-4's dense forward: 4) is a TVM-FFI
call, which converts each torch tensor argument. With the C exchange (torch's ``__dlpack_c_exchange_api__``, or the
``torch-c-dlpack-ext`` addon for older torch) that is a fraction of a microsecond per tensor; without it, a Python
``__dlpack__`` round trip each. Prints which is on and times ``testing.nop`` with 0 to 12 tensors (hot loop).

H100 host, torch 2.11 + tvm-ffi 0.1.15 (session 23, ``benchmarks/results/device_h100_2026-12-06l_tvm_ffi_dlpack.txt``):
the exchange is on; 0.15 us with no tensor, 1.77 us with 12; a small ``torch.empty`` on CUDA 2.37 us.

Example:
    $ python benchmarks/tvm_ffi_overhead.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_overhead import hot_loop_us  # noqa: E402


def main() -> None:
    import tvm_ffi

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("torch", torch.__version__, "tvm_ffi", tvm_ffi.__version__, "device", device)
    print("C DLPack exchange (__dlpack_c_exchange_api__):", hasattr(torch.Tensor, "__dlpack_c_exchange_api__"),
          "| torch's own legacy attribute:", hasattr(torch.Tensor, "__c_dlpack_exchange_api__"))
    nop = tvm_ffi.get_global_func("testing.nop")
    tensors = [torch.empty(64, device=device) for _ in range(12)]
    for count in (0, 1, 4, 12):
        print(f"testing.nop with {count:2d} tensors: {hot_loop_us(lambda: nop(*tensors[:count]), 5000, 200):.2f} us")
    empty = hot_loop_us(lambda: torch.empty(1, 2, 512, dtype=torch.float32, device=device), 5000, 200)
    print(f"torch.empty(1, 2, 512) on {device}: {empty:.2f} us")


if __name__ == "__main__":
    main()
