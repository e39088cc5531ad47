"""Adapters that give erpd's ops the call conventions of other trainers.

* :mod:`erpd.adapters.verl`: verl's fused-kernel contract, (hidden_states, lm_head weight,
  labels, temperature) -> (log_probs, entropy).
* :mod:`erpd.adapters.trl`: a drop-in for Liger-Kernel's ``LigerFusedLinearGRPOLoss``, the module
  TRL's GRPOTrainer builds when ``use_liger_kernel=True``.
"""

from erpd.adapters import trl, verl

__all__ = ["trl", "verl"]
