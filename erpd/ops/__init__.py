"""The ops, one package each (``erpd/ops/<op>/``: api, function, tp, library, torch_kernels),
and what they share: argument checks (`_validate`), the kernel lookup and `torch.library`
registration (`_library`), the autograd helpers (`_autograd`), the `torch` backend's building
blocks (`_torch`), the vocabulary-parallel helpers (`_tp`), the policy losses' codes
(`policy_spec`) and options (`options`)."""

from erpd.ops.linear_kl import linear_kl
from erpd.ops.linear_logprobs import TokenStats, linear_logprobs, linear_token_stats
from erpd.ops.linear_policy_loss import linear_policy_loss
from erpd.ops.options import PolicyOptions
from erpd.ops.policy_loss import policy_loss

__all__ = ["PolicyOptions", "TokenStats", "linear_kl", "linear_logprobs", "linear_policy_loss", "linear_token_stats",
           "policy_loss"]
