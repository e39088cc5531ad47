"""Input validation for the public ops, in one place.

Shape, rank, dtype and device checks always run (they are free). Checks that read tensor values
(targets in range) run eagerly on CPU tensors; on CUDA they would force a host sync, so there
they run only when ``ERPD_CHECK_INPUTS=1`` or ``validate=True`` asks for them. Under
``torch.compile`` they never run (`want_value_checks`).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from numbers import Real

import torch

from erpd.ops import policy_spec
from erpd.ops.options import PolicyOptions

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def want_value_checks(device: torch.device, validate: bool | None) -> bool:
    """Whether to run the checks that read tensor values (see the module docstring).

    Never while torch.compile traces (even with validate=True): each check reads a tensor value
    on the host, which in a graph is a data-dependent branch, i.e. a graph break (an error under
    fullgraph=True) and, on CUDA, a sync. A compiled caller that wants them runs the op once
    eagerly with validate=True, or checks its inputs outside the compiled region.
    """
    if torch.compiler.is_compiling():
        return False
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


def logit_transform(temperature_, logit_scale, softcap) -> tuple[float, float]:
    """(inv_temperature, softcap_scale) of the kernels for logits ``softcap * tanh(logit_scale * y
    / softcap) / temperature`` (``logit_scale * y / temperature`` without ``softcap``), y = W h + b.

    The kernels compute ``tanh(softcap_scale * y) * inv_temperature`` when softcap_scale > 0, else
    ``y * inv_temperature``: a logit scale folds into the inverse temperature, and with
    softcapping the cap's outer factor does too. Models: Gemma 2/3 ``final_logit_softcapping``,
    Cohere ``logit_scale``, Granite ``1 / logits_scaling``, Falcon-H1 ``lm_head_multiplier``.
    """
    t = temperature(temperature_)
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, Real):
        raise TypeError(f"logit_scale must be a real number, got {type(logit_scale).__name__}")
    logit_scale = float(logit_scale)
    if not math.isfinite(logit_scale) or logit_scale <= 0.0:
        raise ValueError(f"logit_scale must be finite and > 0, got {logit_scale}")
    if softcap is None:
        return logit_scale / t, 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, Real):
        raise TypeError(f"softcap must be None or a real number, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap <= 0.0:
        raise ValueError(f"softcap must be None or finite and > 0, got {softcap}")
    return softcap / t, logit_scale / softcap


def index(i, name: str) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"{name} must be an int, got {type(i).__name__}")
    return i


_HALF = (torch.float16, torch.bfloat16)


def _as_autocast(hidden, weight, bias):
    """The tensors in the dtype ``F.linear(hidden, weight, bias)`` would compute in: under
    ``torch.autocast`` on hidden's device type, the autocast dtype (float64 is left alone, as
    autocast does); outside it, an fp32 weight (and bias) meeting fp16/bf16 hidden states (an fp32
    master weight and the activations of an autocast backbone) is cast to hidden's dtype. The casts
    are differentiable, so the gradient of an fp32 weight comes back in fp32."""
    def cast(t, dtype):
        return t if t is None or t.dtype == dtype or t.dtype not in (torch.float32, *_HALF) else t.to(dtype)

    device_type = hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return cast(hidden, dtype), cast(weight, dtype), cast(bias, dtype)
    if hidden.dtype in _HALF and weight.dtype == torch.float32:
        return hidden, cast(weight, hidden.dtype), cast(bias, hidden.dtype)
    return hidden, weight, bias


def linear_head(hidden, weight, bias, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Checks one `hidden [..., H]` / `weight [V, H]` / `bias [V]` triple; returns them in the dtype
    they compute in (`_as_autocast`: an fp32 head with fp16/bf16 hidden states, or any inputs under
    torch.autocast, run as autocast runs F.linear)."""
    h_name, w_name, b_name = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    hidden, weight = tensor(hidden, h_name), tensor(weight, w_name)
    if bias is not None:
        bias = tensor(bias, b_name)
    if hidden.dtype in FLOAT_DTYPES:
        hidden, weight, bias = _as_autocast(hidden, weight, bias)
    if hidden.dim() < 1:
        raise ValueError(f"{h_name} must have shape [..., H], got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"{w_name} must have shape [V, H], got {tuple(weight.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{h_name} must be a floating tensor (fp16/bf16/fp32/fp64), got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{w_name} dtype {weight.dtype} does not match {h_name} dtype {hidden.dtype} (an fp32 {w_name} with "
            f"fp16/bf16 {h_name} is accepted and runs as autocast would; other mixes are not)"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{h_name} has hidden size {hidden.shape[-1]} but {w_name} has shape {tuple(weight.shape)} "
            f"(expected [V, {hidden.shape[-1]}])"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} has an empty vocabulary (shape {tuple(weight.shape)})")
    if weight.shape[1] == 0:
        # Every logit would be the bias alone: surely a slicing mistake, and the kernels' [N, H] views
        # of a zero-size tensor are ambiguous.
        raise ValueError(f"{h_name} and {w_name} have hidden size 0 (shapes {tuple(hidden.shape)}, {tuple(weight.shape)})")
    if weight.device != hidden.device:
        raise ValueError(f"{w_name} is on {weight.device} but {h_name} is on {hidden.device}")
    if bias is not None:
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


def token_weights(x, valid: torch.Tensor, check_values: bool) -> torch.Tensor | None:
    """Per-token multipliers of a reduced loss: a floating tensor of the targets' shape, on their
    device, finite and >= 0 where a token counts (`valid`); returned detached."""
    if x is None:
        return None
    x = tensor(x, "token_weights")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"token_weights must be a floating tensor, got {x.dtype}")
    if x.shape != valid.shape:
        raise ValueError(f"token_weights must have the targets' shape {list(valid.shape)}, got {list(x.shape)}")
    if x.device != valid.device:
        raise ValueError(f"token_weights is on {x.device} but hidden is on {valid.device}")
    if check_values and x.numel() > 0:
        bad = valid & ~torch.isfinite(x)
        if bool(bad.any()):
            raise ValueError(f"token_weights is NaN or inf at {int(bad.sum())} counted (not ignored) position(s)")
        if bool((valid & (x < 0)).any()):
            raise ValueError("token_weights must be >= 0 at counted (not ignored) positions")
    return x.detach()


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


# --------------------------------------------------------------------------------------------
# policy losses
# --------------------------------------------------------------------------------------------

# Names -> the integer codes of the kernels (the table: erpd/ops/policy_spec.py).
POLICY_METHODS = policy_spec.METHOD_CODES
POLICY_AGGS = policy_spec.AGG_CODES
KL_ESTIMATORS = policy_spec.KL_ESTIMATOR_CODES


def _name(value, name: str, allowed: dict) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def real(x, name: str, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
         le: float | None = None) -> float:
    """A finite real number within the given bounds."""
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if gt is not None and not x > gt:
        raise ValueError(f"{name} must be > {gt}, got {x}")
    if ge is not None and not x >= ge:
        raise ValueError(f"{name} must be >= {ge}, got {x}")
    if lt is not None and not x < lt:
        raise ValueError(f"{name} must be < {lt}, got {x}")
    if le is not None and not x <= le:
        raise ValueError(f"{name} must be <= {le}, got {x}")
    return x


@dataclass(frozen=True)
class CheckedPolicyOptions:
    """Checked options of the policy losses (`erpd.ops.options.PolicyOptions`), with the kernels'
    view of them."""

    method: str
    agg: str
    kl_estimator: str
    clip_low: float
    clip_high: float
    dual_clip: float | None
    tau_pos: float
    tau_neg: float
    cispo_cap: float
    cispo_floor: float | None
    reinforce_cap: float | None
    kl_coef: float
    entropy_coef: float
    norm_length: int | None
    kl_ratio_weighted: bool

    def ratio_bounds(self) -> tuple[float, float]:
        """(lo, hi) of the ratio clip in the kernels' terms (unused by sapo)."""
        if self.method in ("ppo", "gspo"):
            return 1.0 - self.clip_low, 1.0 + self.clip_high
        if self.method == "cispo":
            return (0.0 if self.cispo_floor is None else self.cispo_floor), self.cispo_cap
        if self.method == "reinforce":
            return 0.0, (math.inf if self.reinforce_cap is None else self.reinforce_cap)
        return 0.0, math.inf

    def kernel_args(self, seq_len: int, num_items_value: float) -> tuple:
        """The scalar arguments of erpd::policy_loss_fwd / linear_policy_loss_fwd, from `method` to
        `kl_ratio_weighted`."""
        lo, hi = self.ratio_bounds()
        norm_scale = float(seq_len if self.norm_length is None else self.norm_length) if self.agg == "seq-mean-token-sum-norm" else 1.0
        return (
            POLICY_METHODS[self.method], POLICY_AGGS[self.agg], lo, hi,
            0.0 if self.dual_clip is None else self.dual_clip, self.tau_pos, self.tau_neg,
            self.kl_coef, KL_ESTIMATORS[self.kl_estimator], self.entropy_coef, num_items_value, max(norm_scale, 1.0),
            self.kl_ratio_weighted,
        )

    def options(self) -> PolicyOptions:
        """The checked values as options (clip_high resolved)."""
        return PolicyOptions(**self.reference_kwargs())

    def reference_kwargs(self) -> dict:
        return dict(
            method=self.method, agg=self.agg, clip_low=self.clip_low, clip_high=self.clip_high,
            dual_clip=self.dual_clip, tau_pos=self.tau_pos, tau_neg=self.tau_neg, cispo_cap=self.cispo_cap,
            cispo_floor=self.cispo_floor, reinforce_cap=self.reinforce_cap, kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator, entropy_coef=self.entropy_coef, norm_length=self.norm_length,
            kl_ratio_weighted=self.kl_ratio_weighted,
        )


def policy_options(**options) -> "CheckedPolicyOptions":
    """Checks the options of policy_loss / linear_policy_loss (see _policy_options); the result
    is cached per option tuple, since a trainer calls with the same options every step and the
    checks would otherwise be a visible part of a small call's cost. (Not under torch.compile,
    which traces the checks once and would only warn that it ignores the cache.)"""
    if torch.compiler.is_compiling():
        return _policy_options(**options)
    try:
        return _policy_options_cached(**options)
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
        return _policy_options(**options)  # e.g. a list where a number belongs: raise its clear error


def _policy_options(
    *, method, agg, clip_low, clip_high, dual_clip, tau_pos, tau_neg, cispo_cap, cispo_floor, reinforce_cap,
    kl_coef, kl_estimator, entropy_coef, norm_length, kl_ratio_weighted, has_ref: bool, has_entropy: bool | None,
) -> CheckedPolicyOptions:
    """Checks the options of policy_loss / linear_policy_loss (`has_entropy` None: the op
    computes the entropy itself)."""
    method = _name(method, "method", POLICY_METHODS)
    agg = _name(agg, "agg", POLICY_AGGS)
    kl_estimator = _name(kl_estimator, "kl_estimator", KL_ESTIMATORS)
    # clip_low = 1 puts the ratio floor at 0 (no floor); clip_high = inf: no ceiling.
    clip_low = real(clip_low, "clip_low", ge=0.0, le=1.0)
    if clip_high is None:
        clip_high = clip_low
    elif clip_high != math.inf:
        clip_high = real(clip_high, "clip_high", ge=0.0)
    if dual_clip is not None:
        if method not in ("ppo", "gspo"):
            raise ValueError(f"dual_clip applies to method='ppo' or 'gspo', not {method!r}")
        dual_clip = real(dual_clip, "dual_clip", gt=1.0)
    tau_pos = real(tau_pos, "tau_pos", gt=0.0)
    tau_neg = real(tau_neg, "tau_neg", gt=0.0)
    cispo_cap = real(cispo_cap, "cispo_cap", gt=0.0)
    if cispo_floor is not None:
        cispo_floor = real(cispo_floor, "cispo_floor", ge=0.0, lt=cispo_cap)
    if reinforce_cap is not None:
        reinforce_cap = real(reinforce_cap, "reinforce_cap", gt=0.0)
    kl_coef = real(kl_coef, "kl_coef")
    entropy_coef = real(entropy_coef, "entropy_coef")
    if kl_coef != 0.0 and not has_ref:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    if not isinstance(kl_ratio_weighted, bool):
        raise TypeError(f"kl_ratio_weighted must be a bool, got {type(kl_ratio_weighted).__name__}")
    if kl_ratio_weighted and not has_ref:
        raise ValueError("kl_ratio_weighted=True weights the KL term, which needs ref_logprobs")
    if entropy_coef != 0.0 and has_entropy is False:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy")
    if norm_length is not None:
        if agg != "seq-mean-token-sum-norm":
            raise ValueError(f"norm_length applies to agg='seq-mean-token-sum-norm' only, got agg={agg!r}")
        if isinstance(norm_length, bool) or not isinstance(norm_length, int) or norm_length <= 0:
            raise ValueError(f"norm_length must be a positive int, got {norm_length!r}")
    return CheckedPolicyOptions(
        method, agg, kl_estimator, clip_low, clip_high, dual_clip, tau_pos, tau_neg, cispo_cap, cispo_floor,
        reinforce_cap, kl_coef, entropy_coef, norm_length, kl_ratio_weighted,
    )


_policy_options_cached = functools.lru_cache(maxsize=256)(_policy_options)


def check_policy(options: PolicyOptions, *, has_ref: bool, has_entropy: bool | None) -> CheckedPolicyOptions:
    """`policy_options` for a `PolicyOptions`."""
    return policy_options(**options.asdict(), has_ref=has_ref, has_entropy=has_entropy)


def num_items(x, device: torch.device, check_values: bool) -> tuple[torch.Tensor | None, float]:
    """(tensor or None, value): a tensor `num_items` is read by the kernel (no host sync); a
    number must be finite and > 0, and so must a tensor's value where the value checks run
    (elsewhere every backend counts a value below 1 as 1 and makes the loss NaN for a NaN or
    infinite one: csrc/policy_loss/math.h, tensor_items). value 0.0 means "not given"."""
    if x is None:
        return None, 0.0
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"num_items must be a number or a one-element tensor, got shape {tuple(x.shape)}")
        if x.dtype == torch.bool or x.dtype.is_complex:
            raise TypeError(f"num_items must be a real tensor, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"num_items is on {x.device} but the batch is on {device}")
        x = x.detach().reshape(()).to(torch.float32)
        if check_values:
            v = float(x)
            if not (math.isfinite(v) and v > 0.0):
                raise ValueError(f"num_items must be finite and > 0 (the step's count of tokens or sequences), got tensor({v})")
        return x, 0.0
    return None, real(x, "num_items", gt=0.0)


def _floating(x, name: str, shape: tuple, *alt_shapes: tuple) -> torch.Tensor:
    x = tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if tuple(x.shape) != shape and tuple(x.shape) not in alt_shapes:
        want = " or ".join(str(list(s)) for s in (shape, *alt_shapes))
        raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}")
    return x


def policy_tensors(
    shape: tuple[int, int], device: torch.device, old_logprobs, advantages, mask, ref_logprobs, entropy,
    is_weights, check_values: bool, *, old_optional: bool = False,
):
    """Checks the [B, T] side inputs of the policy losses; returns them (mask unchanged)."""
    B, T = shape
    if old_logprobs is not None or not old_optional:
        old_logprobs = _floating(old_logprobs, "old_logprobs", (B, T))
    advantages = _floating(advantages, "advantages", (B,), (B, T))
    mask = tensor(mask, "mask")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must have shape {[B, T]}, got {list(mask.shape)}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be bool, integer or floating, got {mask.dtype}")
    ref_logprobs = None if ref_logprobs is None else _floating(ref_logprobs, "ref_logprobs", (B, T))
    entropy = None if entropy is None else _floating(entropy, "entropy", (B, T))
    is_weights = None if is_weights is None else _floating(is_weights, "is_weights", (B, T))
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask),
                    ("ref_logprobs", ref_logprobs), ("entropy", entropy), ("is_weights", is_weights)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the batch is on {device}")
    if check_values and mask.numel() > 0:
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
            raise ValueError(f"mask must hold only 0 and 1 (or be bool), found {bad}")
        valid = mask != 0
        for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages),
                        ("ref_logprobs", ref_logprobs), ("is_weights", is_weights)):
            if t is None:
                continue
            where = valid.any(1) if t.dim() == 1 else valid
            if bool((torch.isnan(t) & where).any()):
                raise ValueError(f"{name} has NaN at {int((torch.isnan(t) & where).sum())} valid (mask=1) position(s)")
            # ±inf log-probs are defined (the log-ratio is clamped to ±20); an infinite advantage
            # or weight would make the loss infinite and its gradient NaN.
            if name in ("advantages", "is_weights") and bool((torch.isinf(t) & where).any()):
                raise ValueError(f"{name} has inf at {int((torch.isinf(t) & where).sum())} valid (mask=1) position(s)")
        if is_weights is not None and bool(((is_weights < 0) & valid).any()):
            raise ValueError("is_weights must be >= 0 at valid (mask=1) positions")
    return old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights


def vocab_shard(tp_group, weight: torch.Tensor, vocab_start) -> int | None:
    """Checks the vocab-parallel arguments (`tp_group`, this rank's `weight` shard, `vocab_start`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("tp_group was given but torch.distributed is not initialized (call init_process_group first)")
    if not isinstance(tp_group, dist.ProcessGroup):
        raise TypeError(f"tp_group must be a torch.distributed ProcessGroup, got {type(tp_group).__name__}")
    if weight.shape[0] < 1:
        raise ValueError("with tp_group, every rank's weight shard needs at least one vocabulary row")
    if vocab_start is not None:
        vocab_start = index(vocab_start, "vocab_start")
        if vocab_start < 0:
            raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    return vocab_start
