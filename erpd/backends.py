"""Backend selection, in one place for every op.

``auto`` picks, for CUDA tensors, the backend that the committed GPU benchmark table found
faster for that op (``AUTO_CUDA`` below); for CPU tensors, ``cpu`` when the extension is built,
else ``torch``. An explicitly requested backend that cannot run raises; there is no silent
fallback.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from erpd import _ext

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

# Per-op choice of `auto` on CUDA tensors: the faster backend on an H100 (`cuda` for every op, by
# 2-3x for the fused ops; measurements in benchmarks/results/README.md, "Where the defaults in the
# code come from"). When the preferred backend is not built, `auto` takes the other one.
AUTO_CUDA: dict[str, str] = {"linear_logprobs": "cuda", "linear_kl": "cuda", "policy_loss": "cuda", "linear_policy_loss": "cuda"}

# The compiled kernels (erpd::<name>) an op needs, for the `cpu` backend (CPU dispatch key) and
# the `cuda` backend (CUDA key) alike: a backend is available when erpd._C registers all of
# them for its key. Ops not listed need `<op>_fwd` and `<op>_bwd`. The policy losses compute their
# gradients in the forward, so their backward is a scale in Python.
KERNELS: dict[str, tuple[str, ...]] = {
    "linear_kl": ("linear_kl_fwd", "linear_kl_bwd", "linear_kl_fwd_with_grads"),  # the last for reductions
    "policy_loss": ("policy_loss_fwd",),
    "linear_policy_loss": ("linear_policy_loss_fwd",),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on these inputs."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _missing_kernel(op: str | None, key: str) -> str | None:
    """erpd._C can import without an op's kernels for a dispatch key: say so instead of failing
    later inside the dispatcher."""
    if op is None:
        return None
    for kernel in KERNELS.get(op, (f"{op}_fwd", f"{op}_bwd")):
        name = f"erpd::{kernel}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
            hint = " (backend='triton' runs this op on CUDA tensors)" if key == "CUDA" and op in AUTO_CUDA else ""
            return f"erpd._C has no {key} kernel registered for {name}{hint}"
    return None


def why_unavailable(backend: str, device: torch.device, op: str | None = None) -> str | None:
    """None if `backend` can run `op` (any op when None) on tensors on `device`, else why not."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend='cpu' needs CPU tensors, got {device.type} tensors"
        return _missing_kernel(op, "CPU") if _ext.has_cpu() else _ext.unavailable_reason()
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend='cuda' needs CUDA tensors, got {device.type} tensors"
        return _missing_kernel(op, "CUDA") if _ext.has_cuda() else _ext.unavailable_reason()
    if backend == "triton":
        if not _triton_installed():
            return "backend='triton' needs the triton package (pip install -r requirements/requirements.txt)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return (
            f"backend='triton' needs CUDA tensors (got {device.type}); on CPU it runs only under "
            "the Triton interpreter (set TRITON_INTERPRET=1 before importing erpd)"
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# Under torch.compile the answer is a constant of the trace (it depends only on the build, the
# environment and the device, which the tensors' guards pin): dynamo calls it once instead of
# tracing the dispatcher queries inside, which it cannot.
@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device, op: str) -> str:
    """Turn the user's `backend` argument into a concrete backend name for `op`."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            preferred = AUTO_CUDA.get(op, "triton")
            for cand in (preferred, "triton", "cuda"):
                if why_unavailable(cand, device, op) is None:
                    return cand
            return "torch"
        if device.type == "cpu" and why_unavailable("cpu", device, op) is None:
            return "cpu"
        return "torch"
    reason = why_unavailable(backend, device, op)
    if reason is not None:
        raise BackendUnavailableError(reason)
    return backend


def available(device: torch.device | str = "cpu", op: str = "linear_logprobs") -> list[str]:
    """Concrete backends that can run `op` on `device` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if why_unavailable(b, device, op) is None]
