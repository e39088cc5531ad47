"""erpd inside TRL's trainers. Which entry point serves which TRL version:

=====================  =====================================================================
TRL 1.15, 1.16         :func:`use_erpd`: one call before building the trainer, after which
(tested: 1.16.0)       every model that TRL gives a fused LM head (``add_fused_lm_head``:
                       GRPO, RLOO, SFT, DPO, KTO) computes all of its per-token fields with
                       erpd's kernels (:func:`erpd.linear_token_stats`), softcapped and
                       scaled heads included.
TRL 1.8 to 1.13        :class:`FusedLinearGRPOLoss` as ``trainer.liger_loss`` of a GRPOTrainer
                       built with ``use_liger_kernel=True`` (Liger's module up to 1.12, TRL's
                       own ``trl.losses.FusedLinearGRPOLoss`` in 1.13: same call).
TRL up to 1.7          :class:`FusedLinearGRPOLoss` as ``trainer.liger_grpo_loss``.
TRL 1.14               neither: ``liger_loss`` is gone and the per-token head has another
                       contract (a two-output kernel the trainers import by name).
=====================  =====================================================================

GKD (TRL's experimental ``GKDTrainer``) is :mod:`erpd.adapters.trl_gkd`.

:func:`use_erpd` replaces the kernel behind TRL's ``add_fused_lm_head``
(``trl.trainer.utils._ChunkedLogProbFunction``, looked up on every forward), not the function:
TRL keeps doing what its fused forward does around the kernel (label shifting, masking, PEFT,
FSDP2 gathering, MoE auxiliary loss), and models patched before the call switch too. The
kernel's contract is ``apply(hidden [N, H], weight [V, H], bias, targets [N], temperature,
chunk_size, final_logit_softcapping, logit_scale, outputs) -> (log_probs, entropy,
log_sum_sq_probs, mean_logits, is_top1)``, each None unless named in ``outputs``; log_probs and
entropy are differentiable, the other three are metrics (SFT, KTO and DPO read them; GRPO and
RLOO ask for log_probs and entropy only, so they cost nothing there). ``chunk_size`` is TRL's
vocabulary tile and is ignored: erpd's backends block the vocabulary their own way.
Not supported: DeepSpeed ZeRO-3 (TRL gathers the partitioned head again in its own backward;
erpd's backward would see the partition), which raises.

:class:`FusedLinearGRPOLoss` has the constructor, call signature and return convention
``(loss, metrics)`` of Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (0.8.5), with ``metrics =
(mean KL,)`` when ``beta != 0`` followed by ``(clip ratio,)``::

    trainer.liger_loss = erpd.adapters.trl.FusedLinearGRPOLoss(beta=args.beta, ...)   # TRL 1.8-1.13

How TRL's ``loss_type`` maps onto erpd (Liger 0.8.5 semantics):

============  =========================================================================
``grpo``      ``method="ppo", agg="seq-mean-token-mean"``
``bnpo``      ``method="ppo", agg="token-mean"`` (this call's token count)
``dr_grpo``   ``method="ppo", agg="seq-mean-token-sum-norm", norm_length=max_completion_length``
``dapo``      ``method="ppo", agg="token-mean"``, normalised by ``num_items_in_batch /
              world_size`` when given, else by the token count all-reduced over ranks /
              world size (Liger's DAPO normaliser)
``cispo``     ``method="cispo", cispo_cap=epsilon_high`` (an absolute cap), DAPO normaliser
``sapo``      ``method="sapo"``, ``seq-mean-token-mean``
============  =========================================================================

``importance_sampling_level="sequence"`` selects ``method="gspo"`` (ppo losses only, as in
Liger); ``delta`` is erpd's ``dual_clip`` (identical to Liger's ``delta`` when
``delta >= 1 + epsilon_high``, which is required); ``beta`` the k3 ``kl_coef`` against
``ref_per_token_logps`` (or against log-probs computed here from ``ref_input`` / ``ref_weight``);
``use_bias_correction_kl`` (on by default in TRL 1.12 and 1.13) erpd's ``kl_ratio_weighted`` (the KL term times
the importance ratio; no effect when ``beta == 0``); ``vllm_is_ratio`` the ``is_weights``.
``compiled`` and ``chunk_size`` are accepted and unused. Not supported (they raise):
``loss_type`` ``luspo`` / ``vespo``.

Differences from Liger that remain: erpd clamps log-ratios at ±20 before exponentiating (Liger
does not; it matters only for ratios beyond e^20), and it returns gradients computed by its own
kernels rather than by autograd over chunks.
"""

from __future__ import annotations

import contextlib

import torch

from erpd.ops import PolicyOptions, linear_logprobs, linear_policy_loss, linear_token_stats

# ---------------------------------------------------------------------------------------------
# TRL 1.15+: the kernel behind add_fused_lm_head
# ---------------------------------------------------------------------------------------------

