"""The epoch loop both stages run: epochs × shuffled mini-batches × micro-batches, AdamW on the
trainable parameters.

Each optimizer step's loss is normalized by the whole mini-batch's token (or sequence) counts, so
gradient accumulation over micro-batches, and over ranks under torchrun, gives exactly the
gradient of one big batch. What a stage trains on is its ``step_fn``; what it measures after each
epoch is its ``epoch_end``. Resuming (``erpd.train.checkpoint``) and the distributed bookkeeping
(``erpd.train.dist``) are kept out of this file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from erpd.train import checked_io, checkpoint, dist
from erpd.train.batches import collate, micro_batches
from erpd.train.data import FixedData
from erpd.train.measure import Cache
from erpd.train.models import Policy
from erpd.train.progress import progress


@dataclass
class StepOutput:
    loss: torch.Tensor  # already normalized for the whole optimizer step (sums over micro-batches)
    stats: dict  # sums over the micro-batch; divided by the step's token count when logged


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, n_tokens: int, n_seqs: int) -> torch.Tensor:
    """Normalize a micro-batch's masked per-token loss for its share of the optimizer step.

    ``token-mean``: Σ loss / (tokens in the whole step); ``seq-mean-token-mean``: Σ_i mean_t / (sequences in
    the step). Normalizing by the step's totals (not the micro-batch's) makes gradient accumulation
    give exactly the gradient of one big batch.
    """
    per_token = per_token * mask
    if agg == "token-mean":
        return per_token.sum() / max(1, n_tokens)
    return (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / max(1, n_seqs)


def aggregate_weights(mask: torch.Tensor, agg: str, n_tokens: int, n_seqs: int, dtype=torch.float32) -> torch.Tensor:
    """The per-token weights ``w`` [b, R] with ``aggregate(x, mask, agg, ...) == (x * w).sum()``:
    what a fused op's ``reduction="sum"`` takes as ``token_weights`` to compute the same loss with
    its gradients in the forward (``erpd.linear_kl``). No gradient; ``dtype``: float32, or float64
    for a float64 policy."""
    m = mask.to(dtype)
    if agg == "token-mean":
        return m / max(1, n_tokens)
    return m / m.sum(1, keepdim=True).clamp(min=1) / max(1, n_seqs)


def train_stage(policy: Policy, data: FixedData, cache: Cache, scfg, run_dir: Path, step_fn: Callable, epoch_end: Callable,
                resume: bool, stage: str, extra_state: dict | None = None) -> list[dict]:
    """Train on the fixed data; returns the per-epoch records (epoch 0 = before any update).

    ``step_fn(batch, n_tokens, n_seqs, state) -> StepOutput`` computes one micro-batch's loss;
    ``epoch_end(epoch, state) -> dict`` measures the policy and returns the epoch's metrics (a
    ``"stop"`` key ends the stage after that epoch); ``state`` is a dict the stage keeps across
    epochs (saved in checkpoints, e.g. the anchor). A checkpoint is written after every epoch and,
    with ``scfg.checkpoint_every = k > 0``, after every k-th optimizer step; with ``resume`` the
    stage continues from it. The data order of epoch ``e`` depends only on (seed, e), so a resumed
    run skips the steps already taken and then takes exactly the steps an uninterrupted one would.
    """
    params = [p for _, p in policy.trainable_named()]
    dist.broadcast_params(params)
    # foreach kernels take no mix of DTensor (FSDP-sharded) and plain parameters.
    opt = torch.optim.AdamW(params, lr=scfg.lr, weight_decay=scfg.weight_decay, foreach=False if dist.lockstep() else None)
    ckpt_path = run_dir / "checkpoint.pt"
    state = dict(extra_state or {})
    n = len(data)
    resumed = (checkpoint.resume(ckpt_path, stage, policy, opt, state, checkpoint.steps_per_epoch(n, scfg.batch_size),
                                 dist.load_optimizer_state) if resume else None)
    pos = resumed or checkpoint.Position()

    # Only rank 0 writes files.
    log = checkpoint.MetricsLog(run_dir / "metrics.jsonl", keep=pos.covers if resumed else None) if dist.is_main() else None
    write = log.write if log else (lambda record: None)
    history = dist.broadcast_object(log.epochs() if log else None)
    if resumed is None:
        rec = dict(kind="epoch", stage=stage, epoch=0, **epoch_end(0, state))
        write(rec)
        history.append(rec)

    def save() -> None:
        # Gathered on every rank (a collective under FSDP), written by rank 0.
        trainable, optimizer = policy.trainable_state(), dist.optimizer_state(opt)
        if dist.is_main():
            checkpoint.write(ckpt_path, stage, pos, trainable, optimizer, state)
        dist.barrier()

    mask_all = data.mask
    every = scfg.checkpoint_every
    for epoch in range(pos.epoch + 1, scfg.epochs + 1):
        t0 = time.time()
        g = torch.Generator().manual_seed(scfg.seed * 1_000_003 + epoch)
        mini = list(micro_batches(n, scfg.batch_size, torch.randperm(n, generator=g)))
        bar = progress(total=len(mini), initial=pos.step_in_epoch, desc=f"{stage} epoch {epoch}/{scfg.epochs}", unit="step")
        for k in range(pos.step_in_epoch, len(mini)):  # steps before the checkpoint resumed from are skipped
            mb = mini[k]
            opt.zero_grad(set_to_none=True)
            n_tok, n_seq = int(mask_all[mb].sum()), len(mb)
            step_loss, step_stats = 0.0, {}
            # This rank's rows (None: a zero-weight micro-batch, see dist.micro_batch_plan); the
            # normalizers above count the whole mini-batch.
            for rows in dist.micro_batch_plan(mb, scfg.micro_batch_size):
                batch = collate(data, mb[:1] if rows is None else rows, policy.device, cache.prefix, pack=scfg.pack,
                                pack_length=scfg.pack_length)
                out = step_fn(batch, n_tok, n_seq, state)
                if rows is None:
                    (out.loss * 0).backward()
                    for key in out.stats:  # every rank must reduce the same keys
                        step_stats.setdefault(key, 0.0)
                    continue
                out.loss.backward()
                step_loss += out.loss.item()
                for key, v in out.stats.items():
                    step_stats[key] = step_stats.get(key, 0.0) + float(v)
            dist.all_reduce_grads(params)
            # Every rank's loss and stats are its share of sums normalized by the whole step's
            # counts: their sum over ranks is the global value that rank 0 logs.
            reduced = dist.sum_floats({"loss": step_loss, **{f"stat.{key}": v for key, v in step_stats.items()}})
            step_loss = reduced.pop("loss")
            step_stats = {key[5:]: v for key, v in reduced.items()}
            grad_norm = dist.clip_grad_norm(params, scfg.grad_clip if scfg.grad_clip else float("inf"))
            checked_io.check_step(stage, pos.step + 1, step_loss, float(grad_norm), ckpt_path)  # same on every rank
            opt.step()
            pos.step += 1
            pos.step_in_epoch = k + 1
            rec = dict(kind="step", stage=stage, epoch=epoch, step=pos.step, loss=step_loss, grad_norm=float(grad_norm),
                       **{key: v / max(1, n_tok) for key, v in step_stats.items()})
            write(rec)
            for key in ("loss", *step_stats):
                pos.sums[key] = pos.sums.get(key, 0.0) + rec[key]
            pos.sums["_steps"] = pos.sums.get("_steps", 0) + 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if every and pos.step % every == 0 and k + 1 < len(mini):
                save()  # mid-epoch: pos.epoch is still the last finished epoch
        bar.close()
        train_means = {f"train_{key}": v / pos.sums["_steps"] for key, v in pos.sums.items() if key != "_steps"}
        measured = epoch_end(epoch, state)
        rec = dict(kind="epoch", stage=stage, epoch=epoch, **train_means, **measured, epoch_seconds=time.time() - t0)
        write(rec)
        history.append(rec)
        pos.epoch, pos.step_in_epoch, pos.sums = epoch, 0, {}
        save()
        if measured.get("stop"):  # e.g. a target KL reached: the remaining epochs are not run
            break
    return history
