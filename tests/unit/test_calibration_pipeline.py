"""``litepatch calibrate`` on a ``pipeline:`` job: a tiny random-weight diffusers ``WanPipeline`` saved on disk.

Every component is built locally (no network): a 2-layer ``WanTransformer3DModel``, a tiny ``AutoencoderKLWan``
(unused: the job asks for latents), a 1-layer ``UMT5EncoderModel`` and a word-level tokenizer. The call makes
3 latent frames of 16x24 (patch 1x2x2: 288 self-attention tokens, 3x5 tiles of 128x64 for the CPU reference
kernel), 3 steps with classifier-free guidance. Random weights attend almost uniformly, so nothing would be
skipped: the self-attention key projection is tied to the query projection (and q/k norms scaled) instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

WORDS = "a red fox city at night cat in the snow blue sky over sea".split()

JOB = {  # written as JSON, which is YAML
    "pipeline_dtype": "float32",
    "pipeline_call": {"height": 128, "width": 192, "num_frames": 9, "num_inference_steps": 3,
                      "guidance_scale": 4.0, "max_sequence_length": 16},
    "samples": [["a red fox in the snow", 0], ["a city at night", 1]],
    "held_out": [["a blue sky over the sea", 7]],
    "budget": "psnr >= 12",
    "trials": 2,
    "objective": "sparsity",
    "output": "out",
    "name": "tiny-wan",
    "search": {"level": [-6.0, -0.5], "warmup": [0, 1]},
}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def wan_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny random-weight ``WanPipeline`` saved with ``save_pretrained`` (built once per session)."""
    import tiny_models as tm
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()
    tm.sharpen_wan_self_attention(transformer, 2.0)  # norms start at 1: the same 2.0 as before
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
    folder = tmp_path_factory.mktemp("tiny-wan") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


def _write_job(job_dir: Path, pipeline_dir: Path, **replace) -> Path:
    job_dir.mkdir(parents=True, exist_ok=True)
    job = {"pipeline": os.path.relpath(pipeline_dir, job_dir), **JOB, **replace}  # relative to the job's folder
    path = job_dir / "job.yaml"
    path.write_text(json.dumps(job, indent=1))
    return path


def _calibrate(*args: str) -> int:
    from litepatch.cli import main

    return main(["calibrate", *args, "--no-progress"])


def _study(out: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="litepatch-tiny-wan", storage=f"sqlite:///{out / 'study.db'}")


def _complete(out: Path) -> list:
    import optuna

    return _study(out).get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


@pytest.mark.filterwarnings("ignore")
def test_pipeline_job_calibrates_and_resumes(wan_pipeline_dir, tmp_path, monkeypatch, capsys):
    from litepatch.calibration import runs
    from litepatch.recipes import load

    branches = set()  # CFG branches the patched layers saw (guidance_scale > 1: cond and uncond)

    def run_patched(*args):
        out, elapsed, stats = run_patched_orig(*args)
        branches.update(stats.per_branch())
        return out, elapsed, stats

    run_patched_orig = runs.run_patched
    monkeypatch.setattr(runs, "run_patched", run_patched)
    job = _write_job(tmp_path / "jobs", wan_pipeline_dir)
    monkeypatch.chdir(tmp_path)  # the relative pipeline path must not resolve against the working directory
    assert not (tmp_path / os.path.relpath(wan_pipeline_dir, job.parent)).exists()
    assert _calibrate(str(job)) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "chosen trial" in stdout and "held-out psnr" in stdout
    assert branches == {"cond", "uncond"}, branches

    out = job.parent / "out"
    recipe = load(out / "recipe.yaml")
    fp = recipe.fingerprint
    assert fp.model_class == "WanTransformer3DModel"
    assert fp.layer_names == ["blocks.0.attn1", "blocks.1.attn1"]  # self-attention only; attn2 is cross
    assert (fp.heads, fp.head_dim) == (2, 32)
    assert recipe.provenance.prompts == ["a red fox in the snow", "a city at night"]
    assert recipe.provenance.seeds == [0, 1]
    context = recipe.context
    assert (context.resolution, context.frames, context.steps) == ("192x128", 9, 3)
    assert context.scheduler == "FlowMatchEulerDiscreteScheduler"

    report = json.loads((out / "report.json").read_text())
    assert len(report["trials"]) == 2
    kept = [t["kept_fraction"] for t in report["trials"]]
    assert min(kept) < 1.0, kept  # some trial skipped tiles: the kernel ran, not a dense fallback
    assert not report["held_out_is_calibration"]
    assert [row["sample"] for row in report["held_out"]] == [["a blue sky over the sea", 7]]
    assert report["held_out"][0]["psnr"] >= 12
    assert report["plan"]["steps"] == 3 and report["plan"]["layers"] == fp.layer_names
    assert len(list((out / "dense").glob("dense-*.safetensors"))) == 3  # 2 calibration + 1 held-out
    assert recipe.measured.kept_fraction is not None and recipe.measured.psnr is not None

    # again with one more trial: continues the study, no second sensitivity pass, no dense regeneration
    before = {t.number: (t.params, t.value) for t in _complete(out)}
    plan = _study(out).user_attrs["litepatch.plan"]
    dense_mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "dense").iterdir()}
    assert _calibrate(str(job), "--trials", "3") == 0, capsys.readouterr().err
    after = _complete(out)
    assert len(after) == 3
    assert {t.number: (t.params, t.value) for t in after if t.number in before} == before
    assert _study(out).user_attrs["litepatch.plan"] == plan
    assert {p.name: p.stat().st_mtime_ns for p in (out / "dense").iterdir()} == dense_mtimes
    report = json.loads((out / "report.json").read_text())
    assert len(report["trials"]) == 3
    assert report["generations"]["sensitivity"] == json.loads(plan)["generations"]


def test_pipeline_job_missing_folder(tmp_path, capsys):
    job = _write_job(tmp_path, tmp_path / "no-such-pipeline")
    assert _calibrate(str(job)) == 2
    err = capsys.readouterr().err
    assert "litepatch calibrate: error: pipeline folder" in err
    assert f"{tmp_path / 'no-such-pipeline'} does not exist" in err


def test_pipeline_job_bad_dtype(wan_pipeline_dir, tmp_path, capsys):
    job = _write_job(tmp_path, wan_pipeline_dir, pipeline_dtype="float33")
    assert _calibrate(str(job)) == 2
    assert "pipeline_dtype 'float33' is not a torch dtype" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("samples", [["a red fox", 0], "a city at night"], "pipeline samples must be [prompt, seed] pairs"),
        ("samples", [["a red fox", 0, 1]], "pipeline samples must be [prompt, seed] pairs"),
        ("samples", [[0, "a red fox"]], "pipeline samples must be [prompt, seed] pairs"),
        ("held_out", [["a cat", 1.5]], "pipeline held_out samples must be [prompt, seed] pairs"),
        ("samples", [], "a pipeline job needs 'samples'"),
        ("pipeline_call", {"generator": 3}, "pipeline_call must not set generator"),
    ],
)
def test_pipeline_job_bad_samples(wan_pipeline_dir, tmp_path, capsys, key, value, message):
    job = _write_job(tmp_path, wan_pipeline_dir, **{key: value})
    assert _calibrate(str(job)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out" / "study.db").exists()  # refused before any study or generation
