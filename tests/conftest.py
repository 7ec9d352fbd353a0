"""Shared fixtures: the device matrix and a per-test random seed.

Every test that touches tensors takes the `device` fixture, so the GPU machine runs the very same
matrix as CI (CUDA cases are skipped where torch has no CUDA). The numerical tolerances live in
tests/accuracy.py and the shared sample inputs in tests/samples.py.
"""

import os
import sys
import zlib

import pytest
import torch

# The helper modules (samples.py, accuracy.py) sit next to this file; make them importable under
# any pytest import mode (prepend, append or importlib).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEVICES = [
    # CI and every machine: the CPU implementation (csrc/cpu).
    "cpu",
    # The GPU machine: the CUDA implementation (csrc/cuda) through the very same tests.
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Fresh random inputs for every test, reproducible: the seed is a hash of the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
