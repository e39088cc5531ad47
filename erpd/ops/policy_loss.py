"""`policy_loss`: clipped / gated / capped importance-ratio losses on per-token log-probs.

Autograd and dispatch live here; the math is in `erpd/reference.py` (`policy_loss`, the
definition), the kernels in `kernels/policy_loss.py` (Triton), `csrc/policy_loss/cpu.cpp` (C++)
and `csrc/policy_loss/kernels.cu` + `csrc/policy_loss/cuda.cpp` (CUDA), the last two sharing the per-token
math of `csrc/policy_loss/math.h`; both register `torch.ops.erpd.policy_loss_fwd`, which the
dispatcher routes by the tensors' device.

The fused backends implement one function on float32 contiguous [B, T] inputs:

    fwd(logprobs, old_logprobs, advantages [B] | [B, T], mask (bool), ref_logprobs | None,
        entropy | None, is_weights | None, num_items (0-dim f32) | None, method, agg, ratio_lo,
        ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef, kl_estimator, entropy_coef,
        num_items_value, norm_scale, kl_ratio_weighted, need_grad_entropy)
        -> (loss [], stats [NUM_STATS = 12], grad_logprobs [B, T], grad_entropy [B, T] | empty)

computing the loss, the metrics and dL/dlogprobs (and dL/dentropy) in one call; the gradients
leave out the batch normaliser 1/D (stats[0]), which the backward folds into its one scale:
grad = saved * (grad_output * stats[0]). Nothing reads a tensor value on the host.
"""

from __future__ import annotations

import torch

from erpd import backends, reference
from erpd.ops import _library, _validate, policy_spec
from erpd.ops._autograd import first_order_only

OP = "policy_loss"

# The `stats` vector's entries, in order (the table: erpd/ops/policy_spec.py).
STAT_NAMES = policy_spec.STAT_NAMES
_ALWAYS = tuple((i, n) for i, n in enumerate(STAT_NAMES) if n not in ("inv_norm", "kl_ref", "entropy"))
_KL_REF, _ENTROPY = STAT_NAMES.index("kl_ref"), STAT_NAMES.index("entropy")


def _impl(backend: str):
    """The fused backend's registered op (erpd/ops/_library.py)."""
    return _library.impl(backend, "policy_loss_fwd")


