"""Errors of ``litepatch.calibration``.
"""

from __future__ import annotations




class CalibrationError(ValueError):
    """The calibration cannot go on (bad input, or no trial met the budget); the study is kept."""
