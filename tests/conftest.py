"""Shared pytest setup: GPU tests are skipped without CUDA; tests/unit is importable (tiny_models)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "unit"))


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
