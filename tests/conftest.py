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


@pytest.fixture(params=[False, True], ids=["one-chunk", "two-chunks"])
def split_gemms(request, monkeypatch, two_threads):
    """A test whose inputs have 600 rows and V = 1100 runs with two threads, so that the CPU
    drivers split each GEMM into one single-threaded GEMM per thread (csrc/common/chunked.h,
    gemm_parts): the logits by columns, dh by rows and dW by vocabulary rows, ragged. In the
    "two-chunks" case, calling the fixture's value with the op's number of logits buffers sets a
    budget of 512 rows per block: a second, smaller row chunk or vocabulary block that is not
    split, and dW and dh summed across them."""
    if not erpd._ext.has_cpu():
        pytest.skip("erpd._C not built")

    def budget(buffers: int) -> None:
        if request.param:
            monkeypatch.setenv("ERPD_CHUNK_BYTES", str(512 * buffers * 4 * 1100))

    return budget
