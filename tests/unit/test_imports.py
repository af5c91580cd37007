"""Importing litepatch stays light (DESIGN §2): diffusers, optuna and triton load only where used."""

import subprocess
import sys


def test_import_litepatch_does_not_import_heavy_optional_packages():
    code = "import sys, litepatch, litepatch.cli\nfor c in litepatch.cli.COMMANDS: litepatch.cli.build_parser(c)\n" \
           "print(sorted(m for m in ('diffusers', 'optuna', 'triton', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_top_level_help_imports_no_command_and_no_torch():
    """`litepatch --help` lists every command without importing their modules (each pulls in torch: 4 s)."""
    code = ("import sys, contextlib, io\nfrom litepatch.cli import main, COMMANDS\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(all(c in out.getvalue() for c in COMMANDS), 'torch' in sys.modules,"
            " sorted(m for m, _ in COMMANDS.values() if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True False []"


def test_calibrate_front_door_reaches_the_calibrator(monkeypatch):
    import litepatch
    import litepatch.calibration

    seen = {}
    monkeypatch.setattr(litepatch.calibration, "calibrate", lambda *a, **k: seen.update(args=a, kwargs=k) or "ok")
    assert litepatch.calibrate("run", budget="psnr >= 30") == "ok"
    assert seen == {"args": ("run",), "kwargs": {"budget": "psnr >= 30"}}


ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _import_kernels_from_root(extra_path: str = "") -> str:
    """`import kernels` in a fresh interpreter whose sys.path starts with the repository root (as under
    `python -m pytest` run there), then `extra_path`; prints what it got."""
    code = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}] + ([{extra_path!r}] if {extra_path!r} else []); "
        "import kernels, litepatch.kernels; "
        "print(kernels is litepatch.kernels, getattr(kernels, 'MARK', None), "
        "[m for m in sys.modules if m.startswith('kernels.')], litepatch.kernels.__name__)"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_repo_root_kernels_folder_is_the_one_registered_package_when_no_namesake_is_installed():
    # From the repository root, `kernels/` is importable as a top-level package (transformers probes it
    # by importing it). Without another `kernels` installed it must be litepatch.kernels itself: a second
    # copy would re-register the custom op against an empty backend registry (KeyError: 'triton' on CUDA).
    import importlib.machinery

    if importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if p not in ("", str(ROOT))]):
        # Hugging Face's `kernels` is installed (transformers 5 requires it): the next test's case.
        assert _import_kernels_from_root().startswith("False None")
    else:
        assert _import_kernels_from_root() == "True None [] litepatch.kernels"


def test_repo_root_does_not_shadow_an_installed_kernels_package(tmp_path):
    # transformers 5 requires Hugging Face's `kernels`, and diffusers' PEFT loader imports names from it
    # (`from kernels import CUDAProperties`): run from a checkout, the root's `kernels/` folder must not
    # shadow it, and litepatch.kernels stays the one package of the custom op.
    package = tmp_path / "kernels"
    package.mkdir()
    (package / "__init__.py").write_text("from .sub import MARK\n")
    (package / "sub.py").write_text("MARK = 'namesake'\n")
    assert _import_kernels_from_root(str(tmp_path)) == "False namesake ['kernels.sub'] litepatch.kernels"


def test_the_recipes_read_the_kernels_vocabulary_without_importing_torch():
    """`litepatch recipes list/show/pull/push` need the recipes and the kernels' vocabulary (thresholds, orders), not
    the backends: `litepatch.kernels` loads its names on first use (0.4 s for the command instead of 4.5 s)."""
    code = "import sys, litepatch.recipes.cli, litepatch.kernels.vocabulary; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_kernels_submodules_are_attributes_of_the_package_as_before():
    """`litepatch.kernels` loads lazily; its submodules still come as attributes (`litepatch.kernels.registry`)."""
    code = ("import litepatch.kernels as k\n"
            "print(k.registry.__name__, k.state.SkipState.__name__, 'torch' in dir(k))\n"
            "try:\n    k.no_such_name\nexcept AttributeError as err:\n    print(err)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["litepatch.kernels.registry SkipState False",
                                "module 'litepatch.kernels' has no attribute 'no_such_name'"]
