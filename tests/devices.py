"""The device x dtype matrix of the kernel tests (the pattern of TorchRL's ``get_default_devices``).

CPU always runs; the CUDA cases are always collected and skip with a reason when there is no GPU,
so a run on a GPU machine and one without it list the same test ids.
"""

from __future__ import annotations

import pytest
import torch

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")


def get_default_devices() -> list:
    """``pytest.param`` devices: ``cpu``, and ``cuda`` (skipped without a GPU)."""
    return [pytest.param(torch.device("cpu"), id="cpu"), pytest.param(torch.device("cuda"), id="cuda", marks=NO_CUDA)]


FLOAT_DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
"""What the pure-torch pieces accept; ``compute_advantage`` takes float32 only (SPEC: float32)."""
