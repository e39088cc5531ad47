"""`linear_policy_loss`: the policy losses of `erpd.policy_loss` fused with the log-prob computation.

A token-level policy loss is a function of each token's log-prob (and entropy) with weights that
depend on the mask only, so its gradient w.r.t. the log-prob is known as soon as the log-prob
is. The fused backends therefore compute dhidden, dweight (and dbias) *in the forward* and save
them; the autograd backward only multiplies them by grad_output, with no pass over the
vocabulary (Liger's chunked losses do the same with autograd per chunk).

Backends:
  cpu     one C++ call (csrc/linear_policy_loss/cpu.cpp) on the chunked driver's
          forward_with_grads: per row chunk, the logits GEMM, the log-prob/entropy epilogue, the
          policy-loss gradient of the chunk's tokens (csrc/policy_loss/math.h), dz in place, and
          the dh, dW GEMMs: 6·N·H·V FLOPs. gspo needs each sequence's mean log-ratio before any
          of its gradients, so it runs a log-prob pass first, then the gradient pass (8·N·H·V).
  triton  the Triton kernels composed inside the forward: linear_logprobs forward, the policy
          loss kernel, linear_logprobs backward (8·N·H·V; the backward is still a scale). A
          single-pass Triton kernel would need the policy math in the logits tile loop.
  cuda    the cpu backend's structure on CUDA tensors (csrc/linear_policy_loss/cuda.cpp): cuBLAS
          GEMMs with fp32 logits, the linear_logprobs CUDA epilogues and the policy-loss kernels
          of csrc/policy_loss/kernels.cu; 1/D comes from the mask on the device, so nothing syncs.
  torch   the reference composition (erpd.reference.linear_logprobs + policy_loss) through
          ordinary autograd, which recomputes nothing but materializes the [N, V] logits.
"""

from __future__ import annotations

import torch

from erpd import backends, reference
from erpd.ops import _library, _tp, _validate
from erpd.ops._autograd import GradsInForward
from erpd.ops.policy_loss import metrics_from_stats

OP = "linear_policy_loss"


def _run_compiled(h2, w, b, t1, inv_t, cap, ignore_index, old, adv, mask, ref, isw, n_tensor, args):
    """backend cpu or cuda: one erpd._C op, whose CPU or CUDA kernel the dispatcher picks by device."""

    def run(need_h, need_w):
        loss, stats, gh, gw, gb, lp = torch.ops.erpd.linear_policy_loss_fwd(
            h2, w, b, t1, inv_t, cap, ignore_index, old, adv, mask, ref, isw, n_tensor, *args, need_h, need_w,
        )
        return loss, (gh, gw, gb), (stats, lp)

    return run


