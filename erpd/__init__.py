"""erpd: fused RL and distillation losses computed from hidden states and the LM-head weight.

    logprobs, entropy = erpd.linear_logprobs(hidden, lm_head.weight, targets, with_entropy=True)
    kl = erpd.linear_kl(hidden, lm_head.weight, targets, teacher_hidden=t_hidden, teacher_weight=t_head.weight)

See README.md for the backends and the ERPD trainer.
"""

from erpd import adapters, nn, reference
from erpd._ext import release_cpu_scratch
from erpd.backends import BackendUnavailableError, available
from erpd.ops import PolicyOptions, linear_kl, linear_logprobs, linear_policy_loss, linear_token_stats, policy_loss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "PolicyOptions", "adapters", "available", "linear_kl", "linear_logprobs", "linear_policy_loss",
    "linear_token_stats", "nn", "policy_loss", "reference", "release_cpu_scratch",
]
