"""Importing litepatch stays light (DESIGN §2): diffusers, optuna and triton load only where used."""

import subprocess
import sys


def test_import_litepatch_does_not_import_heavy_optional_packages():
    code = "import sys, litepatch, litepatch.cli; litepatch.cli.build_parser(); " \
           "print(sorted(m for m in ('diffusers', 'optuna', 'triton', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_calibrate_front_door_reaches_the_calibrator(monkeypatch):
    import litepatch
    import litepatch.calibration

    seen = {}
    monkeypatch.setattr(litepatch.calibration, "calibrate", lambda *a, **k: seen.update(args=a, kwargs=k) or "ok")
    assert litepatch.calibrate("run", budget="psnr >= 30") == "ok"
    assert seen == {"args": ("run",), "kwargs": {"budget": "psnr >= 30"}}


def test_repo_root_kernels_folder_is_the_one_registered_package():
    # From the repository root, `kernels/` is importable as a top-level package (transformers probes it
    # by importing it). It must be litepatch.kernels itself: a second copy would re-register the custom op
    # against an empty backend registry (seen as KeyError: 'triton' on CUDA).
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    code = (
        "import kernels, litepatch.kernels, sys; "
        "print(kernels is litepatch.kernels, [m for m in sys.modules if m.startswith('kernels.')])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True []"
