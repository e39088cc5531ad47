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


def _same_lead(x: torch.Tensor, name: str, hidden: torch.Tensor, extra: str) -> None:
    if x.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; its leading dims must equal hidden's {tuple(hidden.shape[:-1])} ({extra})"
        )
    if x.device != hidden.device:
        raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")


def kl_teacher(hidden, weight, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk, check_values):
    """Checks the teacher of linear_kl; returns ("fused" | "dense" | "topk", its tensors)."""
    given = [name for name, x in (("teacher_hidden/teacher_weight", teacher_hidden if teacher_hidden is not None else teacher_weight),
                                  ("teacher_logits", teacher_logits), ("teacher_topk", teacher_topk)) if x is not None]
    if len(given) != 1:
        raise ValueError(
            "linear_kl needs exactly one teacher: (teacher_hidden, teacher_weight[, teacher_bias]), "
            f"teacher_logits or teacher_topk; got {given or 'none'}"
        )
    if teacher_bias is not None and given[0] != "teacher_hidden/teacher_weight":
        raise ValueError("teacher_bias goes with teacher_hidden and teacher_weight only")
    vocab = weight.shape[0]
    if teacher_logits is not None:
        teacher_logits = tensor(teacher_logits, "teacher_logits")
        if not teacher_logits.dtype.is_floating_point:
            raise TypeError(f"teacher_logits must be a floating tensor, got {teacher_logits.dtype}")
        _same_lead(teacher_logits, "teacher_logits", hidden, "[..., V]")
        if teacher_logits.shape[-1] != vocab:
            raise ValueError(f"teacher_logits has vocabulary {teacher_logits.shape[-1]} but weight has {vocab}")
        return "dense", (teacher_logits,)
    if teacher_topk is not None:
        if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
            raise TypeError("teacher_topk must be a pair (logprobs [..., k], ids [..., k])")
        t_logp, ids = tensor(teacher_topk[0], "teacher_topk[0] (logprobs)"), tensor(teacher_topk[1], "teacher_topk[1] (ids)")
        if not t_logp.dtype.is_floating_point:
            raise TypeError(f"teacher_topk logprobs must be a floating tensor, got {t_logp.dtype}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"teacher_topk ids must be an integer tensor, got {ids.dtype}")
        _same_lead(t_logp, "teacher_topk logprobs", hidden, "[..., k]")
        if ids.shape != t_logp.shape:
            raise ValueError(f"teacher_topk ids shape {tuple(ids.shape)} != logprobs shape {tuple(t_logp.shape)}")
        if ids.device != hidden.device:
            raise ValueError(f"teacher_topk ids are on {ids.device} but hidden is on {hidden.device}")
        k = ids.shape[-1]
        if not 1 <= k <= vocab:
            raise ValueError(f"teacher_topk needs 1 <= k <= V={vocab}, got k={k}")
        ids = ids.long()
        if check_values and ids.numel() > 0:
            if bool(((ids < 0) | (ids >= vocab)).any()):
                raise ValueError(f"teacher_topk ids must be in [0, {vocab})")
            if k > 1 and bool((ids.sort(-1).values.diff(dim=-1) == 0).any()):
                raise ValueError("teacher_topk ids must be distinct within each token")
            if bool((t_logp > 0).any()) or bool(torch.isnan(t_logp).any()):
                raise ValueError("teacher_topk logprobs must be log-probabilities (<= 0, not NaN)")
            if bool((t_logp.double().exp().sum(-1) > 1 + 1e-3).any()):
                raise ValueError("teacher_topk probabilities sum to more than 1 for some token")
        return "topk", (t_logp, ids)
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("a fused teacher needs both teacher_hidden [..., H_teacher] and teacher_weight [V, H_teacher]")
    th, tw, tb = linear_head(teacher_hidden, teacher_weight, teacher_bias, prefix="teacher_")
    _same_lead(th, "teacher_hidden", hidden, "[..., H_teacher]")
    if tw.shape[0] != vocab:
        raise ValueError(f"teacher_weight has vocabulary {tw.shape[0]} but weight has {vocab}; student and teacher must share a vocabulary")
    if th.dtype != hidden.dtype:
        raise TypeError(f"teacher_hidden dtype {th.dtype} does not match hidden dtype {hidden.dtype}")
    return "fused", (th, tw, tb)


def choice(value, name: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def probability(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return x
