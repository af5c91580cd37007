"""Shared pytest setup: GPU tests are skipped without CUDA; tests/unit is importable (tiny_models); ``warm_python``
starts Python commands of the subprocess tests without paying the imports again for each."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "unit"))

WARM_MODULES = (
    "torch", "torch.distributed", "optuna", "sqlalchemy.orm", "alembic.migration", "omegaconf", "litepatch.cli",
    "litepatch.calibration.job", "litepatch.calibration.search", "litepatch.parallel",
    "diffusers.models.transformers.transformer_wan", "conftest",
)
"""What the warm interpreter imports once (about 5 s): torch, the calibration job's stack, diffusers' Wan model, and
this file (``_run_command`` runs in the forked children)."""


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seeded():
    """Seeds torch's RNG so random-weight models and inputs are reproducible."""
    torch.manual_seed(0)
    return 0


# ----------------------------------------------------------------------------------------- warm interpreter


def _run_command(argv: list[str], env: dict[str, str], cwd: str | None, stdout: str | None, stderr: str | int | None,
                 new_session: bool) -> None:
    """In the forked child: what ``python *argv`` would do, in ``env`` and ``cwd``, with output to the given files."""
    import atexit

    if new_session:
        os.setsid()
    for fd, target in ((1, stdout), (2, stderr)):
        if target == subprocess.STDOUT:
            os.dup2(1, fd)
        elif target is not None:
            os.dup2(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    _adopt(env, cwd)
    try:
        _exec_python(argv)
    finally:
        atexit._run_exitfuncs()  # as the interpreter does at exit (multiprocessing ends its children with os._exit)


def _adopt(env: dict[str, str], cwd: str | None) -> None:
    """The environment, folder and what Python reads from the environment at start-up."""
    import warnings

    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    for action in filter(None, env.get("PYTHONWARNINGS", "").split(",")):
        warnings.simplefilter(action)
    if env.get("OMP_NUM_THREADS"):  # read by OpenMP when torch was imported, before the fork: set it again
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))


def _exec_python(argv: list[str]) -> None:
    """``python -m module ...``, ``python -c code ...`` or ``python script.py ...``, as ``__main__``."""
    import runpy

    flag, *rest = argv
    if flag == "-m":
        sys.argv = rest
        runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
    elif flag == "-c":
        sys.argv = ["-c", *rest[1:]]
        exec(compile(rest[0], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(flag)))
        runpy.run_path(flag, run_name="__main__")


class WarmPopen:
    """The part of :class:`subprocess.Popen` the tests use, for ``[sys.executable, ...]`` commands: the process is
    forked from a forkserver that has imported :data:`WARM_MODULES`. It is a real process of its own (SIGKILL,
    exit status, its own pid and session), minus the interpreter's start-up; ``PIPE`` output goes through files."""

    def __init__(self, args: list[str], *, env: dict | None = None, cwd: str | os.PathLike | None = None,
                 stdout: int | None = None, stderr: int | None = None, text: bool = False,
                 start_new_session: bool = False):
        if args[0] != sys.executable:
            raise ValueError(f"WarmPopen runs Python commands ({sys.executable} ...), got {args[0]!r}")
        self.args, self.returncode, self._text = list(args), None, text
        self._folder = tempfile.TemporaryDirectory(prefix="warm-popen-")
        self._pipes = {name: Path(self._folder.name) / name for name, how in (("stdout", stdout), ("stderr", stderr))
                       if how == subprocess.PIPE}
        for path in self._pipes.values():
            path.touch()  # read back empty when the child dies before it writes
        targets = [str(self._pipes[name]) if name in self._pipes else os.devnull if how == subprocess.DEVNULL else how
                   for name, how in (("stdout", stdout), ("stderr", stderr))]
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(WARM_MODULES))  # only the first start of the server reads it
        self._process = context.Process(
            target=_run_command, daemon=True,
            args=(self.args[1:], dict(os.environ if env is None else env), None if cwd is None else str(cwd),
                  *targets, start_new_session),
        )
        self._process.start()
        self.pid = self._process.pid
        if start_new_session:
            self._wait_for_session()

    def _wait_for_session(self) -> None:
        """Returns once the child leads its own process group, so that ``os.killpg(pid, ...)`` finds it."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.poll() is None:
            try:
                if os.getpgid(self.pid) == self.pid:
                    return
            except ProcessLookupError:
                return
            time.sleep(0.001)

    def poll(self) -> int | None:
        self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple:
        self.wait(timeout)
        return self._read("stdout"), self._read("stderr")

    def _read(self, name: str):
        if name not in self._pipes:
            return None
        data = self._pipes[name].read_bytes()
        return data.decode(errors="replace") if self._text else data

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WarmPython:
    """A stand-in for the :mod:`subprocess` module (``Popen``, ``run``, ``PIPE``...): Python commands start warm."""

    PIPE, STDOUT, DEVNULL = subprocess.PIPE, subprocess.STDOUT, subprocess.DEVNULL
    TimeoutExpired, CompletedProcess = subprocess.TimeoutExpired, subprocess.CompletedProcess
    Popen = WarmPopen

    @staticmethod
    def run(args: list[str], *, env: dict | None = None, cwd: str | os.PathLike | None = None,
            capture_output: bool = False, text: bool = False, timeout: float | None = None,
            ) -> subprocess.CompletedProcess:
        pipe = subprocess.PIPE if capture_output else None
        proc = WarmPopen(args, env=env, cwd=cwd, stdout=pipe, stderr=pipe, text=text)
        try:
            out, err = proc.communicate(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture(scope="session")
def warm_python() -> WarmPython:
    """Runs ``[sys.executable, ...]`` commands like :mod:`subprocess`, forked from an interpreter that imported torch,
    optuna and diffusers once (the kill-and-resume tests start dozens of jobs). Started here, so that the first
    test's own timings do not include the server's imports."""
    python = WarmPython()
    python.run([sys.executable, "-c", "pass"], timeout=120)
    return python
