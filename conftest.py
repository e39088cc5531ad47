"""pytest setup shared by tests/ and benchmarks/.

Without CUDA, the Triton kernels run under the Triton interpreter, which must be switched on
before any `@triton.jit` function is defined, i.e. before erpd.kernels is imported: so here, at
the first conftest import. `setdefault` lets a user override it. Tests marked `gpu` skip
cleanly without CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
