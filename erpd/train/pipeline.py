"""The commands behind ``erpd sample | stage1 | stage2 | eval | demo`` and their run directory.

Run directory layout (``run.out_dir``)::

    config.json               the resolved config of the last command
    data/                     the fixed data (see erpd.train.data)
    base_eval.json            π0's held-out reward (shared by both stages' epoch 0)
    stage1/metrics.jsonl      per-step and per-epoch records; stage1/checkpoint.pt; stage1/done.json
    teacher/                  the stage-1 policy (erpd.train.models.save_policy_state)
    stage2/...                the same for stage 2; student/
    summary.json, erpd.png    the final table and plot
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from erpd.train import data as fixed_data
from erpd.train import dist, engine, stage1, stage2
from erpd.train.config import RunConfig
from erpd.train.models import load_policy, load_policy_state
from erpd.train.task import chat_prompt, problems
from erpd.train.verifier import load_verifier


def say(msg: str) -> None:
    engine.tqdm.write(msg, file=engine.sys.stderr)


class Run:
    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.out_dir)
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        self.verifier = load_verifier(cfg.task.verifier)
        self.train_problems, self.heldout = problems(cfg.task)
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

    def heldout_prompts(self):
        return [chat_prompt(self.policy.tokenizer, p.question, self.cfg.task.system_prompt) for p in self.heldout]

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
        self.data, self.cache = fixed_data.sample_fixed_data(self.policy, self.train_problems, self.cfg, self.verifier,
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
            self.cache, lp = engine.build_cache(self.policy, data, self.cfg.sample.temperature,
                                                self.cfg.stage1.micro_batch_size)
            diff = (lp - data.old_logprobs)[data.mask].abs().max().item() if data.mask.any() else 0.0
            if diff > 1e-2:
                say(f"[erpd] warning: π0 log-probs recomputed on this machine differ from the stored ones by up to {diff:.3g}")
        return self.cache

    # -- evaluation --------------------------------------------------------------------------
    def base_eval(self) -> dict:
        return dist.on_main(self._base_eval)

    def _base_eval(self) -> dict:
        path = self.out / "base_eval.json"
        if path.is_file():
            return json.loads(path.read_text())
        self.reset_to_base()
        res = engine.heldout_reward(self.policy, self.heldout_prompts(), [p.answer for p in self.heldout], self.verifier,
                                    self.cfg.eval.samples_per_prompt, self.cfg.eval, desc="held-out eval π0")
        if dist.is_main():
            path.write_text(json.dumps(res))
        return res

    def evaluator(self, n_epochs: int, stage: str):
        ev = self.cfg.eval

        def evaluate(epoch: int, last: bool) -> dict:
            if epoch == 0:
                return self.base_eval()
            if not last and (ev.every <= 0 or epoch % ev.every):
                return {}
            n = ev.samples_per_prompt if last else ev.epoch_samples_per_prompt
            return engine.heldout_reward(self.policy, self.heldout_prompts(), [p.answer for p in self.heldout],
                                         self.verifier, n, ev, desc=f"held-out eval {stage} epoch {epoch}")

        return evaluate

    # -- stages --------------------------------------------------------------------------------
    def stage_done(self, stage: str) -> bool:
        return (self.out / stage / "done.json").is_file()

    def run_stage1(self):
        if self.resume and self.stage_done("stage1"):
            say("[erpd] stage 1 already done; skipping")
            return
        data = self.ensure_data() if self.data is None and not fixed_data.exists(self.out / "data") else self.load_data()
        cache = self.ensure_cache()
        self.reset_to_base()
        t = time.time()
        hist = stage1.run(self.policy, data, cache, self.cfg, self.out, self.evaluator(self.cfg.stage1.epochs, "stage1"),
                          resume=self.resume)
        if dist.is_main():
            (self.out / "stage1" / "done.json").write_text(json.dumps({"seconds": time.time() - t, "final": hist[-1]}))

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
        hist, tmetrics = stage2.run(self.policy, data, cache, self.cfg, self.out, self.evaluator(self.cfg.stage2.epochs, "stage2"),
                                    self.teacher_dirs(), resume=self.resume)
        if dist.is_main():
            (self.out / "stage2" / "done.json").write_text(json.dumps({"seconds": time.time() - t, "final": hist[-1],
                                                                       "teachers": tmetrics}))

    def run_eval(self, which=("base", "teacher", "student")) -> list[dict]:
        """Re-measure each saved policy: held-out reward (``eval.samples_per_prompt``) and drift."""
        data = self.load_data()
        cache = self.ensure_cache()
        rows = []
        for name in which:
            self.reset_to_base()
            if name != "base":
                d = Path(name) if Path(name).is_dir() and name not in ("teacher", "student") else self.out / name
                if not d.is_dir():
                    say(f"[erpd] no {d}; skipping")
                    continue
                load_policy_state(self.policy, d)
            out = engine.policy_outputs(self.policy, data, cache, self.cfg.sample.temperature,
                                        self.cfg.stage1.micro_batch_size, desc=f"measure {name}")
            res = engine.heldout_reward(self.policy, self.heldout_prompts(), [p.answer for p in self.heldout],
                                        self.verifier, self.cfg.eval.samples_per_prompt, self.cfg.eval, desc=f"held-out eval {name}")
            rows.append({"model": Path(name).name, **res, **engine.drift_metrics(out, data)})
        self.reset_to_base()
        (self.out / "eval.json").write_text(json.dumps(rows, indent=1))
        return rows

    # -- report ------------------------------------------------------------------------------
    def summary_rows(self) -> list[dict]:
        rows = []
        for stage, label in (("stage1", "teacher"), ("stage2", "student")):
            path = self.out / stage / "metrics.jsonl"
            if not path.is_file():
                continue
            epochs = [r for r in engine.read_jsonl(path) if r["kind"] == "epoch"]
            if not rows and epochs:
                rows.append({"model": "base (π0)", **_pick(epochs[0])})
            if epochs and epochs[-1]["epoch"] > 0:
                rows.append({"model": f"{label} ({stage})", **_pick(epochs[-1])})
        return rows


_COLS = ("heldout_reward", "heldout_n", "kl_full", "kl_k3", "logratio", "entropy", "epoch")


def _pick(rec: dict) -> dict:
    return {k: rec.get(k) for k in _COLS}


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<18} {'held-out acc':>12} {'n':>5} {'KL(·‖π0) full':>14} {'KL k3':>8} {'log-ratio':>10} {'entropy':>8}"
    lines = [head, "-" * len(head)]
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        lines.append(f"{r['model']:<18} {fmt(r.get('heldout_reward'), '12.3f')} {fmt(r.get('heldout_n'), '5d')} "
                     f"{fmt(r.get('kl_full'), '14.4f')} {fmt(r.get('kl_k3'), '8.4f')} {fmt(r.get('logratio'), '10.4f')} "
                     f"{fmt(r.get('entropy'), '8.3f')}")
    return "\n".join(lines)


def plot(out_dir: Path, path: Path) -> Path | None:
    """Held-out reward vs KL(·‖π0) for both stages, and entropy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    any_data = False
    for stage, color, label in (("stage1", "tab:red", "stage 1 (teacher)"), ("stage2", "tab:blue", "stage 2 (student)")):
        p = Path(out_dir) / stage / "metrics.jsonl"
        if not p.is_file():
            continue
        ep = [r for r in engine.read_jsonl(p) if r["kind"] == "epoch"]
        pts = [(r["kl_full"], r["heldout_reward"], r["epoch"]) for r in ep if r.get("heldout_reward") is not None]
        if pts:
            any_data = True
            ax1.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", color=color, label=label)
            for x, y, e in pts:
                ax1.annotate(str(e), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=color)
        ax2.plot([r["epoch"] for r in ep], [r["entropy"] for r in ep], "o-", color=color, label=label)
    ax1.set_xscale("symlog", linthresh=1e-2)
    ax1.set_xlabel("KL(π‖π0), full vocabulary, on the fixed data (nats/token)")
    ax1.set_ylabel("held-out reward (sampled)")
    ax1.set_title("reward vs drift (numbers: epochs)")
    ax1.legend()
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("mean entropy on the fixed data (nats)")
    ax2.set_title("entropy per epoch")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if any_data else None


def write_summary(run: Run, wall_seconds: float | None = None) -> str:
    rows = run.summary_rows()
    table = format_table(rows)
    info = {"rows": rows, "wall_seconds": wall_seconds, "config": run.cfg.to_dict()}
    if run.data is not None or fixed_data.exists(run.out / "data"):
        d = run.load_data()
        info["fixed_data"] = {"responses": len(d), "prompts": len(d.prompts), "mean_reward": float(d.rewards.mean())}
    (run.out / "summary.json").write_text(json.dumps(info, indent=1, default=str))
    plot(run.out, run.out / "erpd.png")
    return table
