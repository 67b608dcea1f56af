"""Without a GPU, Triton kernels run in Triton's CPU interpreter. The switch is read when a kernel
is decorated (module import), so it must be set here, before any test module imports engine.kernels."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
