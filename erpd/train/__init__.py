"""The ERPD two-stage trainer (Extreme Region Policy Distillation); see docs/trainer.md.

Reading order, from the command line to the fused ops:

* :mod:`pipeline` — the ``erpd`` commands on a run directory (sample, stage1, stage2, control,
  eval, demo, export);
* :mod:`stage0` (sample the fixed data from π0), :mod:`stage1` (the teacher), :mod:`stage2`
  (the student, and the control) — each stage's loss on a micro-batch calls the fused ops;
* :mod:`loop` — the epoch loop both stages run, with :mod:`checkpoint` (resume) and :mod:`dist`
  (several processes) kept out of it;
* :mod:`batches` (micro-batches and the hidden states the ops take), :mod:`measure`
  (teacher-forced metrics on the fixed data), :mod:`evaluate` (greedy accuracy on the held-out
  splits, bootstrap CIs), :mod:`report` (the summary table and plot);
* :mod:`config` (every knob), :mod:`task` + :mod:`verifier` (the built-in arithmetic task),
  :mod:`models` (policies), :mod:`data` (the fixed-data format), :mod:`losses` (what is not an
  op: ce, mse, the stage-2 signals), :mod:`checked_io` (checksummed files).
"""

from erpd.train.config import RunConfig
from erpd.train.verifier import verify

__all__ = ["RunConfig", "verify"]
