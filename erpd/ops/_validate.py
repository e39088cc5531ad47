"""Input validation for the public ops, in one place.

Shape, rank, dtype and device checks always run (they are free). Checks that read tensor values
(targets in range) run eagerly on CPU tensors; on CUDA they would force a host sync, so there
they run only when ``ERPD_CHECK_INPUTS=1`` or ``validate=True`` asks for them.
"""

from __future__ import annotations

import math
import os
from numbers import Real

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def want_value_checks(device: torch.device, validate: bool | None) -> bool:
    if validate is not None:
        return bool(validate)
    if device.type == "cpu":
        return True
    return os.environ.get("ERPD_CHECK_INPUTS", "0") == "1"


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def temperature(t) -> float:
    if isinstance(t, bool) or not isinstance(t, Real):
        raise TypeError(f"temperature must be a real number, got {type(t).__name__}")
    t = float(t)
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {t}")
    return t


def index(i, name: str) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"{name} must be an int, got {type(i).__name__}")
    return i


def linear_head(hidden, weight, bias, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Checks one `hidden [..., H]` / `weight [V, H]` / `bias [V]` triple; returns them."""
    h_name, w_name, b_name = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    hidden, weight = tensor(hidden, h_name), tensor(weight, w_name)
    if hidden.dim() < 1:
        raise ValueError(f"{h_name} must have shape [..., H], got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"{w_name} must have shape [V, H], got {tuple(weight.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{h_name} must be a floating tensor (fp16/bf16/fp32/fp64), got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_name} dtype {weight.dtype} does not match {h_name} dtype {hidden.dtype}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{h_name} has hidden size {hidden.shape[-1]} but {w_name} has shape {tuple(weight.shape)} "
            f"(expected [V, {hidden.shape[-1]}])"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} has an empty vocabulary (shape {tuple(weight.shape)})")
    if weight.device != hidden.device:
        raise ValueError(f"{w_name} is on {weight.device} but {h_name} is on {hidden.device}")
    if bias is not None:
        bias = tensor(bias, b_name)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{b_name} must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b_name} dtype {bias.dtype} does not match {h_name} dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"{b_name} is on {bias.device} but {h_name} is on {hidden.device}")
    return hidden, weight, bias


def targets(targets, hidden: torch.Tensor, vocab: int, ignore_index: int, check_values: bool) -> torch.Tensor:
    targets = tensor(targets, "targets")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    targets = targets.long()
    if check_values and targets.numel() > 0:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            first = targets[bad].flatten()[0].item()
            raise ValueError(
                f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"found {first} ({int(bad.sum())} out-of-range entries)"
            )
    return targets
