"""What the `torch` backend's kernels share: the fused backends' (fwd, bwd) contract written in
plain PyTorch, chunked over rows so that only ``[rows, V]`` logits exist at a time, accumulating
in float64 for float64 inputs and in float32 otherwise.

Each op's own kernels are in ``erpd/ops/<op>/torch_kernels.py``; these are their building blocks.
"""

from __future__ import annotations

import functools

import torch

# Bytes of one row chunk's logits (all of the kernel's [rows, V] temporaries together).
CHUNK_BYTES = 32 << 20


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def row_chunks(n: int, v: int, buffers: int):
    """Slices of at most CHUNK_BYTES / (buffers · 8 · V) rows covering [0, n)."""
    rows = max(1, min(n, CHUNK_BYTES // max(1, buffers * 8 * v)))
    return [slice(r0, r0 + rows) for r0 in range(0, n, rows)]


def autocast_off(fn):
    """Runs a kernel (first argument: a tensor on the device) with torch.autocast off: its GEMMs
    must stay in the accumulation dtype (the public ops cast the inputs as autocast would first)."""

    @functools.wraps(fn)
    def run(first, *args):
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args)

    return run


class Head:
    """The logits of one LM head in the kernels' terms: ``z = t(y) · inv_t`` with ``y = h Wᵀ + b``
    and ``t(y) = tanh(softcap_scale · y)`` when softcap_scale > 0, else ``y``."""

    def __init__(self, weight, bias, inv_t: float, softcap_scale: float, acc: torch.dtype):
        self.w = weight.to(acc)
        self.b = None if bias is None else bias.to(acc)
        self.inv_t, self.cap = inv_t, softcap_scale

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(h, self.w, self.b)
        return (torch.tanh(y * self.cap) if self.cap > 0 else y) * self.inv_t

    def dy(self, dz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """dL/dy from dL/dz, given this chunk's z (the chain rule of the temperature and softcap)."""
        if self.cap > 0:
            tanh = z / self.inv_t
            return dz * (self.inv_t * self.cap) * (1.0 - tanh * tanh)
        return dz * self.inv_t


def expect(logq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_k q_k x_k per row, with 0 · x = 0 where q_k = 0 (a masked, -inf logit)."""
    p = logq.exp()
    return (p * torch.where(p > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))).sum(-1)


class Grads:
    """dhidden, dweight, dbias accumulated chunk by chunk in the accumulation dtype."""

    def __init__(self, hidden, weight, bias, acc, need_h, need_w):
        n, v, dev = hidden.shape[0], weight.shape[0], hidden.device
        self.hidden, self.weight = hidden, weight
        self.gh = torch.zeros(n, hidden.shape[1], dtype=acc, device=dev) if need_h else None
        self.gw = torch.zeros(v, weight.shape[1], dtype=acc, device=dev) if need_w else None
        self.gb = torch.zeros(v, dtype=acc, device=dev) if bias is not None else None

    def add(self, dy: torch.Tensor, h: torch.Tensor, w: torch.Tensor, sl: slice) -> None:
        """One row chunk `sl`: dL/dy [rows, V], its hidden rows h and the head w (accumulation dtype)."""
        if self.gh is not None:
            self.gh[sl] = dy @ w
        if self.gw is not None:
            self.gw.addmm_(dy.T, h)
        if self.gb is not None:
            self.gb += dy.sum(0)

    def finish(self):
        """The contract's (grad_hidden, grad_weight, grad_bias): the inputs' dtypes, grad_bias in the
        accumulation dtype, an empty tensor for each gradient not asked for."""
        empty = self.hidden.new_empty(0)
        return (
            empty if self.gh is None else self.gh.to(self.hidden.dtype),
            empty if self.gw is None else self.gw.to(self.weight.dtype),
            empty if self.gb is None else self.gb,
        )
