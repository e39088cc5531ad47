"""Resume plumbing of the epoch loop (``erpd.train.loop``): the metrics log, checkpoints (atomic,
checksummed, never non-finite) and where a resumed stage picks up.

A checkpoint holds the trainable weights, the AdamW state, the stage's own state (e.g. the
re-anchored π_anchor), the RNG state, the epoch and how many of its optimizer steps are done, and
the epoch's running metric sums. It holds full (unsharded) tensors and nothing rank-dependent, so
a run may resume on a different number of processes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from erpd.train import checked_io
from erpd.train.checked_io import read_jsonl

CHECKPOINT_VERSION = 3  # 3: the checked_io checksum trailer


class MetricsLog:
    """JSONL metrics: one object per line with ``"kind"`` = ``"step"`` or ``"epoch"``.

    ``keep`` (a predicate on records) keeps the matching records of an existing file and drops
    the rest: a resumed run keeps what its checkpoint covers, so no step is logged twice.
    """

    def __init__(self, path: str | os.PathLike, keep: Callable[[dict], bool] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if keep(r)]  # a torn last line is dropped
        checked_io.write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write(self, record: dict) -> None:
        checked_io.append_line(self.path, json.dumps(record))

    def epochs(self) -> list[dict]:
        return [r for r in read_jsonl(self.path) if r["kind"] == "epoch"]


def save_checkpoint(path: Path, state: dict) -> None:
    # Never a non-finite checkpoint; atomic (a crash or a full disk mid-write leaves the previous
    # one intact) and checksummed.
    checked_io.check_finite(state["trainable"], f"writing {path}")
    checked_io.save_torch(path, state)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        ck = checked_io.load_torch(path)
    except checked_io.CorruptFileError as e:
        raise checked_io.CorruptFileError(f"{e}; delete it to restart the stage from scratch") from e
    if not isinstance(ck, dict) or not {"stage", "epoch", "trainable", "optimizer"} <= set(ck):
        raise checked_io.CorruptFileError(f"{path}: not an erpd training checkpoint")
    checked_io.check_finite(ck["trainable"], f"{path} (weights)")
    checked_io.check_finite({f"{i}.{k}": v for i, s in ck["optimizer"].get("state", {}).items() for k, v in s.items()},
                            f"{path} (optimizer state)")
    return ck


def rng_state() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(rng: dict | None) -> None:
    if not rng:
        return
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


@dataclass
class Position:
    """Where a stage stands: epochs finished, optimizer steps taken in the current epoch and in
    all, and the current epoch's running metric sums."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    sums: dict = field(default_factory=dict)

    def covers(self, record: dict) -> bool:
        """Whether a logged record is covered by this position (the rest is redone on resume)."""
        return record["step"] <= self.step if record["kind"] == "step" else record["epoch"] <= self.epoch


def resume(path: Path, stage: str, policy, optimizer, state: dict, steps_per_epoch: int, load_optimizer_state) -> Position | None:
    """Restore the weights, the optimizer, ``state`` and the RNG from ``path``; the position to go
    on from (None when there is no checkpoint)."""
    ck = load_checkpoint(path)
    if ck is None:
        return None
    if ck.get("stage") != stage:
        raise ValueError(f"{path} is a {ck.get('stage')!r} checkpoint, not {stage!r}")
    policy.load_trainable_state(ck["trainable"])
    load_optimizer_state(optimizer, ck["optimizer"])
    state.update(ck["state"])
    set_rng_state(ck.get("rng"))
    epoch = ck["epoch"]
    return Position(epoch=epoch, step_in_epoch=ck.get("step_in_epoch", 0), step=ck.get("step", epoch * steps_per_epoch),
                    sums=dict(ck.get("sums", {})))


def write(path: Path, stage: str, pos: Position, trainable: dict, optimizer: dict, state: dict) -> None:
    save_checkpoint(path, dict(version=CHECKPOINT_VERSION, stage=stage, epoch=pos.epoch, step_in_epoch=pos.step_in_epoch,
                               step=pos.step, sums=dict(pos.sums), trainable=trainable, optimizer=optimizer, state=state,
                               rng=rng_state()))


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
