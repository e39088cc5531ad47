"""erpd behind verl's fused-kernel entry points (verl 0.9.1; tested against its own model code).

With ``actor_rollout_ref.model.use_fused_kernels=True`` verl's actor runs the backbone only and
gets per-token ``(log_probs, entropy)`` from one of two kernels, which this module replaces:

* ``fused_kernel_options.impl_backend="torch"`` (or ``"liger"``): the HF models' patched forward
  builds ``verl.utils.experimental.torch_functional.FusedLinearForPPO(impl_backend=...)`` and
  calls it with ``(hidden_states, vocab_weights, input_ids, temperature)``: :class:`FusedLinearForPPO`.
* ``impl_backend="triton"`` and Megatron: ``verl.utils.kernel.linear_cross_entropy.
  linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)``,
  flattened ``[N]`` outputs, a vocabulary-sharded head under tensor parallelism:
  :func:`linear_cross_entropy`.

verl runs the actor in Ray workers, so patching verl in the driver does not reach it; verl imports
user code in every worker through ``actor_rollout_ref.model.external_lib``. Point it at
``erpd.adapters.verl_plugin``, whose import calls :func:`install`::

    python -m verl.trainer.main_ppo ... actor_rollout_ref.model.use_fused_kernels=True \\
        actor_rollout_ref.model.external_lib=erpd.adapters.verl_plugin

:func:`install` replaces the two names in their verl modules, and ``linear_cross_entropy`` in the
Megatron forward modules that bound it at import (``verl.models.mcore.model_forward_fused``,
``verl.models.mcore.model_forward_1f1b_overlap``) if they are loaded; a Megatron module loaded
later binds erpd's function from the patched kernel module.

Differences from verl's kernels: the entropy comes back in float32 (verl's torch path returns it
in the hidden states' dtype); erpd accumulates in fp32 on every backend.
"""

from __future__ import annotations

import importlib
import sys

import torch

from erpd.ops import linear_logprobs

# verl's modules that hold the two entry points, and the Megatron modules that import
# linear_cross_entropy by name.
TORCH_FUNCTIONAL = "verl.utils.experimental.torch_functional"
LINEAR_CROSS_ENTROPY = "verl.utils.kernel.linear_cross_entropy"
MEGATRON_USERS = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")
_REDUCTIONS = ("none", "sum", "mean")


def logprobs_and_entropy(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(log_probs, entropy)`` of ``labels`` under ``softmax(hidden_states @ lm_head_weight.T / temperature)``.

    ``hidden_states [..., H]`` (verl passes ``[1, total_tokens, H]`` under remove-padding),
    ``lm_head_weight [V, H]``, ``labels [...]``; float32 outputs of shape ``[...]``, both
    differentiable (verl backpropagates an entropy bonus through the second).
    """
    logp, entropy = linear_logprobs(
        hidden_states, lm_head_weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
        with_entropy=True, backend=backend,
    )
    return logp, entropy


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``verl.utils.experimental.torch_functional.FusedLinearForPPO``: same constructor
    (``chunk_size``, ``impl_backend``) and ``forward``, computed by :func:`erpd.linear_logprobs`.

    ``chunk_size`` and ``impl_backend`` (which verl checks is ``"torch"`` or ``"liger"``) are
    accepted and unused: erpd's backends choose their own blocking; ``backend`` picks erpd's
    backend. ``input_ids`` are the already-shifted labels, as in verl; outputs have their shape.
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch", *, backend: str = "auto"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend
        self.backend = backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        return logprobs_and_entropy(hidden_states, vocab_weights, input_ids.long(), temperature, backend=self.backend)


def linear_cross_entropy(hidden, weight, labels, temperature: float = 1.0, reduction: str = "none",
                         dist_process_group=None, *, backend: str = "auto"):
    """verl's ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``, computed by erpd.

    ``hidden [..., H]`` and ``labels [...]`` are flattened: returns ``(log_probs [N], entropy [N])``
    float32, or with ``reduction`` ``"sum"`` / ``"mean"`` the log-probs summed / averaged to a
    scalar (the entropy stays per token). With ``dist_process_group`` the head is vocabulary-parallel
    as in Megatron: ``weight`` is this rank's ``[V_r, H]`` slice starting at ``rank * V_r`` (verl's
    kernel assumes the same even split), labels are global ids, and the outputs are the
    full-vocabulary values on every rank; as in verl, the backward returns this rank's partial
    gradient w.r.t. ``hidden`` and leaves its sum over the group to the caller (Megatron's
    sequence-parallel gather, whose backward reduce-scatters it).
    """
    if not isinstance(temperature, float):
        raise TypeError(f"temperature must be a float, as verl passes it; got {type(temperature).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Invalid reduction: {reduction}; verl's kernel takes one of {_REDUCTIONS}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if dist_process_group is None:
        logp, entropy = linear_logprobs(hidden, weight, labels, temperature=temperature, with_entropy=True,
                                        backend=backend)
    else:
        rank = torch.distributed.get_rank(dist_process_group)
        logp, entropy = linear_logprobs(
            hidden, weight, labels, temperature=temperature, with_entropy=True, backend=backend,
            tp_group=dist_process_group, vocab_start=rank * weight.shape[0], reduce_grad_hidden=False,
        )
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, entropy


def install() -> list[str]:
    """Put erpd behind verl's fused-kernel entry points (see the module docstring); returns the
    ``module.name`` entries it replaced. Idempotent."""
    patched = []
    torch_functional = importlib.import_module(TORCH_FUNCTIONAL)
    torch_functional.FusedLinearForPPO = FusedLinearForPPO
    patched.append(f"{TORCH_FUNCTIONAL}.FusedLinearForPPO")
    for name in (LINEAR_CROSS_ENTROPY, *MEGATRON_USERS):
        module = importlib.import_module(name) if name == LINEAR_CROSS_ENTROPY else sys.modules.get(name)
        if module is not None:
            module.linear_cross_entropy = linear_cross_entropy
            patched.append(f"{name}.linear_cross_entropy")
    return patched


__all__ = ["FusedLinearForPPO", "install", "linear_cross_entropy", "logprobs_and_entropy"]
