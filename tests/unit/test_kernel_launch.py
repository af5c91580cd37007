"""litepatch.kernels.launch: a Triton kernel's compiled form reused only for calls Triton would specialise alike.

A fake kernel stands in for Triton's JIT function (``kernel[grid](...)`` returns a compiled kernel whose
``compiled[grid](...)`` launches with every parameter in signature order), so the rule runs without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from litepatch.kernels import launch as launch_module
from litepatch.kernels.launch import launch


class FakeCompiled:
    packed_metadata = ()

    def __init__(self, log, launcher=None):
        self.log = log
        if launcher is not None:
            self.run, self.function, self.packed_metadata = launcher, 77, (4, 1, 0)

    def __getitem__(self, grid):
        sizes = (grid[0], grid[1], grid[2])  # as Triton's launcher reads them: a 1-d grid would fail here
        return lambda *args: self.log.append(("reused", sizes, args))


class FakeKernel:
    """Parameters ``ptr, n, FLAG, WIDTH`` (the last two constexpr)."""

    arg_names = ["ptr", "n", "FLAG", "WIDTH"]

    def __init__(self, compiles=True, launcher=None):
        self.log = []
        self.compiles = compiles
        self.launcher = launcher

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.log, self.launcher) if self.compiles else None
        return run


class FakeHooks:
    def __init__(self):
        self.calls = []


class FakeRuntime:
    def __init__(self):
        self.launch_enter_hook, self.launch_exit_hook = FakeHooks(), FakeHooks()


class FakeLauncher:
    """Triton 3.6's CudaLauncher as :func:`launch` reads it: ``launch`` is the C launcher."""

    launch_cooperative_grid, launch_pdl = False, False

    def __init__(self, log, scratch=0):
        self.log, self.global_scratch_size, self.profile_scratch_size = log, scratch, 0

    def launch(self, *args):
        self.log.append(("direct", args))


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(launch_module, "_RUNNERS", {})
    monkeypatch.setattr(launch_module, "current_device", lambda: 0)
    monkeypatch.setattr(launch_module, "REUSABLE", True)
    monkeypatch.setattr(launch_module, "DIRECT", False)


@pytest.fixture
def triton_3_6(monkeypatch):
    """The direct path's surroundings: Triton 3.6's hook chains and a current stream per device."""
    runtime = FakeRuntime()
    monkeypatch.setattr(launch_module, "DIRECT", True)
    monkeypatch.setattr(launch_module, "_triton_runtime", lambda: runtime)
    monkeypatch.setattr(launch_module, "_current_stream", lambda device: 1000 + device)
    return runtime


def kinds(kernel):
    return [entry[0] for entry in kernel.log]


def test_an_identical_call_reuses_the_compiled_kernel_with_parameters_in_signature_order():
    kernel, x = FakeKernel(), torch.zeros(4)
    launch(kernel, (3,), x, 5, WIDTH=32, FLAG=True, num_warps=4)
    launch(kernel, (3,), x, 5, WIDTH=32, FLAG=True, num_warps=4)
    assert kinds(kernel) == ["triton", "reused"]
    _, grid, args = kernel.log[1]
    assert grid == (3, 1, 1) and args[0] is x and args[1:] == (5, True, 32)  # constexprs by name, not by call order


@pytest.mark.parametrize("change", ["address", "dtype", "int", "constexpr", "option", "grid", "device"])
def test_anything_triton_specialises_on_goes_through_triton_again(change, monkeypatch):
    kernel = FakeKernel()
    buffer = torch.zeros(8, dtype=torch.int32)
    call = dict(tensor=buffer[:4], n=5, FLAG=True, num_warps=4, grid=(3,))
    launch(kernel, call["grid"], call["tensor"], call["n"], FLAG=call["FLAG"], WIDTH=32, num_warps=call["num_warps"])
    changed = dict(call, **{
        "address": dict(tensor=buffer[1:5]),
        "dtype": dict(tensor=buffer[:4].view(torch.float32)),
        "int": dict(n=6),
        "constexpr": dict(FLAG=False),
        "option": dict(num_warps=8),
        "grid": dict(grid=(4,)),
        "device": {},
    }[change])
    if change == "device":
        monkeypatch.setattr(launch_module, "current_device", lambda: 1)
    launch(kernel, changed["grid"], changed["tensor"], changed["n"], FLAG=changed["FLAG"], WIDTH=32,
           num_warps=changed["num_warps"])
    assert kinds(kernel) == ["triton", "triton"]


def test_without_a_compiled_kernel_every_call_goes_through_triton():
    kernel, x = FakeKernel(compiles=False), torch.zeros(4)  # Triton's interpreter returns nothing
    for _ in range(3):
        launch(kernel, (1,), x, 5, FLAG=True, WIDTH=32)
    assert kinds(kernel) == ["triton"] * 3 and launch_module.cached_launches() == 0


