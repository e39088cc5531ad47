"""What the Triton launchers of the vocabulary-tiled ops (linear_logprobs, linear_kl) share before
and after their kernels: the interpreter switch, the forward's tiles and vocabulary split, the
constexprs every kernel takes from its tile config, the backward's fp32 gradient workspaces and
the gradients made from them, and the device the launches go to (also used by policy_loss).

The kernels themselves, and each op's tile configs (``fwd_config``, ``bwd_config``), stay in the
op's module.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton

# Rows per program of the combine kernels that merge the vocabulary splits' partials.
COMBINE_BLOCK = 256


def interpreting() -> bool:
    # Read at call time, not import time: the path must follow the caller's environment.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(interpreting: bool) -> str:
    # Matters only for fp32 operands (bf16/fp16 ignore it). 3xTF32 on GPU: plain TF32 would lose
    # ~3 decimal digits against the IEEE fp32 GEMM that PyTorch uses by default.
    return "ieee" if interpreting else "tf32x3"


def launch_options(cfg: dict, h: int, interpreting: bool) -> dict:
    """The keyword arguments of a launch that follow from its tile config `cfg` (its tiles,
    GROUP_M where it has one, num_warps, num_stages) and the hidden size `h`: also the operand
    upcast (the interpreter's bf16 dot is wrong), the dot precision and whether H is a whole
    number of BLOCK_K slices."""
    return dict(UPCAST=interpreting, DOT_PRECISION=dot_precision(interpreting), EVEN_K=h % cfg["BLOCK_K"] == 0, **cfg)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _fwd_split(n_row_blocks: int, n_vocab_blocks: int, device: torch.device, interpreting: bool) -> int:
    """How many programs share one row block's vocabulary sweep."""
    if interpreting:
        # Two splits whenever possible, so that the interpreter exercises the combine kernel.
        return min(2, n_vocab_blocks)
    # About two waves of programs, but >= 4 vocabulary tiles per program so the partials and
    # the combine stay negligible next to the GEMM work.
    idx = device.index if device.index is not None else torch.cuda.current_device()
    want = triton.cdiv(2 * _sm_count(idx), n_row_blocks)
    return max(1, min(want, n_vocab_blocks // 4))


@dataclass(frozen=True)
class FwdGrid:
    """A forward launch over (row blocks, vocabulary splits): each program walks v_per_split
    columns (whole BLOCK_N tiles) of one row block."""

    cfg: dict
    n_row_blocks: int
    split: int
    v_per_split: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.n_row_blocks, self.split)

    @property
    def finalize(self) -> bool:
        """One split: the forward kernel writes the outputs itself, and no combine runs."""
        return self.split == 1


def fwd_grid(n: int, v: int, cfg: dict, device: torch.device, interpreting: bool) -> FwdGrid:
    """The forward's grid for n rows and a vocabulary of v with the tile config `cfg`."""
    bn = cfg["BLOCK_N"]
    n_row_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    n_vocab_blocks = triton.cdiv(v, bn)
    split = _fwd_split(n_row_blocks, n_vocab_blocks, device, interpreting)
    # Whole tiles per split; recount so that no split is empty.
    v_per_split = triton.cdiv(n_vocab_blocks, split) * bn
    return FwdGrid(cfg, n_row_blocks, triton.cdiv(v, v_per_split), v_per_split)


def bwd_grid(n: int, v: int, cfg: dict) -> tuple[int]:
    """One program per (row block, vocabulary block) pair; the kernel orders them in GROUP_M
    groups."""
    return (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(v, cfg["BLOCK_N"]),)


class GradWorkspaces:
    """The backward's fp32 workspaces dh [N, H], dW [V, H] and db [V] (with a bias), which the
    recompute-style backward kernels accumulate with atomics, and the gradients made from them."""

    def __init__(self, hidden, weight, bias, need_grad_hidden: bool, need_grad_weight: bool):
        n, h = hidden.shape
        v = weight.shape[0]
        self.need_h, self.need_w, self.need_b = bool(need_grad_hidden), bool(need_grad_weight), bias is not None
        f32 = dict(dtype=torch.float32, device=hidden.device)
        # Ignored rows never receive an atomic, so the workspaces must start at zero.
        self.dh = torch.zeros(n, h, **f32) if self.need_h else None
        self.dw = torch.zeros(v, h, **f32) if self.need_w else None
        self.db = torch.zeros(v, **f32) if self.need_b else None

    @property
    def needed(self) -> bool:
        """Whether any gradient is asked for (else there is nothing to launch)."""
        return self.need_h or self.need_w or self.need_b

    def pointers(self, stand_in) -> tuple:
        """The (dh, dW, db) kernel arguments. Unused outputs get `stand_in`, a harmless real fp32
        tensor; their constexpr flag (flags()) is off."""
        return tuple(stand_in if t is None else t for t in (self.dh, self.dw, self.db))

    def flags(self) -> dict:
        return dict(NEED_DH=self.need_h, NEED_DW=self.need_w, NEED_DB=self.need_b)

    def grads(self, hidden, weight):
        """(grad_hidden, grad_weight, grad_bias); each is torch.empty(0) when not requested.
        grad_hidden / grad_weight in the input dtype, grad_bias in float32."""
        empty = lambda dtype: torch.empty(0, dtype=dtype, device=hidden.device)  # noqa: E731
        grad_hidden = self.dh.to(hidden.dtype) if self.need_h else empty(hidden.dtype)
        grad_weight = self.dw.to(weight.dtype) if self.need_w else empty(weight.dtype)
        grad_bias = self.db if self.need_b else empty(torch.float32)
        return grad_hidden, grad_weight, grad_bias


def on_device(device: torch.device):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
