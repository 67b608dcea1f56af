"""Without a GPU, Triton kernels run in Triton's CPU interpreter. The switch is read when a kernel
is decorated (module import), so it must be set here, before any test module imports engine.kernels."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny ops on a loaded 2-core CI box: OpenMP's thread team makes them ~20x slower (measured
    on the engine tests). Modules that run the tiny engine use it with pytestmark."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