# The per-token fields of TRL's FusedCausalLMOutput, in the order the kernel returns them.
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# The first TRL release whose add_fused_lm_head calls its kernel with this contract.
FIRST_FUSED_HEAD_VERSION = "1.15.0"


def head_transform(config) -> tuple[float, float | None]:
    """(logit_scale, softcap) of a transformers model's LM head from its config, the factors its
    forward applies to ``lm_head(h)`` before the softmax: ``final_logit_softcapping`` (Gemma 2/3),
    a multiplier ``logit_scale`` (Cohere), ``output_multiplier`` or ``lm_head_multiplier``
    (Falcon-H1), or ``logits_scaling``, which Granite and MiniCPM3 divide by and HyperCLOVA X
    multiplies by. These are the attributes TRL's ``add_fused_lm_head`` reads (TRL 1.16)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None)
        if scale is not None:
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


class FusedLMHeadKernel:
    """TRL's fused-LM-head kernel contract (``_ChunkedLogProbFunction.apply``) computed by erpd;
    ``backend`` picks erpd's backend. ``calls`` counts the calls (for tests and logs)."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self.calls = 0

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        unknown = set(outputs) - set(FIELDS)
        if unknown:
            raise ValueError(f"outputs {sorted(unknown)} are not fields of TRL's fused LM head {FIELDS}")
        if hasattr(weight, "ds_id"):
            raise NotImplementedError(
                "erpd's TRL fused head does not support DeepSpeed ZeRO-3 (the head is partitioned again before the "
                "backward); use ZeRO-2 or FSDP2"
            )
        self.calls += 1
        kw = dict(bias=bias, temperature=float(temperature), logit_scale=float(logit_scale),
                  softcap=None if final_logit_softcapping is None else float(final_logit_softcapping),
                  backend=self.backend)
        if set(outputs) <= {"log_probs", "entropy"}:
            logp, entropy = linear_logprobs(hidden, weight, targets, with_entropy="entropy" in outputs, **kw)
            return logp, entropy, None, None, None
        s = linear_token_stats(hidden, weight, targets, **kw)
        values = dict(log_probs=s.logprobs, entropy=s.entropy, log_sum_sq_probs=s.log_sum_sq_probs,
                      mean_logits=s.mean_logits, is_top1=s.is_top1)
        return tuple(values[f] if f == "log_probs" or f in outputs else None for f in FIELDS)


class _Installed(contextlib.AbstractContextManager):
    """What :func:`use_erpd` returns: ``.kernel`` (with its call count), ``.restore()``, or use it
    as a context manager to restore TRL's own kernel on exit."""

    def __init__(self, module, previous, kernel):
        self.kernel, self._module, self._previous = kernel, module, previous

    def restore(self) -> None:
        self._module._ChunkedLogProbFunction = self._previous

    def __exit__(self, *exc):
        self.restore()
        return False


def use_erpd(backend: str = "auto") -> _Installed:
    """Make TRL's fused LM head (``add_fused_lm_head``, TRL >= 1.15) run erpd's kernels.

    Call once, e.g. before building a ``GRPOTrainer`` or ``RLOOTrainer``; from then on every
    ``model(..., labels=..., fused_lm_head=True)`` of a model with TRL's fused head computes its
    log-probs, entropy and the other per-token fields with erpd (``backend`` as in
    :func:`erpd.linear_logprobs`). Returns a handle whose ``restore()`` (or ``with`` exit) puts
    TRL's kernel back. Raises RuntimeError on a TRL without the fused head.
    """
    import trl
    from packaging.version import Version

    version = Version(trl.__version__)
    if version < Version(FIRST_FUSED_HEAD_VERSION):
        raise RuntimeError(
            f"erpd.adapters.trl.use_erpd needs TRL >= {FIRST_FUSED_HEAD_VERSION} (its fused LM head); TRL "
            f"{trl.__version__} is installed. For TRL <= 1.13 use erpd.adapters.trl.FusedLinearGRPOLoss as the "
            "GRPOTrainer's liger_loss (1.8-1.13) or liger_grpo_loss (<= 1.7); TRL 1.14 is not served."
        )
    from trl.trainer import utils

    if not hasattr(utils, "add_fused_lm_head") or not hasattr(utils, "_ChunkedLogProbFunction"):
        raise RuntimeError(
            f"TRL {trl.__version__} has no trl.trainer.utils.add_fused_lm_head / _ChunkedLogProbFunction: its fused "
            "LM head changed; erpd.adapters.trl.use_erpd was written for TRL 1.15-1.16"
        )
    kernel = FusedLMHeadKernel(backend)
    installed = _Installed(utils, utils._ChunkedLogProbFunction, kernel)
    utils._ChunkedLogProbFunction = kernel
    return installed


