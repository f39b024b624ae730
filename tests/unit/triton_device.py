"""Where the Triton kernel tests run: on CUDA, or on CPU under the Triton interpreter
(`TRITON_INTERPRET=1`). A test module does `from tests.unit.triton_device import DEVICE, pytestmark`:
it is skipped when triton is not installed (CI) or when neither is available."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from disagg_mpi.model import triton_kernels as tk

DEVICE = "cpu" if tk.interpreting() else "cuda"
pytestmark = pytest.mark.skipif(
    not (tk.available(DEVICE) and (DEVICE == "cpu" or torch.cuda.is_available())),
    reason="needs CUDA or TRITON_INTERPRET=1")
