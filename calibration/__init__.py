"""Calibration of per-layer thresholds and warm-up steps (Optuna)."""
