"""Held-out evaluation that can tell policies apart: greedy accuracy on two splits, with paired
bootstrap confidence intervals over prompts.

* ``task``: held-out problems written with the task generator's own templates, names and objects
  (never a training question);
* ``other``: problems of the same levels and number ranges written with templates, names and
  objects the generator never uses, so a policy that only fitted the training templates does
  not score there.

Every policy answers the same prompts with greedy decoding (no sampling noise), so two policies
are compared prompt by prompt: the difference of their accuracies gets a *paired* bootstrap CI
(resampling prompts), far tighter than two independent CIs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from erpd.train import stage0
from erpd.train.models import Policy
from erpd.train.task import Problem, chat_prompt


SPLITS = ("task", "other")


@dataclass
class SplitResult:
    """One policy's greedy answers on one split: per-prompt correctness and truncation."""

    correct: list[float]
    truncated: list[bool]  # the response hit max_new_tokens without an end-of-sequence token
    lengths: list[int]
    texts: list[str]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, len(self.correct))

    @property
    def truncation(self) -> float:
        return sum(self.truncated) / max(1, len(self.truncated))

    def to_dict(self) -> dict:
        return dict(accuracy=self.accuracy, truncation=self.truncation, correct=self.correct, truncated=self.truncated,
                    lengths=self.lengths, texts=self.texts)

    @classmethod
    def from_dict(cls, d: dict) -> "SplitResult":
        return cls(**{k: d[k] for k in ("correct", "truncated", "lengths", "texts")})


def greedy_split(policy: Policy, problems: list[Problem], verifier: Callable, system_prompt: str | None,
                 max_new_tokens: int, batch_size: int, desc: str = "greedy eval") -> SplitResult:
    """The policy's greedy answers to ``problems``, scored by ``verifier``."""
    prompts = [chat_prompt(policy.tokenizer, p.question, system_prompt) for p in problems]
    out = stage0.generate(policy, prompts, 1, max_new_tokens, None, batch_size, seed=0, desc=desc)
    eos = policy.tokenizer.eos_token_id
    correct = [float(verifier(text, p.answer)) for (_, _, text), p in zip(out, problems)]
    truncated = [len(r) >= max_new_tokens and r[-1] != eos for _, r, _ in out]
    return SplitResult(correct=correct, truncated=truncated, lengths=[len(r) for _, r, _ in out],
                       texts=[t for _, _, t in out])


def bootstrap_ci(values, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): the percentile bootstrap CI of the mean over prompts."""
    x = torch.as_tensor(values, dtype=torch.float64)
    if x.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (n_boot, x.numel()), generator=g)
    means = x[idx].mean(1)
    a = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return x.mean().item(), lo, hi


def paired_diff_ci(a, b, **kw) -> tuple[float, float, float]:
    """(mean, lo, hi) of mean(a) − mean(b) over the same prompts, resampling prompts together."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same prompts: {tuple(a.shape)} vs {tuple(b.shape)}")
    return bootstrap_ci(a - b, **kw)
