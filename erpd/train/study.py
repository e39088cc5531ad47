"""``erpd study``: the protocol that can tell whether stage 2 works, as one command.

On one run directory (its fixed data, π0 and its stage-1 teacher, made first if missing):

* ``seeds`` stage-2 students of that teacher and as many **controls** (π0 trained on the rewards
  alone with stage 2's surrogate, trust region and budget: what a student must beat for its gain
  to be credited to the teacher), seed = the data order of every epoch;
* for each objective in ``weak`` (``mse``, ``ce``): a weak stage-1 teacher on the same data and
  ``seeds`` students of it;
* every policy evaluated greedily on both held-out splits; a row with several seeds shows their
  mean, their spread (min–max) and a 95% CI from the paired bootstrap over prompts of the
  per-prompt accuracy averaged over the seeds.

Writes ``study.md`` (the table), ``study.json`` and ``study.png`` (accuracy with CI bars against
KL(π‖π0)) in the run directory; sub-runs live in ``seeds/s<i>/`` and ``weak-<objective>/``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from erpd.train import checked_io, report
from erpd.train.config import merge
from erpd.train.evaluate import SPLITS, SplitResult
from erpd.train.pipeline import Run
from erpd.train.progress import say


def fork(run: Run, out: Path, changes: dict, evals: tuple[str, ...] = ("base",)) -> Run:
    """A run in ``out`` with ``changes`` to the config that shares ``run``'s model, fixed data and
    π0 cache, and starts from copies of its evaluations ``evals``."""
    cfg = copy.deepcopy(run.cfg)
    merge(cfg, changes)
    cfg.out_dir = str(out)
    sub = Run(cfg, resume=True)
    sub._policy, sub.base_state = run.policy, run.base_state
    sub.data, sub.cache = run.load_data(), run.ensure_cache()
    for name in evals:
        if run.eval_path(name).is_file() and not sub.eval_path(name).is_file():
            checked_io.write_json(sub.eval_path(name), checked_io.read_json(run.eval_path(name)))
    return sub


def _last_epoch(path: Path) -> dict:
    if not path.is_file():
        return {}
    epochs = [r for r in checked_io.read_jsonl(path) if r["kind"] == "epoch"]
    return epochs[-1] if epochs else {}


def _pooled(name: str, runs: list[Run], policy: str, stage: str) -> report.PolicyRow:
    """One row for the same policy over seeds: per-prompt accuracy averaged over the seeds."""
    evals = [r.load_eval(policy) for r in runs]
    splits = {}
    for s in SPLITS:
        if all(s in e for e in evals):
            per_seed = [e[s] for e in evals]
            n = len(per_seed[0].correct)
            splits[s] = SplitResult(correct=[sum(e.correct[i] for e in per_seed) / len(per_seed) for i in range(n)],
                                    truncated=[any(e.truncated[i] for e in per_seed) for i in range(n)],
                                    lengths=per_seed[0].lengths, texts=per_seed[0].texts)
    drifts = [_last_epoch(r.out / stage / "metrics.jsonl") for r in runs]
    keys = ("kl_full", "kl_k3", "entropy", "auc", "out_of_band")
    drift = {k: sum(d.get(k) or 0.0 for d in drifts) / len(drifts) for k in keys}
    seeds = {s: [e[s].accuracy for e in evals] for s in SPLITS if all(s in e for e in evals)}
    return report.PolicyRow(name, splits, drift, seeds=seeds)


def run_study(run: Run, seeds: int = 3, weak: tuple[str, ...] = ("mse", "ce")) -> str:
    """Run every missing piece of the protocol on ``run`` (what is done is kept: a stopped study
    resumes); returns the markdown table."""
    run.resume = True
    run.ensure_data()
    run.run_stage1()  # the teacher (skipped when done) and the base and teacher evaluations
    base = report.PolicyRow("base", run.load_eval("base"), {"kl_full": 0.0, "kl_k3": 0.0,
                                                           **{k: v for k, v in _epoch0(run).items() if k == "entropy"}})
    rows = [base, report.PolicyRow("teacher", run.load_eval("teacher"), _last_epoch(run.out / "stage1" / "metrics.jsonl"))]
    s2 = run.cfg.stage2
    students, controls = [], []
    for i in range(seeds):
        sub = fork(run, run.out / "seeds" / f"s{i}", {"stage2": {"seed": s2.seed + i, "teachers": [str(run.out / "teacher")]}},
                   evals=("base", "teacher"))
        say(f"[erpd] study: seed {i} ({sub.out})")
        sub.run_stage2()
        sub.run_control()
        students.append(sub)
        controls.append(sub)
    rows.append(_pooled("student", students, "student", "stage2"))
    rows.append(_pooled("control", controls, "control", "control"))
    pairs = [("teacher", "base"), ("student", "base"), ("student", "teacher"), ("control", "base"), ("student", "control")]
    for objective in weak:
        wrun = fork(run, run.out / f"weak-{objective}", {"stage1": {"objective": objective}})
        say(f"[erpd] study: weak teacher {objective} ({wrun.out})")
        wrun.run_stage1()
        rows.append(report.PolicyRow(f"teacher ({objective})", wrun.load_eval("teacher"),
                                     _last_epoch(wrun.out / "stage1" / "metrics.jsonl")))
        wstudents = []
        for i in range(seeds):
            sub = fork(wrun, wrun.out / "seeds" / f"s{i}",
                       {"stage2": {"seed": s2.seed + i, "teachers": [str(wrun.out / "teacher")]}}, evals=("base", "teacher"))
            sub.run_stage2()
            wstudents.append(sub)
        rows.append(_pooled(f"student ({objective})", wstudents, "student", "stage2"))
        pairs += [(f"student ({objective})", "base"), (f"student ({objective})", "control")]
    table = report.markdown(rows, pairs)
    (run.out / "study.md").write_text(table + "\n")
    (run.out / "study.json").write_text(json.dumps(
        {"rows": [{"name": r.name, "drift": r.drift, "seeds": r.seeds, **{f"acc_{s}": r.accuracy(s) for s in r.splits}}
                  for r in rows], "comparisons": report.comparisons(rows, pairs), "seeds": seeds, "weak": list(weak),
         "config": run.cfg.to_dict()}, indent=1, default=str))
    report.plot(rows, run.out / "study.png", title=f"ERPD study: {seeds} seeds per student and control")
    run.reset_to_base()
    return table


def _epoch0(run: Run) -> dict:
    path = run.out / "stage1" / "metrics.jsonl"
    epochs = [r for r in checked_io.read_jsonl(path) if r["kind"] == "epoch"] if path.is_file() else []
    return epochs[0] if epochs else {}
