"""The CPU smoke run of benchmarks/multigpu.py (2 gloo ranks under torchrun, tiny Wan, reference kernel): the
hand-sharded Ulysses mode and diffusers' own Ulysses context parallelism patched by ``litepatch.apply`` give the
single-device dense output at f=1, run the forced fraction and split the kept work evenly over the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("multigpu") / "multigpu.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "benchmarks" / "multigpu.py"), "--tiny", "--device", "cpu", "--iters", "1", "--warmup", "1",
        "--modes", "single,ulysses,diffusers-ulysses", "--fractions", "1,0.5", "--json", str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "diffusers-ulysses2 lite f=0.5" in proc.stdout
    return {(r["mode"], r["attention"]): r for r in json.loads(out.read_text())["rows"]}


def test_diffusers_ulysses_matches_single_device_dense_at_f1(rows):
    for attention in ("sdpa", "lite f=1"):
        r = rows["diffusers-ulysses2", attention]
        assert r["rel_err_vs_single_sdpa"] < 1e-5, (attention, r)
        assert r["kept_fraction"] == 1.0


def test_diffusers_ulysses_runs_the_forced_fraction_on_each_ranks_heads(rows):
    r = rows["diffusers-ulysses2", "lite f=0.5"]
    assert r["kept_fraction"] == pytest.approx(0.5, abs=0.05)
    assert r["rel_err_vs_single_sdpa"] > 1e-4  # the forced random pattern really skipped
    single = rows["single", "lite f=0.5"]["kept_tiles_per_rank"][0]
    assert r["kept_tiles_per_rank"] == rows["ulysses2", "lite f=0.5"]["kept_tiles_per_rank"] == [single // 2] * 2
    assert r["kept_imbalance"] == 1.0
    assert r["attn_ms_per_rank"] == []  # attention runs inside diffusers' processors: not timed
    assert len(r["step_ms_per_rank"]) == 2 and r["step_ms"] == max(r["step_ms_per_rank"])


def test_hand_sharded_ulysses_still_matches(rows):
    assert rows["ulysses2", "lite f=1"]["rel_err_vs_single_sdpa"] < 1e-5
    assert len(rows["ulysses2", "lite f=1"]["attn_ms_per_rank"]) == 2
