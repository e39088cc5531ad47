"""The summary of a run: one row per policy (greedy accuracy on both evaluation splits with
bootstrap CIs, paired differences, drift from π0 on the fixed data), as text and as a plot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from erpd.train.evaluate import SPLITS, SplitResult, bootstrap_ci, paired_diff_ci


@dataclass
class PolicyRow:
    name: str
    splits: dict[str, SplitResult]  # split name -> greedy answers
    drift: dict = field(default_factory=dict)  # kl_full, kl_k3, entropy, ... on the fixed data
    # Several seeds pooled into one row (``splits`` then holds each prompt's accuracy averaged over
    # the seeds): split -> each seed's accuracy, shown as the spread.
    seeds: dict = field(default_factory=dict)

    def accuracy(self, split: str) -> tuple[float, float, float]:
        return bootstrap_ci(self.splits[split].correct)


def _ci(t: tuple[float, float, float], signed: bool = False) -> str:
    fmt = "+.3f" if signed else ".3f"
    return f"{t[0]:{fmt}} [{t[1]:{fmt}}, {t[2]:{fmt}}]"


def _spread(per_seed: list[float] | None) -> str:
    return f" (seeds {min(per_seed):.3f}–{max(per_seed):.3f})" if per_seed else ""


def comparisons(rows: list[PolicyRow], pairs: list[tuple[str, str]]) -> list[dict]:
    """Paired differences a − b (same prompts) on each split, with 95% bootstrap CIs."""
    by = {r.name: r for r in rows}
    out = []
    for a, b in pairs:
        if a in by and b in by:
            out.append({"a": a, "b": b, **{s: paired_diff_ci(by[a].splits[s].correct, by[b].splits[s].correct)
                                            for s in SPLITS if s in by[a].splits and s in by[b].splits}})
    return out


def markdown(rows: list[PolicyRow], pairs: list[tuple[str, str]]) -> str:
    """The accuracy table (mean [95% CI] per split, the seeds' spread where a row pools several, KL
    to π0, entropy, truncation) and the paired differences below it."""
    lines = ["| policy | task prompts [95% CI] | other phrasings [95% CI] | KL(·‖π0) full | KL k3 | entropy | truncated |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        acc = [(_ci(r.accuracy(s)) + _spread(r.seeds.get(s)) if s in r.splits else "—") for s in SPLITS]
        d = r.drift
        trunc = sum(r.splits[s].truncation for s in r.splits) / max(1, len(r.splits))
        lines.append(f"| {r.name} | {acc[0]} | {acc[1]} | {d.get('kl_full', float('nan')):.3f} | "
                     f"{d.get('kl_k3', float('nan')):.3f} | {d.get('entropy', float('nan')):.3f} | {trunc:.2f} |")
    comp = comparisons(rows, pairs)
    if comp:
        lines += ["", "| paired difference | task prompts [95% CI] | other phrasings [95% CI] |", "|---|--:|--:|"]
        for c in comp:
            lines.append(f"| {c['a']} − {c['b']} | " + " | ".join(_ci(c[s], signed=True) if s in c else "—" for s in SPLITS) + " |")
    return "\n".join(lines)


def plot(rows: list[PolicyRow], path, title: str = "") -> None:
    """Greedy accuracy with 95% CI bars against KL(π‖π0) on the fixed data, one panel per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPLITS), figsize=(11, 4.2), sharey=True)
    for ax, split in zip(axes, SPLITS):
        for i, r in enumerate(rows):
            if split not in r.splits:
                continue
            m, lo, hi = r.accuracy(split)
            x = r.drift.get("kl_full", 0.0)
            ax.errorbar([x], [m], yerr=[[m - lo], [hi - m]], fmt="o", capsize=3, color=f"C{i % 10}", label=r.name)
        ax.set_xscale("symlog", linthresh=1e-2)
        ax.set_xlabel("KL(π‖π0), full vocabulary, on the fixed data (nats/token)")
        ax.set_title({"task": "task prompts (held out)", "other": "other phrasings"}[split])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("greedy accuracy (95% CI)")
    axes[-1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
