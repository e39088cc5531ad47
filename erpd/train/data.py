"""The fixed data both stages train on (sampled by ``erpd.train.stage0``): its tensors, its
format on disk, and the checks a loaded copy must pass.

On-disk format (a directory; version ``FORMAT_VERSION``)::

    manifest.json        written last (erpd.train.checked_io.write_manifest); {"format":
                         "erpd.fixed_data", "version": 2, "files": {name: {"sha256", "bytes"}},
                         "n_sequences", "n_prompts", "meta": {model, temperature, sample
                         config, ...}, "sha256": the manifest's own checksum}
    tensors.safetensors  input_ids [N, L] int64 (prompt then response, right-padded with pad_id)
                         attention_mask [N, L] int64
                         prompt_len [N] int64, response_len [N] int64
                         targets [N, R] int64 (response token ids, -100 past the end)
                         old_logprobs [N, R] float32 (π0 log-probs at temperature τ; 0 past the end)
                         rewards [N] float32, advantages [N] float32, group [N] int64 (prompt index)
    texts.json           {"questions": [P], "answers": [P], "prompts": [P], "responses": [N]}

Row ``i`` is the ``i % k``-th sample of prompt ``group[i]``; the response's ``r``-th token is
``input_ids[i, prompt_len[i] + r]`` and is predicted by the hidden state at position
``prompt_len[i] + r - 1``. A response that stopped includes its EOS token (a sampled action).
``load`` checks the manifest and every checksum and raises :class:`CorruptDataError` naming the
file on any mismatch (truncated copy, edited file, interrupted write). Version 1 (before the
manifest had a checksum of its own) is refused: re-run ``erpd sample``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from erpd.train import checked_io
from erpd.train.checked_io import MANIFEST

FORMAT = "erpd.fixed_data"
FORMAT_VERSION = 2
TENSORS = "tensors.safetensors"
TEXTS = "texts.json"
_TENSOR_KEYS = ("input_ids", "attention_mask", "prompt_len", "response_len", "targets", "old_logprobs",
                "rewards", "advantages", "group")


class CorruptDataError(checked_io.CorruptFileError):
    pass


@dataclass
class FixedData:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: torch.Tensor
    response_len: torch.Tensor
    targets: torch.Tensor
    old_logprobs: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    group: torch.Tensor
    questions: list = field(default_factory=list)
    answers: list = field(default_factory=list)
    prompts: list = field(default_factory=list)
    responses: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != -100

    def group_baseline(self) -> torch.Tensor:
        """Each response's group-mean reward (the MSE objective's baseline b)."""
        n_groups = int(self.group.max()) + 1 if len(self) else 0
        sums = torch.zeros(n_groups).index_add_(0, self.group, self.rewards)
        counts = torch.zeros(n_groups).index_add_(0, self.group, torch.ones_like(self.rewards))
        return (sums / counts)[self.group]


def group_advantages(rewards: torch.Tensor, group: torch.Tensor, mode: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: (R - mean_g) / (std_g + eps) for ``mode="group"``, R - mean_g for ``"mean"``.

    ``std_g`` is the population std of the group; a group whose rewards are all equal gets 0.
    """
    rewards = rewards.float()
    n = int(group.max()) + 1 if rewards.numel() else 0
    count = torch.zeros(n).index_add_(0, group, torch.ones_like(rewards))
    mean = torch.zeros(n).index_add_(0, group, rewards) / count
    centered = rewards - mean[group]
    if mode == "mean":
        return centered
    var = torch.zeros(n).index_add_(0, group, centered**2) / count
    return centered / (var.sqrt()[group] + eps)


def save(data: FixedData, directory: str | os.PathLike) -> Path:
    d = checked_io.begin_directory(directory)
    tensors = {k: getattr(data, k).contiguous().cpu() for k in _TENSOR_KEYS}
    texts = dict(questions=data.questions, answers=[str(a) for a in data.answers], prompts=data.prompts,
                 responses=data.responses)
    files = {TENSORS: checked_io.write_bytes(d / TENSORS, safetensors_bytes(tensors)),
             TEXTS: checked_io.write_bytes(d / TEXTS, json.dumps(texts).encode())}
    checked_io.write_manifest(d, files, FORMAT, FORMAT_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                              n_sequences=len(data), n_prompts=len(data.prompts), meta=data.meta)
    return d


