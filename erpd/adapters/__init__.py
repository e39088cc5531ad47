"""Adapters that give erpd's ops the call conventions of other trainers.

* :mod:`erpd.adapters.trl`: erpd as TRL's fused LM head (``use_erpd``, TRL 1.15-1.16) and a
  drop-in for Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (the GRPOTrainer of TRL <= 1.13);
  :mod:`erpd.adapters.trl_gkd`: TRL's GKDTrainer with erpd's JSD on hidden states (imports TRL).
* :mod:`erpd.adapters.verl`: erpd behind verl 0.9.1's fused kernels, ``FusedLinearForPPO`` and
  ``linear_cross_entropy``; :mod:`erpd.adapters.verl_plugin` is the module verl's
  ``model.external_lib`` imports to install them.

Importing this package imports neither TRL nor verl.
"""

from erpd.adapters import trl, verl

__all__ = ["trl", "verl"]
