"""A drop-in for Liger-Kernel's ``LigerFusedLinearGRPOLoss``, on :func:`erpd.linear_policy_loss`.

TRL's GRPOTrainer (``use_liger_kernel=True``) builds a ``LigerFusedLinearGRPOLoss`` from its
config and calls it with the completion hidden states, the LM head and the batch; this module
has the same constructor arguments, the same call signature and the same return convention
``(loss, metrics)`` with ``metrics = (mean KL,)`` when ``beta != 0`` followed by
``(clip ratio,)``. Swap it in with, e.g.::

    trainer.liger_grpo_loss = erpd.adapters.trl.FusedLinearGRPOLoss(beta=args.beta, ...)

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
``vllm_is_ratio`` the ``is_weights``. ``compiled`` and ``chunk_size`` are accepted and unused.
Not supported (they raise): ``loss_type`` ``luspo`` / ``vespo`` and ``use_bias_correction_kl``.

Differences from Liger that remain: erpd clamps log-ratios at ±20 before exponentiating (Liger
does not; it matters only for ratios beyond e^20), and it returns gradients computed by its own
kernels rather than by autograd over chunks.
"""

from __future__ import annotations

import torch

from erpd.ops import linear_logprobs, linear_policy_loss

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
        if use_bias_correction_kl:
            raise NotImplementedError("use_bias_correction_kl=True (IS-corrected k3) is not supported by erpd")
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
        self.backend = backend

    def _options(self) -> dict:
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
        return opts

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
            bias=bias, temperature=self.temperature, ref_logprobs=ref, kl_coef=self.beta if ref is not None else 0.0,
            kl_estimator="k3", is_weights=is_weights, num_items=num_items, backend=self.backend, **self._options(),
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


__all__ = ["FusedLinearGRPOLoss"]