# ---------------------------------------------------------------------------------------------
# TRL <= 1.13: the Liger-signature GRPO loss
# ---------------------------------------------------------------------------------------------

_AGG = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class FusedLinearGRPOLoss(torch.nn.Module):
    """Same constructor and ``forward`` as ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss``
    (0.8.5), computed by :func:`erpd.linear_policy_loss`; ``backend`` picks erpd's backend."""

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        if loss_type not in _AGG:
            raise NotImplementedError(
                f"loss_type={loss_type!r} is not supported by erpd's GRPO drop-in; supported: {tuple(_AGG)}"
            )
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
        if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo"):
            raise ValueError(f"importance_sampling_level='sequence' is not supported for loss_type={loss_type!r}")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        if delta is not None and loss_type not in ("cispo", "sapo") and delta < 1.0 + epsilon_high:
            raise ValueError(
                f"delta={delta} < 1 + epsilon_high={1.0 + epsilon_high}: erpd's dual clip equals Liger's delta only "
                "for delta >= 1 + epsilon_high"
            )
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = bool(use_bias_correction_kl)
        self.backend = backend

    def _options(self, has_ref: bool) -> PolicyOptions:
        """TRL's loss settings as erpd's options (the table in the module docstring)."""
        lt = self.loss_type
        if lt == "cispo":
            opts = dict(method="cispo", cispo_cap=self.epsilon_high)
        elif lt == "sapo":
            opts = dict(method="sapo", tau_pos=self.sapo_temperature_pos, tau_neg=self.sapo_temperature_neg)
        else:
            opts = dict(
                method="gspo" if self.importance_sampling_level == "sequence" else "ppo",
                clip_low=self.epsilon_low, clip_high=self.epsilon_high, dual_clip=self.delta,
            )
        opts["agg"] = _AGG[lt]
        if lt == "dr_grpo":
            opts["norm_length"] = int(self.max_completion_length)
        return PolicyOptions(**opts, kl_coef=self.beta if has_ref else 0.0, kl_estimator="k3",
                             kl_ratio_weighted=self.use_bias_correction_kl and has_ref)

    def _dapo_normalizer(self, attention_mask, num_items_in_batch):
        world = _world_size()
        if num_items_in_batch is not None:
            count = num_items_in_batch
        elif world == 1:
            return None  # this call's token count
        else:
            count = (attention_mask != 0).sum().to(torch.float32)
            torch.distributed.all_reduce(count)
        # Liger clamps the normaliser at 1 (a step without tokens gives loss 0); erpd refuses a
        # count <= 0 where it checks values, so the clamp is done here, as Liger does it.
        count = count / world
        return count.clamp_min(1.0) if torch.is_tensor(count) else max(float(count), 1.0)

    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
    ):
        """``(loss, metrics)``: ``_input [B, T, H]``, ``lin_weight [V, H]``, ``selected_token_ids
        [B, T]``, ``attention_mask [B, T]`` (the completion/loss mask), ``advantages [B]``."""
        B, T = selected_token_ids.shape
        ref = None
        if self.beta != 0.0:
            if ref_per_token_logps is not None:
                ref = ref_per_token_logps.float()
            elif self.use_ref_model and ref_input is not None:
                with torch.no_grad():
                    ref, _ = linear_logprobs(ref_input, ref_weight, selected_token_ids, bias=ref_bias,
                                             temperature=self.temperature, backend=self.backend)
        is_weights = None
        if vllm_is_ratio is not None:
            r = vllm_is_ratio if vllm_is_ratio.dim() == 2 else vllm_is_ratio.reshape(B, 1)
            is_weights = r.expand(B, T)
        num_items = None
        if self.loss_type in ("dapo", "cispo"):
            num_items = self._dapo_normalizer(attention_mask, num_items_in_batch)
        loss, metrics = linear_policy_loss(
            _input, lin_weight, selected_token_ids.long(), old_per_token_logps, advantages, attention_mask,
            bias=bias, temperature=self.temperature, ref_logprobs=ref, is_weights=is_weights, num_items=num_items,
            backend=self.backend, options=self._options(has_ref=ref is not None),
        )
        out = []
        if self.beta != 0.0:
            # Without reference log-probs Liger compares the policy with itself: KL 0.
            out.append(metrics["kl_ref"] if ref is not None else torch.zeros((), device=loss.device))
        out.append(metrics["clipfrac"])
        return loss, tuple(out)

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, beta={self.beta}, epsilon_low={self.epsilon_low}, "
                f"epsilon_high={self.epsilon_high}, importance_sampling_level={self.importance_sampling_level!r}, "
                f"temperature={self.temperature}, backend={self.backend!r}")


__all__ = ["FIELDS", "FusedLMHeadKernel", "FusedLinearGRPOLoss", "head_transform", "use_erpd"]
