"""The commands behind ``erpd sample | stage1 | stage2 | eval | demo`` and their run directory.

Run directory layout (``run.out_dir``)::

    config.json               the resolved config of the last command (with its sha256)
    data/                     the fixed data (see erpd.train.data)
    eval/<policy>.json        greedy answers of base, teacher, student, control on both evaluation
                              splits (per prompt: correct, truncated, text; with its sha256)
    stage1/metrics.jsonl      per-step and per-epoch records; stage1/checkpoint.pt; stage1/done.json
    teacher/                  the stage-1 policy (erpd.train.models.save_policy_state)
    stage2/...                the same for stage 2; student/
    control/...               the control (PPO on the rewards, stage 2's trust region and budget)
    summary.md, summary.json, erpd.png    the final table (CIs) and plot

Every file read back is checksummed and every write atomic (erpd.train.checked_io).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from erpd.train import checked_io, dist, measure, report, stage0, stage1, stage2
from erpd.train import data as fixed_data
from erpd.train.config import RunConfig
from erpd.train.evaluate import SplitResult, greedy_split
from erpd.train.models import load_policy, load_policy_state
from erpd.train.progress import say
from erpd.train.task import problems
from erpd.train.verifier import load_verifier


class Run:
    def __init__(self, cfg: RunConfig, resume: bool = False, write_config: bool = True):
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.out_dir)
        if dist.is_main() and write_config:
            self.out.mkdir(parents=True, exist_ok=True)
            checked_io.write_json(self.out / "config.json", cfg.to_dict())
        self.verifier = load_verifier(cfg.task.verifier)
        self.train_problems, self.heldout, self.other = problems(cfg.task)
        self._policy = None
        self.base_state = None
        self.data = None
        self.cache = None
        if cfg.model.fsdp and dist.enabled():
            _ = self.policy  # sharding is a collective: every rank builds the policy now, together

    # -- lazily built pieces -------------------------------------------------------------------
    @property
    def policy(self):
        if self._policy is None:
            t = time.time()
            self._policy = load_policy(self.cfg.model, seed=self.cfg.seed)
            self.base_state = self._policy.trainable_state()
            n_train = sum(p.numel() for _, p in self._policy.trainable_named())
            n_all = sum(p.numel() for p in self._policy.model.parameters())
            say(f"[erpd] model {self.cfg.model.name}: {n_all / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M trainable, "
                f"{self._policy.device}/{str(self._policy.dtype).replace('torch.', '')}, loaded in {time.time() - t:.1f}s")
        return self._policy

    def reset_to_base(self):
        self.policy.load_trainable_state(self.base_state)

    def ensure_data(self):
        if self.data is not None:
            return self.data
        ddir = self.out / "data"
        # Rank 0 samples (or finds) the data and the others read it; in lockstep (FSDP: every
        # forward is a collective) every rank samples, identically, and rank 0 writes.
        if not dist.is_main() and not (dist.lockstep() and not (fixed_data.exists(ddir) and self.resume)):
            dist.barrier()
            self.data = fixed_data.load(ddir)
            return self.data
        if fixed_data.exists(ddir) and self.resume:
            self.data = fixed_data.load(ddir)
            say(f"[erpd] reusing fixed data {ddir} ({len(self.data)} responses)")
            dist.barrier()
            return self.data
        self.reset_to_base()
        self.data, self.cache = stage0.sample_fixed_data(self.policy, self.train_problems, self.cfg, self.verifier,
                                                             self.cfg.task.system_prompt)
        if dist.is_main():
            fixed_data.save(self.data, ddir)
        dist.barrier()
        r = self.data.rewards
        say(f"[erpd] fixed data: {len(r)} responses, mean reward {r.mean():.3f}, "
            f"{int(self._mixed_groups())}/{len(self.data.prompts)} prompts with mixed rewards -> {ddir}")
        return self.data

    def _mixed_groups(self):
        d = self.data
        hi = fixed_data.group_advantages(d.rewards, d.group, "mean").abs() > 0
        return len(set(d.group[hi].tolist()))

    def load_data(self):
        if self.data is None:
            self.data = fixed_data.load(self.out / "data")
        return self.data

    def ensure_cache(self):
        if self.cache is None:
            data = self.load_data()
            if data.meta.get("model") not in (None, self.cfg.model.name):
                raise ValueError(f"the fixed data was sampled from {data.meta['model']!r}, the config's model is {self.cfg.model.name!r}")
            self.reset_to_base()
            self.cache, lp = measure.build_cache(self.policy, data, self.cfg.sample.temperature,
                                                self.cfg.stage1.micro_batch_size)
            diff = (lp - data.old_logprobs)[data.mask].abs().max().item() if data.mask.any() else 0.0
            if diff > 1e-2:
                say(f"[erpd] warning: π0 log-probs recomputed on this machine differ from the stored ones by up to {diff:.3g}")
        return self.cache

    # -- evaluation --------------------------------------------------------------------------
    def splits(self) -> dict:
        return {"task": self.heldout, "other": self.other}

    def eval_path(self, name: str) -> Path:
        return self.out / "eval" / f"{name}.json"

    def evaluate(self, name: str) -> dict[str, SplitResult]:
        """Greedy answers of the policy now loaded, on both evaluation splits; saved as
        ``eval/<name>.json`` (rank 0 decodes, the others wait)."""
        return dist.on_main(self._evaluate, name)

    def _evaluate(self, name: str) -> dict[str, SplitResult]:
        ev = self.cfg.eval
        res = {split: greedy_split(self.policy, problems, self.verifier, self.cfg.task.system_prompt, ev.max_new_tokens,
                                   ev.batch_size, desc=f"greedy eval {name} ({split})")
               for split, problems in self.splits().items() if problems}
        if dist.is_main():  # in lockstep every rank decodes; rank 0 writes
            checked_io.write_json(self.eval_path(name), {"max_new_tokens": ev.max_new_tokens,
                                                         "splits": {k: v.to_dict() for k, v in res.items()}})
        say(f"[erpd] {name}: greedy accuracy " + ", ".join(f"{k} {v.accuracy:.3f} (truncated {v.truncation:.2f})"
                                                          for k, v in res.items()))
        return res

    def load_eval(self, name: str) -> dict[str, SplitResult] | None:
        path = self.eval_path(name)
        if not path.is_file():
            return None
        return {k: SplitResult.from_dict(v) for k, v in checked_io.read_json(path)["splits"].items()}

    def ensure_base_eval(self) -> None:
        # Rank 0 decides (it alone writes the file): every rank must take the same branch.
        if not dist.broadcast_object(self.eval_path("base").is_file() if dist.is_main() else None):
            self.reset_to_base()
            self.evaluate("base")

    # -- stages --------------------------------------------------------------------------------
    def stage_done(self, stage: str) -> bool:
        return (self.out / stage / "done.json").is_file()

    def run_stage1(self):
        if self.resume and self.stage_done("stage1"):
            say("[erpd] stage 1 already done; skipping")
            return
        data = self.ensure_data() if self.data is None and not fixed_data.exists(self.out / "data") else self.load_data()
        cache = self.ensure_cache()
        self.ensure_base_eval()
        self.reset_to_base()
        t = time.time()
        hist = stage1.run(self.policy, data, cache, self.cfg, self.out, _no_eval, resume=self.resume)
        self.evaluate("teacher")
        if dist.is_main():
            (self.out / "stage1" / "done.json").write_text(json.dumps({"seconds": time.time() - t, "final": hist[-1]}))

    def policy_dir(self, name: str) -> Path:
        """Where the run saved policy ``name`` (teacher, student, control)."""
        return self.out / "control" / "policy" if name == "control" else self.out / name

    def teacher_dirs(self):
        return [Path(p) for p in self.cfg.stage2.teachers] or [self.out / "teacher"]

    def run_stage2(self):
        if self.resume and self.stage_done("stage2"):
            say("[erpd] stage 2 already done; skipping")
            return
        data = self.load_data()
        cache = self.ensure_cache()
        self.reset_to_base()
        t = time.time()
        hist, tmetrics = stage2.run(self.policy, data, cache, self.cfg, self.out, _no_eval, self.teacher_dirs(),
                                    resume=self.resume)
        self.evaluate("student")
        if dist.is_main():
            (self.out / "stage2" / "done.json").write_text(json.dumps({"seconds": time.time() - t, "final": hist[-1],
                                                                       "teachers": tmetrics}))

    def run_control(self):
        """The control: π0 trained on the rewards alone (group advantages, no teacher) with stage 2's
        surrogate, trust region and budget, so a student above it can be credited to the teacher."""
        if self.resume and self.stage_done("control"):
            say("[erpd] control already done; skipping")
            return
        data = self.load_data()
        cache = self.ensure_cache()
        self.ensure_base_eval()
        self.reset_to_base()
        t = time.time()
        hist, _ = stage2.run(self.policy, data, cache, self.cfg, self.out, _no_eval, [], resume=self.resume, control=True)
        self.evaluate("control")
        if dist.is_main():
            (self.out / "control" / "done.json").write_text(json.dumps({"seconds": time.time() - t, "final": hist[-1]}))

    def run_eval(self, which=("base", "teacher", "student")) -> list[report.PolicyRow]:
        """Re-measure saved policies: greedy accuracy on both splits and drift on the fixed data."""
        data = self.load_data()
        cache = self.ensure_cache()
        rows = []
        for name in which:
            self.reset_to_base()
            if name != "base":
                d = self.policy_dir(name) if name in POLICIES else Path(name)
                if not d.is_dir():
                    say(f"[erpd] no {d}; skipping")
                    continue
                load_policy_state(self.policy, d)
            out = measure.policy_outputs(self.policy, data, cache, self.cfg.sample.temperature,
                                        self.cfg.stage1.micro_batch_size, desc=f"measure {name}")
            label = Path(name).name
            rows.append(report.PolicyRow(label, self.evaluate(label), measure.drift_metrics(out, data)))
        self.reset_to_base()
        return rows

    # -- report ------------------------------------------------------------------------------
    def summary_rows(self) -> list[report.PolicyRow]:
        """base, teacher, student, control: those evaluated, with the drift of their stage's last epoch."""
        rows = []
        for name, stage, epoch in (("base", "stage1", 0), ("teacher", "stage1", -1), ("student", "stage2", -1),
                                   ("control", "control", -1)):
            res = self.load_eval(name)
            if res is None:
                continue
            path = self.out / stage / "metrics.jsonl"
            epochs = [r for r in checked_io.read_jsonl(path) if r["kind"] == "epoch"] if path.is_file() else []
            drift = epochs[epoch] if epochs else ({"kl_full": 0.0, "kl_k3": 0.0} if name == "base" else {})
            rows.append(report.PolicyRow(name, res, drift))
        return rows


POLICIES = ("base", "teacher", "student", "control")
COMPARISONS = [("teacher", "base"), ("student", "base"), ("student", "teacher"), ("control", "base"),
               ("student", "control")]


def _no_eval(epoch: int, last: bool) -> dict:
    return {}


def write_summary(run: Run, wall_seconds: float | None = None) -> str:
    """summary.md (the table with CIs), summary.json and the plot erpd.png; returns the table."""
    rows = run.summary_rows()
    table = report.markdown(rows, COMPARISONS)
    info = {"rows": [{"name": r.name, "drift": r.drift, **{f"acc_{s}": r.accuracy(s) for s in r.splits}} for r in rows],
            "comparisons": report.comparisons(rows, COMPARISONS), "wall_seconds": wall_seconds,
            "config": run.cfg.to_dict()}
    if run.data is not None or fixed_data.exists(run.out / "data"):
        d = run.load_data()
        info["fixed_data"] = {"responses": len(d), "prompts": len(d.prompts), "mean_reward": float(d.rewards.mean())}
    (run.out / "summary.json").write_text(json.dumps(info, indent=1, default=str))
    (run.out / "summary.md").write_text(table + "\n")
    if rows:
        report.plot(rows, run.out / "erpd.png")
    return table
