"""Test-wide setup.

TRITON_INTERPRET must be set before anything imports triton, so the Triton kernels run on
this CPU-only machine through the interpreter.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Sleeping (not spinning) OpenMP workers: the torch backend runs many small parallel regions,
# which spinning workers stall badly whenever the machine has other load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
