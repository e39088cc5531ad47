import pytest
import torch

import erpd


@pytest.fixture(params=[b for b in erpd.available("cpu") if b != "torch"])
def cpu_backend(request):
    """Every fused backend that runs on CPU tensors here (cpu; triton under the interpreter)."""
    return request.param


@pytest.fixture(params=[b for b in erpd.available("cpu", op="linear_kl") if b != "torch"])
def kl_backend(request):
    """Every fused linear_kl backend that runs on CPU tensors here."""
    return request.param


@pytest.fixture
def two_threads():
    """At least two intra-op threads for the test, so that the CPU drivers split their GEMMs
    between threads (csrc/common/chunked.h, gemm_parts) even on a one-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(max(n, 2))
    yield
    torch.set_num_threads(n)
