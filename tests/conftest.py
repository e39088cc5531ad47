import pytest

import erpd


@pytest.fixture(params=[b for b in erpd.available("cpu") if b != "torch"])
def cpu_backend(request):
    """Every fused backend that runs on CPU tensors here (cpu; triton under the interpreter)."""
    return request.param


@pytest.fixture(params=[b for b in erpd.available("cpu", op="linear_kl") if b != "torch"])
def kl_backend(request):
    """Every fused linear_kl backend that runs on CPU tensors here."""
    return request.param