def exists(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def load(directory: str | os.PathLike) -> FixedData:
    d = Path(directory)
    manifest = checked_io.read_manifest(d, FORMAT, FORMAT_VERSION, "re-run `erpd sample`", error=CorruptDataError)
    for name in (TENSORS, TEXTS):
        if name not in manifest["files"]:
            raise CorruptDataError(f"{d / MANIFEST}: lists no checksum for {name}")
    tensors = checked_io.load_safetensors(d / TENSORS)
    missing = [k for k in _TENSOR_KEYS if k not in tensors]
    if missing:
        raise CorruptDataError(f"{d / TENSORS}: missing tensors {missing}")
    texts = checked_io.parse_json(d / TEXTS, (d / TEXTS).read_text())
    data = FixedData(**{k: tensors[k] for k in _TENSOR_KEYS}, questions=texts["questions"], answers=texts["answers"],
                     prompts=texts["prompts"], responses=texts["responses"], meta=manifest.get("meta", {}))
    n = len(data)
    if any(getattr(data, k).shape[0] != n for k in _TENSOR_KEYS) or len(data.responses) != n:
        raise CorruptDataError(f"{d}: tensors and texts disagree on the number of sequences")
    if manifest.get("n_sequences") not in (None, n):
        raise CorruptDataError(f"{d}: {n} sequences, the manifest says {manifest['n_sequences']}")
    check_consistency(data, where=str(d / TENSORS))
    return data


def check_consistency(data: FixedData, where: str = "fixed data") -> None:
    """The layout invariants of the format, checked on load: they catch a file that is
    self-consistent to its checksum but wrong (rewritten by hand, or by a buggy tool)."""

    def bad(msg):
        raise CorruptDataError(f"{where}: {msg}")

    n = len(data)
    if data.input_ids.dim() != 2 or data.attention_mask.shape != data.input_ids.shape:
        bad(f"input_ids {tuple(data.input_ids.shape)} and attention_mask {tuple(data.attention_mask.shape)} must be equal [N, L]")
    if data.targets.dim() != 2 or data.old_logprobs.shape != data.targets.shape:
        bad(f"targets {tuple(data.targets.shape)} and old_logprobs {tuple(data.old_logprobs.shape)} must be equal [N, R]")
    if n == 0:
        return
    plen, rlen = data.prompt_len, data.response_len
    if int(rlen.min()) < 1 or int(plen.min()) < 1:
        bad("every row needs a prompt and at least one response token")
    if int(rlen.max()) > data.targets.shape[1] or int((plen + rlen).max()) > data.input_ids.shape[1]:
        bad("prompt_len + response_len exceeds the padded width")
    if not torch.equal(data.mask.sum(1), rlen):
        bad("the number of response targets (!= -100) disagrees with response_len")
    if not torch.equal(data.attention_mask.sum(1), plen + rlen):
        bad("attention_mask disagrees with prompt_len + response_len")
    cols = plen[:, None] + torch.arange(data.targets.shape[1])[None, :]
    resp = torch.gather(data.input_ids, 1, cols.clamp(max=data.input_ids.shape[1] - 1))
    if not torch.equal(torch.where(data.mask, resp, -100), data.targets):
        bad("targets are not the response tokens of input_ids")
    lp = data.old_logprobs[data.mask]
    if not torch.isfinite(lp).all() or (lp > 0).any():
        bad("old_logprobs must be finite and <= 0 on response tokens")
    if not (torch.isfinite(data.rewards).all() and torch.isfinite(data.advantages).all()):
        bad("rewards and advantages must be finite")
    if int(data.group.min()) < 0 or int(data.group.max()) >= max(1, len(data.prompts)):
        bad(f"group ids must index the {len(data.prompts)} prompts")


def build(prompt_ids: list, response_ids: list, rewards: list, group: list, pad_id: int, advantage: str = "group",
          **texts) -> FixedData:
    """Assemble the padded tensors from per-sequence token lists (old_logprobs left at 0)."""
    n = len(prompt_ids)
    plen = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    rlen = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
    if n and int(rlen.min()) < 1:
        raise ValueError("every response needs at least one token")
    L, R = int((plen + rlen).max()) if n else 0, int(rlen.max()) if n else 0
    input_ids = torch.full((n, L), pad_id, dtype=torch.long)
    attention = torch.zeros((n, L), dtype=torch.long)
    targets = torch.full((n, R), -100, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        seq = torch.tensor(list(p) + list(r), dtype=torch.long)
        input_ids[i, : len(seq)] = seq
        attention[i, : len(seq)] = 1
        targets[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    rewards_t = torch.tensor(rewards, dtype=torch.float32)
    group_t = torch.tensor(group, dtype=torch.long)
    return FixedData(input_ids=input_ids, attention_mask=attention, prompt_len=plen, response_len=rlen, targets=targets,
                     old_logprobs=torch.zeros((n, R), dtype=torch.float32), rewards=rewards_t,
                     advantages=group_advantages(rewards_t, group_t, advantage), group=group_t, **texts)