def metrics_from_stats(stats: torch.Tensor, has_ref: bool, has_entropy: bool) -> dict[str, torch.Tensor]:
    """The metrics dict from a kernel's `stats` vector (0-dim views, no copies)."""
    vals = stats.unbind()
    out = {name: vals[i] for i, name in _ALWAYS}
    if has_ref:
        out["kl_ref"] = vals[_KL_REF]
    if has_entropy:
        out["entropy"] = vals[_ENTROPY]
    return out


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """float32 contiguous (the common case passes through without a call into torch)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


class _PolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, entropy, old, adv, mask, ref, isw, num_items, args, fwd):
        need_grad_entropy = entropy is not None and ctx.needs_input_grad[1] and args[9] != 0.0
        loss, stats, g_lp, g_ent = fwd(
            logprobs, old, adv, mask, ref, entropy, isw, num_items, *args, need_grad_entropy,
        )
        ctx.save_for_backward(g_lp, g_ent if need_grad_entropy else None, stats)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @first_order_only(OP)
    def backward(ctx, grad_loss, _grad_stats):
        g_lp, g_ent, stats = ctx.saved_tensors
        scale = grad_loss * stats[0]
        return g_lp * scale, (None if g_ent is None else g_ent * scale), *([None] * 8)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    method: str = "ppo",
    agg: str = "token-mean",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    cispo_cap: float = 5.0,
    cispo_floor: float | None = None,
    reinforce_cap: float | None = None,
    is_weights: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_ratio_weighted: bool = False,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    num_items: float | torch.Tensor | None = None,
    norm_length: int | None = None,
    backend: str = "auto",
    validate: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Policy-gradient loss of per-token log-probs against an old policy; returns ``(loss, metrics)``.

    The loss and its options are defined in :func:`erpd.reference.policy_loss` (formulas there):
    ``L = sum_bt w_bt [rho_bt l_bt + kl_coef k_bt - entropy_coef H_bt]`` with the per-token
    ``method`` loss ``l``, aggregation weights ``w`` from ``agg`` / ``num_items`` /
    ``norm_length`` (:func:`erpd.reference.policy_agg_weights`), ``is_weights`` ``rho``.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy
            (differentiable; fp32, bf16 or fp16; fp64 with ``backend="torch"``).
        old_logprobs: ``[B, T]`` log-probs under the policy that the ratio is taken against
            (detached; ``logprobs.detach()`` for on-policy).
        advantages: ``[B]`` (one per sequence, GRPO) or ``[B, T]``.
        mask: ``[B, T]`` 0/1 (bool, integer or float); 0 = padding: no loss, no gradient.
        method: ``"ppo" | "sapo" | "cispo" | "gspo" | "reinforce"``.
        agg: ``"token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" | "seq-mean-token-sum-norm"``.
        clip_low, clip_high: ppo/gspo clip range ``[1 - clip_low, 1 + clip_high]``
            (``clip_high=None``: symmetric; ``clip_high=math.inf``: no ceiling; ``clip_low=1``:
            no floor).
        dual_clip: ppo/gspo dual clip ``c > 1`` for negative advantages (None: off).
        tau_pos, tau_neg: sapo gate temperatures for positive / non-positive advantages.
        cispo_cap, cispo_floor: cispo's bounds on the detached ratio (absolute values).
        reinforce_cap: reinforce's truncation of the detached ratio (None: none).
        is_weights: ``[B, T]`` detached per-token weights of the policy term (rollout correction).
        ref_logprobs, kl_coef, kl_estimator: KL(π‖π_ref) penalty with estimator ``k1|k2|k3``
            (``ref_logprobs`` without ``kl_coef`` only adds the ``kl_ref`` metric).
        kl_ratio_weighted: multiply each token's KL term by the importance ratio of the loss
            (differentiable; DeepSeek-V3.2's unbiased KL gradient, TRL's and Liger's
            ``use_bias_correction_kl``); needs ``ref_logprobs``.
        entropy, entropy_coef: ``[B, T]`` entropy (differentiable) and the bonus coefficient.
        num_items: the count of the whole optimizer step that the aggregation divides by
            (tokens for token-mean, sequences for seq-mean-*), so that gradient-accumulation
            micro-batches add up to the full-batch gradient; a number or a one-element tensor
            (read on device, no sync). It must be finite and > 0 (checked for a tensor where the
            value checks run); unchecked, a tensor below 1 counts as 1 and a NaN or infinite one
            makes the loss and gradients NaN, on every backend.
        norm_length: seq-mean-token-sum-norm's constant (default T).
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"`` (see ``erpd.backends``).
        validate: force (True) or skip (False) the value checks (mask is 0/1, no NaN in
            advantages / old / ref log-probs / is_weights at valid positions); by default they
            run on CPU tensors, and on CUDA only when ``ERPD_CHECK_INPUTS=1``.

    Returns:
        ``loss``: float32 0-dim tensor (float64 for float64 inputs on ``backend="torch"``);
        ``metrics``: dict of detached 0-dim tensors, ``pg_loss``, ``clipfrac_low``,
        ``clipfrac_high``, ``clipfrac``, ``ratio_mean``, ``ratio_min``, ``ratio_max``,
        ``approx_kl``, ``num_valid`` (the valid-token count the means are over), and ``kl_ref`` /
        ``entropy`` when those inputs are given.
    """
    logprobs = _validate.tensor(logprobs, "logprobs")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape [B, T], got {list(logprobs.shape)}")
    if logprobs.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"logprobs must be a floating tensor, got {logprobs.dtype}")
    dev = logprobs.device
    check_values = _validate.want_value_checks(dev, validate)
    old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights = _validate.policy_tensors(
        tuple(logprobs.shape), dev, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, check_values,
    )
    opts = _validate.policy_options(
        method=method, agg=agg, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, tau_pos=tau_pos,
        tau_neg=tau_neg, cispo_cap=cispo_cap, cispo_floor=cispo_floor, reinforce_cap=reinforce_cap,
        kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, norm_length=norm_length,
        kl_ratio_weighted=kl_ratio_weighted, has_ref=ref_logprobs is not None, has_entropy=entropy is not None,
    )
    n_tensor, n_value = _validate.num_items(num_items, dev, check_values)
    name = backends.resolve(backend, dev, OP)

    if name == "torch":
        return reference.policy_loss(
            logprobs, old_logprobs, advantages, mask, is_weights=is_weights, ref_logprobs=ref_logprobs,
            entropy=entropy, num_items=num_items if n_tensor is None else n_tensor, **opts.reference_kwargs(),
        )
    if logprobs.dtype == torch.float64:
        raise TypeError(f"backend={name!r} supports fp32/bf16/fp16 inputs; float64 runs only on backend='torch'")

    lp, ent = _f32(logprobs), _f32(entropy)  # differentiable: autograd casts the gradients back
    m = mask if mask.dtype == torch.bool else mask != 0
    loss, stats = _PolicyLossFunction.apply(
        lp, ent, _f32(old_logprobs), _f32(advantages), m.contiguous(), _f32(ref_logprobs), _f32(is_weights),
        n_tensor, opts.kernel_args(logprobs.shape[1], n_value), _impl(name),
    )
    return loss, metrics_from_stats(stats, ref_logprobs is not None, entropy is not None)
