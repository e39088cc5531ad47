"""Autograd functions and dispatch for each op; one module per op."""

from erpd.ops.linear_kl import linear_kl
from erpd.ops.linear_logprobs import linear_logprobs

__all__ = ["linear_kl", "linear_logprobs"]