def test_a_parameter_left_to_its_default_is_left_to_triton():
    kernel, x = FakeKernel(), torch.zeros(4)
    for _ in range(2):
        launch(kernel, (1,), x, 5, FLAG=True)  # WIDTH not given: Triton fills its default
    assert kinds(kernel) == ["triton", "triton"]


def test_the_cache_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(launch_module, "MAX_KEYS", 2)
    kernel, x = FakeKernel(), torch.zeros(4)
    for n in (1, 2, 3):
        launch(kernel, (1,), x, n, FLAG=True, WIDTH=32)
    assert launch_module.cached_launches() == 1
    launch(kernel, (1,), x, 3, FLAG=True, WIDTH=32)
    assert kinds(kernel)[-1] == "reused"


def test_triton_before_3_3_is_left_to_bind_every_launch(monkeypatch):
    monkeypatch.setattr(launch_module, "REUSABLE", False)  # its launchers take only the non-constexpr parameters
    kernel, x = FakeKernel(), torch.zeros(4)
    for _ in range(2):
        launch(kernel, (1,), x, 5, FLAG=True, WIDTH=32)
    assert kinds(kernel) == ["triton", "triton"]


def test_on_triton_3_6_a_reused_launch_calls_the_c_launcher_with_addresses_and_no_hooks(triton_3_6):
    log = []
    kernel, x = FakeKernel(launcher=FakeLauncher(log)), torch.zeros(4)
    for _ in range(2):
        launch(kernel, (3,), x, 5, WIDTH=32, FLAG=True, num_warps=4)
    assert kinds(kernel) == ["triton"] and [entry[0] for entry in log] == ["direct"]
    args = log[0][1]
    # grid, stream of the current device, function, cooperative, PDL, two scratch buffers, metadata, launch
    # metadata, two hooks, then the parameters in signature order with the tensor as its address
    assert args == (3, 1, 1, 1000, 77, False, False, None, None, (4, 1, 0), None, None, None,
                    x.data_ptr(), 5, True, 32)


def test_an_installed_launch_hook_sends_the_launch_through_tritons_launcher(triton_3_6):
    log = []
    kernel, x = FakeKernel(launcher=FakeLauncher(log)), torch.zeros(4)
    launch(kernel, (3,), x, 5, WIDTH=32, FLAG=True)
    triton_3_6.launch_enter_hook.calls.append(print)  # a profiler
    launch(kernel, (3,), x, 5, WIDTH=32, FLAG=True)
    triton_3_6.launch_enter_hook.calls.clear()
    triton_3_6.launch_exit_hook = print  # assigned, as older Tritons allowed
    launch(kernel, (3,), x, 5, WIDTH=32, FLAG=True)
    assert kinds(kernel) == ["triton", "reused", "reused"] and log == []


@pytest.mark.parametrize("why", ["scratch", "other triton", "no cuda stream"])
def test_the_direct_launch_is_left_out_where_its_arguments_are_not_known(triton_3_6, monkeypatch, why):
    log = []
    launcher = FakeLauncher(log, scratch=128 if why == "scratch" else 0)
    if why == "other triton":
        monkeypatch.setattr(launch_module, "DIRECT", False)
    if why == "no cuda stream":
        monkeypatch.setattr(launch_module, "_current_stream", None)
    kernel, x = FakeKernel(launcher=launcher), torch.zeros(4)
    for _ in range(2):
        launch(kernel, (3,), x, 5, WIDTH=32, FLAG=True)
    assert kinds(kernel) == ["triton", "reused"] and log == []


def test_a_bound_launch_repeats_the_reused_launch_and_before_any_launch_goes_through_triton(triton_3_6):
    from litepatch.kernels.launch import bound_launch

    kernel, x = FakeKernel(), torch.zeros(4)
    early = bound_launch(kernel, (3,), x, 5, WIDTH=32, FLAG=True)  # nothing compiled yet: launch() each time
    early()
    bound = bound_launch(kernel, (3,), x, 5, WIDTH=32, FLAG=True)
    bound()
    bound()
    early()
    assert kinds(kernel) == ["triton", "reused", "reused", "reused"]
    assert kernel.log[1][2] == (x, 5, True, 32)  # signature order, the tensor itself (no direct launcher here)


def test_a_bound_direct_launch_passes_addresses_and_yields_to_an_installed_hook(triton_3_6):
    from litepatch.kernels.launch import bound_launch

    log = []
    kernel, x = FakeKernel(launcher=FakeLauncher(log)), torch.zeros(4)
    launch(kernel, (3,), x, 5, WIDTH=32, FLAG=True)
    bound = bound_launch(kernel, (3,), x, 5, WIDTH=32, FLAG=True)
    bound()
    assert [entry[0] for entry in log] == ["direct"] and log[0][1][-4:] == (x.data_ptr(), 5, True, 32)
    triton_3_6.launch_enter_hook.calls.append(print)  # a profiler
    bound()
    assert kinds(kernel) == ["triton", "reused"] and len(log) == 1
