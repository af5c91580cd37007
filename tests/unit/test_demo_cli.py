"""``litepatch demo`` end to end on CPU with reduced steps: table, both PNGs, clear errors."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest
from PIL import Image

from litepatch.cli import COMMANDS
from litepatch.demo import cli as demo_cli


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="litepatch demo")
    demo_cli.add_arguments(parser)
    return demo_cli.run(parser.parse_args(argv))


def test_demo_is_the_registered_subcommand():
    assert COMMANDS["demo"][0] == "litepatch.demo.cli"


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory) -> tuple:
    """One demo run with the CPU's defaults (CFG included), 3 steps, threshold 0: its output folder and printed text
    (two tests read it; each run costs about 5 s on 2 cores)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert _run(["--steps", "3", "--threshold", "0", "--warmup-steps", "1", "--out", str(out)]) == 0
    return out, printed.getvalue()


def test_demo_end_to_end_writes_both_pngs(end_to_end):
    out, text = end_to_end
    assert "PSNR vs dense" in text and "final: PSNR" in text
    lines = text.splitlines()
    last = lines[-3:]  # what the run says about speed comes last
    assert last[0].startswith("attention work saved: ") and "% of the tiles" in last[0]
    saved = float(last[0].split(": ")[1].split(" %")[0])
    final = next(line for line in lines if line.startswith("final: PSNR"))
    assert f"({saved:.1f} % skipped)" in final, "work saved is the run's skipped fraction"
    assert last[1].startswith("wall time (cpu, not a speed result)") and "x" not in last[1].split("s.")[0][-8:]
    assert "end to end" not in text and "speed-up" not in last[1], "no CPU speed ratio"
    assert last[2].startswith("speed is measured on the GPU")
    floor = next(line for line in lines if line.startswith("dense-vs-dense floor: PSNR"))
    assert float(floor.split()[3]) > 60, "two exact dense kernels agree far above any budget"
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert float(rows[0][2]) == 1.0  # warm-up step: dense
    assert float(rows[2][2]) < 1.0  # threshold 0 skips tiles once the warm-up is over
    frames = Image.open(out / "frames.png")
    assert frames.width > frames.height and frames.mode == "RGB"
    heat = Image.open(out / "kept_tiles.png")
    assert heat.width > 0 and heat.height > 0


def test_demo_with_batched_cfg_labels_its_one_branch(tmp_path, capsys):
    assert _run(["--steps", "3", "--threshold", "0", "--warmup-steps", "1", "--cfg-mode", "batched",
                 "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if "PSNR vs dense" in line)
    assert "cond+unc" in header and "uncond" not in header
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2] and float(rows[2][2]) < 1.0  # step 1 writes the first list


def test_fused_pointwise_compiles_before_the_dense_time_is_taken(tmp_path, monkeypatch):
    """--fuse-pointwise compiles on the first forward: a warm-up generation runs first on a CPU too, so the dense
    wall time is not the compilation's."""
    from litepatch.demo import model as demo_model

    monkeypatch.setattr(demo_model, "compiled_ops", lambda backend="inductor": demo_model.EAGER_OPS)  # no compiler
    callbacks = []  # per generation, whether it records steps (the dense one does; a warm-up does not)
    real = demo_cli.timed_generation
    monkeypatch.setattr(demo_cli, "timed_generation", lambda *a, **k: callbacks.append(len(a) > 4) or real(*a, **k))
    assert _run(["--steps", "2", "--fuse-pointwise", "--out", str(tmp_path)]) == 0
    assert callbacks[:2] == [False, True]  # a warm-up generation, then the timed dense one


def test_demo_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="names no shape"):
        _run(["--prompt", "red moving left", "--steps", "1", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="threshold must be <= 0"):
        _run(["--threshold", "3", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--steps must be >= 1, got 0"):
        _run(["--steps", "0", "--out", str(tmp_path)])


def test_heatmap_has_one_row_per_layer(tmp_path):
    records = [
        {"layer": f"blocks.{layer}.self_attn", "step": step, "branch": 0, "kept_tiles": 10 - step, "total_tiles": 10}
        for layer in range(3) for step in range(4)
    ]
    path = demo_cli.write_heatmap_png(records, tmp_path / "h.png", steps=4, cell=10)
    image = Image.open(path).convert("RGB")
    # first cell of layer 0 is fully computed (yellow), the last one (0.7) is greener
    assert image.getpixel((150 + 2, 24 + 2)) == (250, 230, 40)
    assert image.getpixel((150 + 32, 24 + 2)) != (250, 230, 40)


@pytest.mark.parametrize("argv, device, expected", [
    ([], "cpu", ("sequential", False)),
    ([], "cuda", ("batched", True)),  # the GPU demo's fastest form, for dense and patched alike
    (["--cfg-mode", "sequential", "--no-fuse-pointwise"], "cuda", ("sequential", False)),
    (["--cfg-mode", "batched", "--fuse-pointwise"], "cpu", ("batched", True)),
])
def test_the_cfg_mode_and_the_compiled_regions_default_by_device_and_yield_to_flags(argv, device, expected,
                                                                                    monkeypatch):
    import torch

    monkeypatch.setattr(demo_cli, "_can_compile_for_cuda", lambda: True)
    parser = argparse.ArgumentParser(prog="litepatch demo")
    demo_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    demo_cli._machine_defaults(args, torch.device(device))
    assert (args.cfg_mode, args.fuse_pointwise) == expected


def test_the_header_says_how_cfg_runs(end_to_end):
    header = next(line for line in end_to_end[1].splitlines() if line.startswith("litepatch demo:"))
    assert "CFG 4.0 (sequential)" in header


def test_without_triton_the_cuda_demo_runs_eager_and_says_why(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(demo_cli, "_can_compile_for_cuda", lambda: False)
    parser = argparse.ArgumentParser(prog="litepatch demo")
    demo_cli.add_arguments(parser)
    args = parser.parse_args([])
    demo_cli._machine_defaults(args, torch.device("cuda"))
    assert (args.cfg_mode, args.fuse_pointwise) == ("batched", False)
    assert "Triton is not installed" in capsys.readouterr().out
