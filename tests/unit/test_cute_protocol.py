"""The CuTe backend's list and commit kernels with an emulated CuTe kernel, against the reference, on the CPU.

Needs the GPU extra (Triton, flash-attn-4), not a GPU: the Triton kernels run under Triton's interpreter in a
fresh process (``TRITON_INTERPRET`` is read when Triton is imported). See ``cute_protocol_check.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("flash_attn.cute")


def test_list_and_commit_kernels_around_the_emulated_kernel_match_the_reference():
    script = Path(__file__).with_name("cute_protocol_check.py")
    result = subprocess.run([sys.executable, str(script)], env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
