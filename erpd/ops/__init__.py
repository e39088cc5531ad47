"""Autograd functions and dispatch for each op; one module per op."""

from erpd.ops.linear_kl import linear_kl
from erpd.ops.linear_logprobs import TokenStats, linear_logprobs, linear_token_stats
from erpd.ops.linear_policy_loss import linear_policy_loss
from erpd.ops.policy_loss import policy_loss

__all__ = ["TokenStats", "linear_kl", "linear_logprobs", "linear_policy_loss", "linear_token_stats", "policy_loss"]
