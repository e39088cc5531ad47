"""The ERPD two-stage trainer (Extreme Region Policy Distillation); see docs/trainer.md.

Pieces: :mod:`config` (every knob), :mod:`task` + :mod:`verifier` (built-in arithmetic task),
:mod:`models` (policies), :mod:`data` (stage 0: the fixed data), :mod:`losses`, :mod:`stage1`,
:mod:`stage2`, :mod:`engine` (shared loop), :mod:`dist` (data parallelism), :mod:`pipeline` (the
``erpd`` commands).
"""

from erpd.train.config import RunConfig
from erpd.train.verifier import verify

__all__ = ["RunConfig", "verify"]