def _run_triton(h2, w, b, t1, inv_t, cap, ignore_index, old, adv, mask, ref, isw, n_tensor, args):
    # The registered Triton ops (erpd/ops/_library.py), so that torch.compile traces through.
    kl = kp = torch.ops.erpd_triton

    B, T = mask.shape

    def run(need_h, need_w):
        lp, ent, lse, _ = kl.linear_logprobs_fwd(h2, w, b, t1, inv_t, cap, ignore_index, False)
        lp2, ent2 = lp.view(B, T), ent.view(B, T)
        with_grad_entropy = args[9] != 0.0
        loss, stats, g_lp, g_ent = kp.policy_loss_fwd(
            lp2, lp2 if old is None else old, adv, mask, ref, ent2, isw, n_tensor, *args, with_grad_entropy,
        )
        # The policy kernel leaves out 1/D (stats[0]); the GEMMs below need the true gradients.
        g_lp.mul_(stats[0])
        if with_grad_entropy:
            g_ent.mul_(stats[0])
        gh, gw, gb = kl.linear_logprobs_bwd(
            h2, w, b, t1, lse, ent, g_lp.view(-1), g_ent.view(-1) if with_grad_entropy else None,
            inv_t, cap, ignore_index, need_h, need_w,
        )
        return loss, (gh, gw, gb), (stats, lp)

    return run


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
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
    entropy_coef: float = 0.0,
    num_items: float | torch.Tensor | None = None,
    norm_length: int | None = None,
    backend: str = "auto",
    validate: bool | None = None,
    tp_group=None,
    vocab_start: int | None = None,
    return_logprobs: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Policy loss straight from hidden states and the LM head, gradients computed in the forward.

    Equals ``erpd.policy_loss(logprobs, old_logprobs, advantages, mask', entropy=entropy, ...)``
    with ``logprobs, entropy = erpd.linear_logprobs(hidden, weight, targets, bias=bias,
    temperature=temperature, ignore_index=ignore_index, with_entropy=True)`` and
    ``mask' = mask & (targets != ignore_index)``, without materializing the logits and without a
    second pass over the vocabulary in the backward.

    Args:
        hidden: ``[B, T, H]`` final hidden states of the completion tokens.
        weight: ``[V, H]`` LM head (``bias``: optional ``[V]``); same dtype as ``hidden``, or fp32
            with fp16/bf16 ``hidden`` (as :func:`erpd.linear_logprobs`).
        temperature, logit_scale, softcap: the logits, as in :func:`erpd.linear_logprobs`.
        targets: ``[B, T]`` the sampled token ids (``ignore_index`` entries are masked out).
        old_logprobs: ``[B, T]``, or None for on-policy (the ratio is exp(x - sg(x)) = 1 with
            the policy gradient, as TRL does when it does not reuse a batch).
        advantages, mask, method, agg, ..., backend, validate: as in :func:`erpd.policy_loss`;
            the entropy is computed here (it is always in the metrics), ``entropy_coef`` adds
            the bonus.
        tp_group, vocab_start: vocabulary sharding as in :func:`erpd.linear_logprobs`. The
            vocab-parallel log-probs and entropy (identical on every rank) go through
            :func:`erpd.policy_loss`, whose gradient flows back through them (a backward pass
            over the shard, instead of the gradients computed in the forward).

        return_logprobs: also put the per-token log-probs the op computed on the way into
            ``metrics["logprobs"]`` (``[B, T]`` float32, detached, 0 at ignored targets): what a
            trainer logs (the log-ratio to the old policy, ...) without a second pass.

    Returns:
        ``(loss, metrics)`` as :func:`erpd.policy_loss` (``entropy`` always among the metrics).
        Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    hidden, weight, bias = _validate.linear_head(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, H], got {list(hidden.shape)}")
    inv_t, cap = _validate.logit_transform(temperature, logit_scale, softcap)
    ignore_index = _validate.index(ignore_index, "ignore_index")
    if tp_group is not None:
        if softcap is not None:
            raise NotImplementedError("softcap with tp_group is not supported (logit_scale is)")
        loss, metrics, lp = _tp.linear_policy_loss(
            hidden, weight, bias, targets, old_logprobs, advantages, mask, temperature=1.0 / inv_t,
            ignore_index=ignore_index, backend=backend, validate=validate, tp_group=tp_group, vocab_start=vocab_start,
            method=method, agg=agg, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, tau_pos=tau_pos,
            tau_neg=tau_neg, cispo_cap=cispo_cap, cispo_floor=cispo_floor, reinforce_cap=reinforce_cap,
            is_weights=is_weights, ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator,
            kl_ratio_weighted=kl_ratio_weighted, entropy_coef=entropy_coef, num_items=num_items, norm_length=norm_length,
        )
        return loss, _with_logprobs(metrics, lp, return_logprobs)
    dev = hidden.device
    check_values = _validate.want_value_checks(dev, validate)
    targets = _validate.targets(targets, hidden, weight.shape[0], ignore_index, check_values)
    B, T = targets.shape
    old_logprobs, advantages, mask, ref_logprobs, _, is_weights = _validate.policy_tensors(
        (B, T), dev, old_logprobs, advantages, mask, ref_logprobs, None, is_weights, check_values, old_optional=True,
    )
    opts = _validate.policy_options(
        method=method, agg=agg, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, tau_pos=tau_pos,
        tau_neg=tau_neg, cispo_cap=cispo_cap, cispo_floor=cispo_floor, reinforce_cap=reinforce_cap,
        kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, norm_length=norm_length,
        kl_ratio_weighted=kl_ratio_weighted, has_ref=ref_logprobs is not None, has_entropy=None,
    )
    n_tensor, n_value = _validate.num_items(num_items, dev, check_values)
    name = backends.resolve(backend, dev, OP)
    valid = (mask != 0) & (targets != ignore_index)

    if name == "torch" or B * T == 0:
        # (An empty batch takes this path on every backend: nothing to fuse.)
        lp, ent = reference.linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index, with_entropy=True,
            logit_scale=logit_scale, softcap=softcap,
        )
        loss, metrics = reference.policy_loss(
            lp, lp.detach() if old_logprobs is None else old_logprobs, advantages, valid,
            is_weights=is_weights, ref_logprobs=ref_logprobs, entropy=ent,
            num_items=num_items if n_tensor is None else n_tensor, **opts.reference_kwargs(),
        )
        return loss, _with_logprobs(metrics, lp, return_logprobs)
    if hidden.dtype == torch.float64:
        raise TypeError(f"backend={name!r} supports fp32/bf16/fp16 inputs; float64 runs only on backend='torch'")

    f32 = lambda t: None if t is None else t.detach().to(torch.float32).contiguous()  # noqa: E731
    make = _run_triton if name == "triton" else _run_compiled
    run = make(
        hidden.reshape(B * T, hidden.shape[-1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), targets.reshape(-1).contiguous(), inv_t, cap, ignore_index,
        f32(old_logprobs), f32(advantages), valid.contiguous(), f32(ref_logprobs), f32(is_weights), n_tensor,
        opts.kernel_args(T, n_value),
    )
    loss, stats, lp = GradsInForward.apply(hidden, weight, bias, run, OP)
    return loss, _with_logprobs(metrics_from_stats(stats, ref_logprobs is not None, True), lp.view(B, T), return_logprobs)


def _with_logprobs(metrics: dict, logprobs: torch.Tensor, wanted: bool) -> dict:
    if wanted:
        metrics["logprobs"] = logprobs.detach().to(torch.float32)
    return metrics
