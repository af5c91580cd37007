"""``benchmarks/patch_overhead.py --cpu`` runs end to end. Its ``--breakdown`` wraps the patcher's functions by name,
so a renamed function must fail here, not on the GPU machine (a rename made the H100 run's breakdown stop once). The
script runs in a process forked from a warm interpreter (``warm_python``): its own work takes about 2 s, the imports of
torch and diffusers would be most of the rest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "patch_overhead.py"

pytest.importorskip("diffusers")


def test_cpu_run_with_the_breakdown_times_the_functions_of_the_sparse_path(tmp_path, warm_python):
    out = tmp_path / "overhead.json"
    proc = warm_python.run(
        [sys.executable, str(SCRIPT), "--cpu", "--rounds", "1", "--iters", "1", "--breakdown", "--breakdown-forwards",
         "3", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in ("RootPatch.pre_hook", "CallReader.read_source", "Runtime.start_forward", "StepTracker.observe",
                  "LayerPatch.make_plan", "LayerPatch.attend",  # the dense path's (threshold -inf)
                  # the sparse path's, after a state's first call (the null backend repeats it, as the CuTe one)
                  "LayerPatch.attend_again", "repeat_call"):
        assert f"  {label} " in proc.stdout, (label, proc.stdout)
    rows = json.loads(out.read_text())["added_host_us_per_call"]
    assert {"dense path (warm-up: the model's own SDPA)", "sparse path (null kernel vs a null SDPA)"} <= set(rows)


def test_cpu_call_count_of_the_sparse_path_stays_low(tmp_path, warm_python):
    """``--calls`` counts the function calls a sparse forward adds per attention call: deterministic where host time
    drifts, so a change that adds Python frames to every call fails here. 21 on Python 3.11 with diffusers 0.42
    (session 24, LayerPatch.attend_again and the dispatch rules it asks; 28 in session 22, 40 before it), fewer on
    3.12, which inlines list comprehensions."""
    out = tmp_path / "calls.json"
    proc = warm_python.run([sys.executable, str(SCRIPT), "--cpu", "--calls", "--iters", "1", "--json", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    python_calls = json.loads(out.read_text())["added_python_calls_per_attention_call"]
    assert 10 < python_calls <= 22, proc.stdout


def test_cpu_trace_splits_the_patchers_functions_into_their_own_time_and_the_ops_inside(warm_python):
    proc = warm_python.run(
        [sys.executable, str(SCRIPT), "--cpu", "--rounds", "1", "--iters", "1", "--trace", "--breakdown-forwards", "3"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "  LayerPatch.attend (its own) " in proc.stdout, proc.stdout
    assert "Runtime.flush > aten::stack " in proc.stdout, proc.stdout  # the records' one stack of kept counts


ABLATION = SCRIPT.with_name("host_ablation.py")


def test_cpu_ablation_takes_out_each_piece_it_names_and_a_control(tmp_path, warm_python):
    """``host_ablation.py --cpu`` patches the patcher's pieces by name: a rename must fail here, not on the GPU."""
    out = tmp_path / "ablation.json"
    command = [sys.executable, str(ABLATION), "--cpu", "--rounds", "1", "--iters", "1", "--json", str(out)]
    proc = warm_python.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    sparse, dense = (set(results[path]["saved_us_per_call"]) for path in ("sparse", "dense"))
    assert {"sparse without nothing (control)", "sparse without the whole kernel call (repeat_call)",
            "sparse without attend_again's key (the call compared)"} <= sparse, sparse
    assert "dense without nothing (control)" in dense and not any("repeat_call" in name for name in dense), dense
