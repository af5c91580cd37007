"""Calibration of per-layer thresholds and warm-up steps under a quality budget (Optuna).

Example:
    >>> from litepatch.calibration import calibrate
    >>> recipe, report = calibrate(run, samples, "psnr >= 30", model=model, trials=12,
    ...                            storage="sqlite:///calib.db", held_out=held_out)
    >>> report.save("calibration-out")
"""

from .budget import Budget, Clause
from .metrics import Metric, available_metrics, get_metric, psnr, register_metric, rel_l2, ssim
from .errors import CalibrationError
from .feasibility import best_feasible
from .plan import Plan, recipe_from_params
from .report import CalibrationReport
from .runs import DenseCache
from .search import calibrate
from .space import SearchSpace
from .storage import make_storage

__all__ = [
    "Budget",
    "CalibrationError",
    "CalibrationReport",
    "Clause",
    "DenseCache",
    "Metric",
    "Plan",
    "SearchSpace",
    "available_metrics",
    "best_feasible",
    "calibrate",
    "get_metric",
    "make_storage",
    "psnr",
    "recipe_from_params",
    "register_metric",
    "rel_l2",
    "ssim",
]
