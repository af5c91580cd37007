"""The video-scale demo model on CPU at tiny sizes: preset, model choice, honest speed lines, the training
script's curriculum smoke run and the calibration script's smoke run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import litepatch.demo.model as demo_model
from litepatch.demo import cli as demo_cli
from litepatch.demo.model import DemoDiT, load_demo_model, preset
from litepatch.recipes import load as load_recipe
from litepatch.recipes import resolve

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


train_demo = _script("train_demo")


def test_video_preset_is_video_scale_with_heads_of_128_and_fits_the_size_limit():
    cfg = preset("video")
    assert cfg.seq_len >= 16384 and cfg.head_dim == 128
    assert cfg.seq_len / (6 * cfg.dim) >= 4  # attention FLOPs per token vs the linear layers'
    params = sum(p.numel() for p in DemoDiT(cfg).parameters())
    assert params * 2 <= 16 * 2**20  # fp16 file under 16 MB
    assert preset("small") == demo_model.DemoConfig()
    with pytest.raises(ValueError, match="unknown demo model 'huge'"):
        preset("huge")


def test_builtin_video_recipe_matches_the_video_model():
    recipe = resolve("demo-video")
    cfg = preset("video")
    assert recipe.fingerprint.head_dim == cfg.head_dim and recipe.fingerprint.num_layers == cfg.layers
    assert recipe.fingerprint.layer_names == [f"blocks.{i}.self_attn" for i in range(cfg.layers)]
    assert recipe.context.frames == cfg.frames and recipe.context.resolution == f"{cfg.height}x{cfg.width}"


def test_model_choice_fits_the_machine(monkeypatch, tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert demo_cli.choose_model("auto", cpu) == ("small", None)
    assert demo_cli.choose_model("video", cpu) == ("video", None)
    assert demo_cli.choose_model("small", cuda) == ("small", None)
    present = tmp_path / "present.safetensors"
    present.write_bytes(b"x")
    monkeypatch.setattr(demo_model, "default_weights_path", lambda model="small": present)
    assert demo_cli.choose_model("auto", cuda) == ("video", None)
    monkeypatch.setattr(demo_model, "default_weights_path", lambda model="small": tmp_path / "absent.safetensors")
    name, note = demo_cli.choose_model("auto", cuda)
    assert name == "small" and "not installed" in note
    assert demo_cli.choose_model("auto", cuda, weights=str(present)) == ("video", None)
    with pytest.raises(ValueError, match="--model must be one of"):
        demo_cli.choose_model("large", cpu)


def test_missing_video_weights_name_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_demo.py --model video"):
        load_demo_model(tmp_path / "none.safetensors", model="video")


def test_speed_lines_cpu_never_claim_a_ratio_and_cuda_uses_the_fastest_dense():
    cpu = demo_cli.speed_lines(torch.device("cpu"), 0.6, {"SDPA": 7.0}, 20.0)
    assert cpu[0].startswith("attention work saved: 40.0 %")
    assert "not a speed result" in cpu[1] and "x end to end" not in " ".join(cpu)
    assert cpu[-1].startswith("speed is measured on the GPU")
    gpu = demo_cli.speed_lines(torch.device("cuda"), 0.5, {"SDPA": 2.0, "flash-attn-4": 1.6}, 1.0)
    assert "baseline = the fastest, flash-attn-4" in gpu[1]
    assert gpu[-1].endswith("= 1.60x end to end")


def test_kept_tiles_picture_has_a_per_head_panel(tmp_path):
    records = [{"layer": f"blocks.{i}.self_attn", "step": s, "branch": 0, "kept_tiles": 8 - s, "total_tiles": 8}
               for i in range(2) for s in range(3)]
    path = demo_cli.write_kept_png(records, tmp_path / "k.png", steps=3, heads=[None, [1.0, 0.5], [0.5, 0.25]],
                                   head_layer="blocks.1.self_attn")
    image = Image.open(path)
    assert image.width > 1.5 * image.height  # two panels side by side


def test_curriculum_parsing_and_steps():
    cfg = train_demo.TINY_VIDEO
    stages = train_demo.parse_curriculum("2x8x16:4:3,4x16x32:2:1", cfg)
    assert [(s.frames, s.batch) for s in stages] == [(2, 4), (4, 2)]
    assert math.isclose(stages[0].share, 0.75)
    assert train_demo.stage_steps(stages, 10) == [8, 2]
    assert train_demo.stage_steps(stages, 1) == [1, 1]
    with pytest.raises(ValueError, match="does not fit the clip"):
        train_demo.parse_curriculum("8x16x32:2:1", cfg)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        train_demo.parse_curriculum("2x7x16:2:1", cfg)
    with pytest.raises(ValueError, match="FRAMESxHEIGHTxWIDTH:BATCH:SHARE"):
        train_demo.parse_curriculum("2x8:2", cfg)


def test_crops_are_windows_of_the_rendered_clips():
    videos = torch.arange(2 * 3 * 4 * 16 * 32, dtype=torch.float32).reshape(2, 3, 4, 16, 32)
    stage = train_demo.Stage(2, 8, 16, 3, 1.0)
    crops = train_demo.crop_batch(videos, torch.tensor([1, 0, 1]), stage, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 3, 2, 8, 16)
    for crop, i in zip(crops, (1, 0, 1)):
        # a window: consecutive values along width, frames and rows of the source clip
        f0, rem = divmod(int(crop[0, 0, 0, 0] - videos[i, 0, 0, 0, 0]), 16 * 32)
        y0, x0 = divmod(rem, 32)
        torch.testing.assert_close(crop, videos[i, :, f0:f0 + 2, y0:y0 + 8, x0:x0 + 16])
    full = train_demo.Stage(4, 16, 32, 2, 1.0)
    torch.testing.assert_close(train_demo.crop_batch(videos, torch.tensor([0, 1]), full, None), videos)


@pytest.fixture(scope="module")
def tiny_video_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    weights, meta = out / "tiny.safetensors", out / "train.json"
    assert train_demo.main(["--model", "video", "--tiny", "--steps", "3", "--videos", "4", "--device", "cpu",
                            "--out", str(weights), "--meta-json", str(meta), "--log-every", "1"]) == 0
    return weights, json.loads(meta.read_text())


def test_training_smoke_run_writes_loadable_weights_and_metadata(tiny_video_weights):
    weights, meta = tiny_video_weights
    model = load_demo_model(weights)
    assert model.config == train_demo.TINY_VIDEO
    assert meta["steps"] == 3 and meta["steps_planned"] == 3 and meta["stopped_early"] is False
    assert [stage[-1] for stage in meta["curriculum"]] == [2, 1]  # steps per stage
    assert len(meta["train_loss_by_stage"]) == 2 and all(math.isfinite(v) for v in meta["heldout_loss"])
    assert meta["weights_mb"] < 1 and "--steps 3" in meta["command"]
    assert model.training_metadata["steps"] == "3"


def test_training_steps_auto_needs_a_time_box(tmp_path):
    with pytest.raises(ValueError, match="--steps auto needs --max-seconds"):
        train_demo.main(["--model", "video", "--tiny", "--steps", "auto", "--videos", "2", "--device", "cpu",
                         "--out", str(tmp_path / "w.safetensors")])


def test_calibration_smoke_run_writes_report_recipe_and_plot(tiny_video_weights, tmp_path):
    calibrate_demo = _script("calibrate_demo")
    weights, _ = tiny_video_weights
    out = tmp_path / "cal"
    assert calibrate_demo.main(["--model", "video", "--weights", str(weights), "--steps", "2",
                                "--max-generations", "6", "--held-out", "2", "--uniform=-3,0",
                                "--frontier-random", "1", "--out", str(out)]) == 0
    result = json.loads((out / "calibration.json").read_text())
    assert result["calibration"]["generations"]["total"] <= 6
    assert len(result["recipe"]["per_sample"]) == 2
    assert {"min", "mean", "max"} <= set(result["recipe"]["psnr"])
    assert [p["kind"] for p in result["frontier"]] == ["uniform", "uniform", "random"]
    assert 0 <= result["attention_share"]["self_attention_share"] <= 1
    assert set(result["comparison"]["targets"]) == {
        "speedup>=1.6_at_budget", "generations<=30", "recipe_at_least_as_fast_as_best_uniform"}
    recipe = load_recipe(out / "demo-video.yaml")
    assert recipe.name == "demo-video" and recipe.fingerprint.head_dim == train_demo.TINY_VIDEO.head_dim
    assert recipe.measured.psnr == round(result["recipe"]["worst_psnr"], 2)
    assert "Per held-out sample" in (out / "calibration.md").read_text()
    assert "Timing scatter of the held-out samples" in (out / "calibration.md").read_text()
    assert result["recipe"]["seconds_scatter"] >= 0
    assert Image.open(out / "time_vs_quality.png").width > 0
    # the calibrator's held-out check and the script's rerun: the same generations judged by one metric (this tiny
    # model's clamped output spans [-1, 1], so the two PSNRs coincide here; the next test tells them apart)
    script = {json.dumps(r["sample"]): r["psnr"] for r in result["recipe"]["per_sample"]}
    checked = {json.dumps(r["sample"]): r["psnr"] for r in result["calibration"]["calibrator_held_out"]}
    assert checked.keys() == script.keys()
    for key, value in checked.items():
        assert value == pytest.approx(script[key], rel=1e-9) or value == script[key] == math.inf, key


def test_calibration_report_says_when_its_timings_scatter_at_equal_work():
    """Generations doing the same work (same kept fraction) must take the same time; when they scatter more than
    the speed-ups compared, the report says so (the H100 run of 2026-12-05 scattered 26 % at one kept fraction)."""
    calibrate_demo = _script("calibrate_demo")
    rows = [{"seconds": s, "kept_fraction": k} for s, k in ((0.684, 0.613), (0.863, 0.614), (0.75, 0.615),
                                                             (0.30, 0.20))]  # the last: other work, left out
    assert calibrate_demo.seconds_scatter(rows) == pytest.approx(0.863 / 0.684 - 1)
    noisy, quiet = calibrate_demo._scatter_line(0.26), calibrate_demo._scatter_line(0.02)
    assert "26.0%" in noisy and "noise" in noisy
    assert "2.0%" in quiet and "noise" not in quiet


def test_demo_psnr_is_the_demo_latents_psnr_not_the_reference_range_one():
    """The calibrator's generic psnr takes the dense output's own range; demo_psnr the latents' [-1, 1]: on a clip
    spanning [-0.5, 0.5] they differ by 20 log10(2) dB, and the demo budget must use the one the demo prints."""
    from litepatch.calibration.metrics import get_metric
    from litepatch.demo.sampling import psnr as demo_psnr
    from litepatch.demo.sampling import register_demo_metrics

    torch.manual_seed(0)
    ref = torch.rand(1, 3, 2, 8, 8) - 0.5
    ref.view(-1)[:2] = torch.tensor([-0.5, 0.5])
    out = ref + 0.01 * torch.randn_like(ref)
    metric = get_metric(register_demo_metrics())
    assert metric.higher_is_better and metric.fn(out, ref) == demo_psnr(out, ref)
    assert metric.fn(out, ref) - get_metric("psnr").fn(out, ref) == pytest.approx(20 * math.log10(2), abs=1e-6)


def test_calibration_budget_must_be_the_demo_psnr():
    calibrate_demo = _script("calibrate_demo")
    assert calibrate_demo.demo_psnr_bound("demo_psnr >= 28") == 28.0
    for budget in ("psnr >= 30", "demo_psnr >= 30 and ssim >= 0.9", "demo_psnr <= 30"):
        with pytest.raises(ValueError, match="must (be|read) 'demo_psnr >= "):
            calibrate_demo.demo_psnr_bound(budget)


def test_forward_census_counts_attention_and_the_fused_forward_moves_less():
    """benchmarks/demo_forward_census.py: one attention kernel per attention call, and fuse_pointwise() taking over
    the work between attention calls (if a block stops calling its BlockOps, the fused count stops falling)."""
    census = _script("demo_forward_census")
    cfg = preset("small")
    eager, fused = (census.census("small", 1, fused=f) for f in (False, True))
    assert eager.kernels["attention"] == fused.kernels["attention"] == 2 * cfg.layers  # self and cross
    for name in ("modulated_norm", "self_qkv", "cross_qkv", "merge_heads", "residual_norm", "mlp_residual"):
        assert fused.kernels[f"fused {name}"] > 0
    assert sum(fused.kernels.values()) < 0.7 * sum(eager.kernels.values())
    assert sum(fused.moved.values()) < 0.6 * sum(eager.moved.values())


def test_demo_profile_runs_dense_and_patched_and_the_patched_run_skips():
    """benchmarks/demo_profile.py on the CPU (its smoke form): the three runs, each with its time by op family,
    and a patched run that skipped tiles (so its third row is not a dense run under another name)."""
    result = _script("demo_profile").main(["--device", "cpu", "--model", "small", "--steps", "2",
                                           "--timed", "1", "--cfg-mode", "batched"])
    for row in ("dense SDPA", "litepatch dense path", "patched"):
        assert result[row]["wall_s"] > 0 and result[row]["gpu_ms_by_family"], row
    assert result["patched"]["syncs"] is None  # counted on CUDA only
    assert 0 < result["kept_fraction"] < 1
    # the dense path skips nothing, the recipe's per-layer thresholds included (it once ran them: a sparse "dense")
    assert result["litepatch dense path"]["kept_fraction"] == 1.0
