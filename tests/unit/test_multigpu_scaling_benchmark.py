"""The CPU smoke run of benchmarks/multigpu.py at 4 ranks (and 8, slow): every mode, tiny Wan (8 heads, 768
tokens), gloo ranks in torchrun's environment (forked from a warm interpreter, ``warm_python``), reference kernel.
Each layout (Ulysses-P, ring-P, the Ulysses x ring mixes, hand-sharded and under diffusers) gives the single-device
dense output at kept 1.0 and really skips at a forced fraction; the hetero rows (per-head kept fractions) give the
single-device output of the same forced tiles under contiguous and placed heads, with the placement lowering the
kept-work imbalance. A launch without ``single`` reads the single-device outputs from ``--reference``; ``--merge``
makes one table of several launches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "multigpu.py"
LAYOUTS = {
    4: ["ulysses4", "ring4", "ulysses2xring2", "diffusers-ulysses4", "diffusers-ring4", "diffusers-ulysses2xring2"],
    8: ["ulysses8", "ring8", "ulysses4xring2", "ulysses2xring4", "diffusers-ulysses8", "diffusers-ring8",
        "diffusers-ulysses4xring2", "diffusers-ulysses2xring4"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(python, world: int, *args: str, timeout: int = 300) -> str:
    """``torchrun --standalone --nproc_per_node world benchmarks/multigpu.py --tiny ...`` with the ranks forked by
    ``python`` (``warm_python``) in torchrun's environment: torchrun would start each rank from scratch, 4-5 s of
    imports (torch, diffusers) a rank on 2 cores. Like torchrun, the first failing rank stops the others; returns the
    output of rank 0 (the table)."""
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--iters", "1", "--warmup", "1", *args]
    rendezvous = dict(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    ranks = [python.Popen(cmd, cwd=ROOT, env=dict(os.environ, **rendezvous, RANK=str(r), LOCAL_RANK=str(r)),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [rank.poll() for rank in ranks]
        if None not in codes or any(codes):
            break
        time.sleep(0.1)
    for rank in ranks:
        rank.kill()
    outputs = [rank.communicate()[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0] * world, "\n".join(out[-3000:] for out in outputs)
    return outputs[0]


def rows_of(path: Path) -> dict:
    return {(r["mode"], r["attention"]): r for r in json.loads(path.read_text())["rows"]}


@pytest.fixture(scope="module")
def run4(tmp_path_factory, warm_python) -> tuple[Path, dict, str]:
    tmp = tmp_path_factory.mktemp("multigpu4")
    stdout = launch(warm_python, 4, "--fractions", "1,0.25", "--reference", str(tmp / "ref.pt"),
                    "--json", str(tmp / "all.json"))
    return tmp, rows_of(tmp / "all.json"), stdout


def check_layouts(rows: dict, world: int) -> None:
    assert {mode for mode, _ in rows} == {"single", *LAYOUTS[world]}
    for mode in LAYOUTS[world]:
        for attention in ("sdpa", "lite f=1"):
            r = rows[mode, attention]
            assert r["rel_err_vs_single_sdpa"] < 1e-5, (mode, attention, r["rel_err_vs_single_sdpa"])
            assert r["kept_fraction"] == 1.0
            assert len(r["step_ms_per_rank"]) == world and r["step_ms"] == max(r["step_ms_per_rank"])
        forced = rows[mode, "lite f=0.25"]
        assert forced["rel_err_vs_single_sdpa"] > 1e-4, (mode, "the forced pattern must really skip")
        assert forced["kept_fraction"] <= 0.5  # ring-8 chunks of the tiny model hold 2 key tiles: 1 kept
        assert len(forced["kept_tiles_per_rank"]) == world
        timed = not mode.startswith("diffusers-")  # diffusers' processors run attention: not timed
        assert len(forced["attn_ms_per_rank"]) == (world if timed else 0), mode
    # Ulysses-P forces the same tiles per head as the single device: the same output
    assert rows[f"ulysses{world}", "lite f=0.25"]["rel_err_vs_single_same"] < 1e-5


def check_hetero(rows: dict, world: int) -> None:
    single, contiguous, placed = (rows[f"ulysses{world}" if i else "single", a] for i, a in
                                  ((0, "lite het"), (1, "lite het"), (1, "lite het placed")))
    assert 0.2 < single["kept_fraction"] < 0.8 and single["rel_err_vs_single_sdpa"] > 1e-4
    for r in (contiguous, placed):
        assert r["rel_err_vs_single_same"] < 1e-5, r  # same tiles per head, whichever rank holds the head
        assert sum(r["kept_tiles_per_rank"]) == single["kept_tiles_per_rank"][0]
    assert contiguous["head_orders"] is None
    orders = placed["head_orders"]
    assert len(orders) == 2 and all(sorted(o) == list(range(8)) for o in orders)
    assert contiguous["kept_imbalance"] > 1.05, contiguous["kept_tiles_per_rank"]
    if world == 8:  # one head per rank: nothing to move, place_heads keeps the contiguous order
        assert orders == [list(range(8))] * 2
        assert placed["kept_tiles_per_rank"] == contiguous["kept_tiles_per_rank"]
        return
    assert any(o != list(range(8)) for o in orders), "the per-head fractions must make placement move heads"
    assert placed["kept_imbalance"] < contiguous["kept_imbalance"], (placed["kept_tiles_per_rank"],
                                                                     contiguous["kept_tiles_per_rank"])


def test_every_layout_of_4_ranks_matches_the_single_device(run4):
    _, rows, stdout = run4
    check_layouts(rows, 4)
    assert "diffusers-ulysses2xring2 lite f=0.25" in stdout and "4 x " in stdout


def test_head_placement_on_4_ranks_keeps_the_output_and_balances_kept_work(run4):
    _, rows, _ = run4
    check_hetero(rows, 4)


def test_a_launch_without_single_reads_the_reference_and_merge_makes_one_table(run4, warm_python):
    tmp, rows, _ = run4
    launch(warm_python, 4, "--modes", "ulysses", "--fractions", "1", "--reference", str(tmp / "ref.pt"),
           "--json", str(tmp / "part.json"))
    part = rows_of(tmp / "part.json")
    assert set(part) == {("ulysses4", "sdpa"), ("ulysses4", "lite f=1")}
    assert part["ulysses4", "lite f=1"]["rel_err_vs_single_sdpa"] < 1e-5  # the reference came from the file
    assert part["ulysses4", "lite f=1"]["speedup_vs_single_sdpa"] is None  # no single row in this launch

    merged_path = tmp / "merged.json"
    proc = warm_python.run([sys.executable, str(SCRIPT), "--merge", str(tmp / "part.json"), str(tmp / "all.json"),
                            "--json", str(merged_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads(merged_path.read_text())
    keys = [(r["mode"], r["attention"]) for r in merged["rows"]]
    assert len(keys) == len(set(keys)) == len(rows)  # the duplicates of the second file are dropped
    first = {(r["mode"], r["attention"]): r for r in merged["rows"]}
    assert first["ulysses4", "lite f=1"]["step_ms"] == part["ulysses4", "lite f=1"]["step_ms"]  # first file wins
    base = rows["single", "sdpa"]["step_ms"]
    assert first["ulysses4", "lite f=1"]["speedup_vs_single_sdpa"] == pytest.approx(
        base / part["ulysses4", "lite f=1"]["step_ms"])
    assert merged["meta"]["merged_from"] == [str(tmp / "part.json"), str(tmp / "all.json")]

    other = json.loads((tmp / "all.json").read_text())
    other["meta"]["tokens"] += 1
    (tmp / "other.json").write_text(json.dumps(other))
    proc = warm_python.run([sys.executable, str(SCRIPT), "--merge", str(tmp / "all.json"), str(tmp / "other.json")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "differs from" in proc.stderr and "tokens" in proc.stderr


@pytest.mark.slow
def test_every_mode_of_8_ranks(tmp_path, warm_python):
    launch(warm_python, 8, "--fractions", "1,0.25", "--json", str(tmp_path / "all.json"), timeout=600)
    rows = rows_of(tmp_path / "all.json")
    check_layouts(rows, 8)
    check_hetero(rows, 8)


def test_layouts_of_a_world():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import multigpu
    finally:
        sys.path.remove(str(SCRIPT.parent))
    args = multigpu.parse_args(["--config", "wan14b-720p", "--device", "cpu", "--layers", "20"])
    assert (args.frames, args.height, args.width, args.model_name) == (81, 720, 1280, "Wan2.1-T2V-14B")
    t = args.transformer
    assert (t["num_attention_heads"], t["attention_head_dim"], t["ffn_dim"], t["num_layers"]) == (40, 128, 13824, 20)
    assert ((args.frames - 1) // 4 + 1) * (args.height // 16) * (args.width // 16) == 75_600
    assert multigpu.default_mixes(8, 40) == [(4, 2), (2, 4)]
    assert multigpu.default_mixes(4, 40) == [(2, 2)]
    assert multigpu.default_mixes(8, 12) == [(4, 2), (2, 4)]
    assert multigpu.default_mixes(8, 6) == [(2, 4)]
    assert multigpu.default_mixes(2, 40) == []
    names = [l.name for l in multigpu.layouts_of(["ulysses-ring", "diffusers-ring"], 8, 40, None)]
    assert names == ["ulysses4xring2", "ulysses2xring4", "diffusers-ring8"]
    with pytest.raises(SystemExit, match="ulysses8 does not fit 8 ranks and 12 heads"):
        multigpu.layouts_of(["ulysses"], 8, 12, None)
    with pytest.raises(SystemExit, match="ulysses3xring2 does not fit 8 ranks"):
        multigpu.layouts_of(["ulysses-ring"], 8, 12, [(3, 2)])
