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
