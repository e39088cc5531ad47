"""Loads the compiled extension `erpd._C` once and says what it was built with."""

from __future__ import annotations

import torch

try:
    from erpd import _C  # noqa: F401  (registers the erpd:: torch ops)

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built: the torch backend still works
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def has_cpu() -> bool:
    """True when the C++ CPU backend is compiled in."""
    return _C is not None


def has_cuda() -> bool:
    """True when the CUDA backend is compiled in (needs a CUDA build of torch)."""
    return _C is not None and bool(_C.built_with_cuda())


def cpu_isa() -> str | None:
    """The ISA level of the CPU epilogues' vectorized row loops (``default`` = the compiler's
    baseline, ``avx2``, ``avx512``): ERPD_CPU_ISA if set, else the best this CPU runs. None when
    the extension is not built."""
    return None if _C is None else _C.cpu_isa()


def release_cpu_scratch() -> int:
    """Free the logits blocks that the ``cpu`` backend keeps between calls, and return their
    bytes (0 without the extension).

    The CPU drivers keep each fp32 logits block of 32 MiB and more (128 MiB at the default
    chunk budget; two for ``linear_kl``) for the next call, so that calls do not pay the page
    faults of fresh memory.
    ``ERPD_CPU_SCRATCH=0`` turns the keeping off. Blocks a running call uses are not freed."""
    return 0 if _C is None else int(_C.release_cpu_scratch())


def cpu_scratch_bytes() -> int:
    """Bytes of logits blocks the ``cpu`` backend keeps between calls (0 without the extension)."""
    return 0 if _C is None else int(_C.cpu_scratch_bytes())


def unavailable_reason() -> str:
    if _C is None:
        return (
            f"erpd._C could not be imported ({_IMPORT_ERROR}); build it with "
            "`pip install -e . --no-build-isolation --no-deps`"
        )
    return "erpd._C was built without CUDA (the installed torch has no CUDA, or ERPD_SKIP_CUDA_BUILD=1)"


def ops() -> "torch._ops._OpNamespace":
    return torch.ops.erpd
