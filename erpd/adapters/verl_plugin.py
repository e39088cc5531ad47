"""Imported by verl through ``actor_rollout_ref.model.external_lib=erpd.adapters.verl_plugin``: puts
erpd behind verl's fused-kernel entry points in every worker (:func:`erpd.adapters.verl.install`)."""

from erpd.adapters.verl import install

PATCHED = install()
