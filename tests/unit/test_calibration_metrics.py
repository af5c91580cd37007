"""Quality metrics against known values, budget parsing and its errors, metric plug-ins."""

from __future__ import annotations

import math

import pytest
import torch

from litepatch.calibration import Budget, available_metrics, get_metric, psnr, register_metric, rel_l2, ssim


def test_psnr_known_values():
    ref = torch.zeros(2, 3, 4, 8, 8)
    assert psnr(ref + 0.1, ref, data_range=1.0) == pytest.approx(20.0)
    assert psnr(ref + 0.01, ref, data_range=1.0) == pytest.approx(40.0)
    assert psnr(ref + 0.1, ref, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2))
    assert psnr(ref, ref) == math.inf
    # default range: peak-to-peak of the dense reference (here 2.0), so frames and latents agree
    ref = torch.linspace(-1, 1, 100)
    assert psnr(ref + 0.02, ref) == pytest.approx(10 * math.log10(4 / 0.02**2))
    assert psnr((ref + 0.02 + 1) * 127.5, (ref + 1) * 127.5) == pytest.approx(psnr(ref + 0.02, ref))


def test_rel_l2_known_values():
    ref = torch.tensor([3.0, 4.0])
    assert rel_l2(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert rel_l2(ref, ref) == 0.0
    assert rel_l2(torch.zeros(2), torch.zeros(2)) == 0.0
    assert rel_l2(torch.ones(2), torch.zeros(2)) == math.inf


def test_ssim_known_values():
    x = torch.rand(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x) == pytest.approx(1.0)
    # constant images a, b: SSIM = (2ab + c1) / (a^2 + b^2 + c1) (the structure term is c2 / c2)
    a, b, rng = 0.6, 0.4, 1.0
    c1 = (0.01 * rng) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    constant_a, constant_b = torch.full((1, 1, 12, 12), a), torch.full((1, 1, 12, 12), b)
    assert ssim(constant_a, constant_b, data_range=rng) == pytest.approx(expected)
    noisy = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert 0.0 < ssim(noisy, x) < 0.9
    assert ssim(1 - x, x) < 0.0  # same mean, anti-correlated structure
    with pytest.raises(ValueError, match="at least 2-D"):
        ssim(torch.ones(4), torch.ones(4))


def test_metric_shape_mismatch_and_nan_are_named():
    with pytest.raises(ValueError, match=r"psnr.*\(2,\) differs from the dense reference \(3,\)"):
        get_metric("psnr")(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="rel_l2.*NaN"):
        get_metric("rel_l2")(torch.tensor([float("nan")]), torch.ones(1))


def test_register_metric_plugin_and_budget():
    name = "max_abs_test"
    register_metric(name, lambda o, r: float((o - r).abs().max()), higher_is_better=False, overwrite=True)
    assert name in available_metrics()
    budget = Budget.parse(f"{name} <= 0.5 and psnr >= 10")
    assert budget.holds({name: 0.4, "psnr": 11.0})
    assert not budget.holds({name: 0.6, "psnr": 11.0})
    with pytest.raises(ValueError, match="already registered"):
        register_metric(name, lambda o, r: 0.0, higher_is_better=False)
    with pytest.raises(ValueError, match="identifier"):
        register_metric("lp ips", lambda o, r: 0.0, higher_is_better=False)
    with pytest.raises(TypeError, match="callable"):
        register_metric("x_test", 3, higher_is_better=False, overwrite=True)


def test_budget_parsing():
    b = Budget.parse("psnr >= 30")
    assert str(b) == "psnr >= 30" and b.metrics == ["psnr"]
    b = Budget.parse("psnr>=30, rel_l2 <= 0.05 and ssim > 0.9")
    assert [str(c) for c in b.clauses] == ["psnr >= 30", "rel_l2 <= 0.05", "ssim > 0.9"]
    assert Budget.parse(["psnr >= 30", "ssim >= 0.9"]).metrics == ["psnr", "ssim"]
    assert b.violations({"psnr": 28.0, "rel_l2": 0.01, "ssim": 0.95}) == pytest.approx([2.0, -0.04, -0.05])
    assert Budget.parse("ssim > 0.9").violations({"ssim": 0.9})[0] > 0  # strict
    assert Budget.parse("psnr >= 30").violations({"psnr": math.inf})[0] < 0  # identical outputs: finite margin
    assert b.worst([{"psnr": 31.0, "rel_l2": 0.01, "ssim": 0.97}, {"psnr": 29.0, "rel_l2": 0.02, "ssim": 0.99}]) == {
        "psnr": 29.0, "rel_l2": 0.02, "ssim": 0.97}
    assert Budget.parse(b) is b


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty budget"),
        ("psnr", r"cannot parse budget clause 'psnr'"),
        ("psnr ~ 30", "op one of >=, <=, >, <"),
        ("psnr == 30", r"operator '==' is not one of"),
        ("lpips_unknown <= 0.1", r"clause 'lpips_unknown <= 0.1': unknown metric 'lpips_unknown'; available: .*psnr"),
        ("psnr >= thirty", r"bound 'thirty' is not a number"),
        ("psnr >= inf", "bound must be finite"),
        ("psnr <= 30", r"psnr is higher-is-better, so the budget must read 'psnr >= 30'"),
        ("rel_l2 >= 0.1", r"lower-is-better, so the budget must read 'rel_l2 <= 0.1'"),
    ],
)
def test_budget_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        Budget.parse(spec)


def test_budget_type_error():
    with pytest.raises(TypeError, match="budget must be a string"):
        Budget.parse(30)
