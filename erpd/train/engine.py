"""What both stages share: batching the fixed data, the fused log-prob path, the cached
π0 quantities, sampling and held-out evaluation, metric logging, checkpoints, the epoch loop.

Log-probs always come from the backbone's final hidden states and the LM-head weight through
``erpd.linear_logprobs`` (and full-vocabulary KLs through ``erpd.linear_kl``), evaluated only at
the positions that predict response tokens: the ``[tokens, vocab]`` logits are never formed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from erpd.train import _ops, dist
from erpd.train.data import FixedData
from erpd.train.models import Policy


def progress(iterable=None, **kw):
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("leave", False)
    kw.setdefault("disable", os.environ.get("ERPD_PROGRESS", "1") == "0")
    return tqdm(iterable, **kw)


# ---------------------------------------------------------------------------------------------
# batches and the fused log-prob path


@dataclass
class Batch:
    idx: torch.Tensor  # [b] rows of the fixed data
    input_ids: torch.Tensor  # [b, L]
    attention_mask: torch.Tensor  # [b, L]
    positions: torch.Tensor  # [b, R] hidden-state position predicting each response token
    targets: torch.Tensor  # [b, R], -100 past the end
    prefix: torch.Tensor | None  # [b, L, H] cached frozen-bottom activations

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != -100


def rows(data: FixedData, idx: torch.Tensor, *names: str, device=None) -> list[torch.Tensor]:
    """``data.<name>[idx]`` trimmed to the batch's longest response, on ``device``."""
    R = int(data.response_len[idx].max())
    out = []
    for name in names:
        t = getattr(data, name)[idx]
        out.append((t[:, :R] if t.dim() == 2 else t).to(device))
    return out


def collate(data: FixedData, idx: torch.Tensor, device, prefix_rows: list | None = None) -> Batch:
    plen, rlen = data.prompt_len[idx], data.response_len[idx]
    L, R = int((plen + rlen).max()), int(rlen.max())
    positions = (plen[:, None] - 1 + torch.arange(R)[None, :]).clamp(max=L - 1)
    prefix = None
    if prefix_rows is not None:
        prefix = pad_sequence([prefix_rows[i][:L] for i in idx.tolist()], batch_first=True).to(device)
    return Batch(idx=idx, input_ids=data.input_ids[idx, :L].to(device), attention_mask=data.attention_mask[idx, :L].to(device),
                 positions=positions.to(device), targets=data.targets[idx, :R].to(device), prefix=prefix)


def response_hidden(policy: Policy, batch: Batch) -> torch.Tensor:
    """Final hidden states at the positions that predict the response tokens: ``[b, R, H]``."""
    h = policy.final_hidden(batch.input_ids, batch.attention_mask, batch.prefix)
    return gather_positions(h, batch.positions)


def gather_positions(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return torch.gather(h, 1, positions[..., None].expand(-1, -1, h.shape[-1]))


def logprobs(policy: Policy, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy=False):
    return _ops.linear_logprobs(hidden, policy.head_weight(), targets, bias=policy.head_bias(), temperature=temperature,
                                with_entropy=with_entropy, backend=policy.backend)


def micro_batches(n: int, size: int, order: torch.Tensor | None = None):
    order = torch.arange(n) if order is None else order
    for s in range(0, n, size):
        yield order[s : s + size]


# ---------------------------------------------------------------------------------------------
# π0 quantities cached once per run


@dataclass
class Cache:
    """What never changes while a stage trains on the fixed data.

    ``prefix``: per-sequence ``[L_i, H]`` activations entering the first trainable layer (None when
    every layer trains). ``ref_hidden``: per-sequence ``[R_i, H]`` π0 final hidden states at the
    response-predicting positions, with ``ref_weight``/``ref_bias`` the π0 LM head: the fused
    full-vocabulary KL(π‖π0) needs nothing else from π0.
    """

    prefix: list | None
    ref_hidden: list
    ref_weight: torch.Tensor
    ref_bias: torch.Tensor | None

    def ref_batch(self, batch: Batch) -> torch.Tensor:
        R = batch.targets.shape[1]
        rows = [self.ref_hidden[i][:R] for i in batch.idx.tolist()]
        return pad_sequence(rows, batch_first=True).to(batch.targets.device)


@torch.no_grad()
def build_cache(policy: Policy, data: FixedData, temperature: float, micro_batch_size: int, desc="π0 pass"):
    """One full forward over the data with π0: the :class:`Cache` and π0's log-probs ``[N, R]``."""
    n, R = len(data), data.targets.shape[1]
    prefix = [None] * n if policy.n_frozen else None
    ref_hidden, lp_all = [None] * n, torch.zeros((n, R), dtype=torch.float32)
    for idx in progress(list(micro_batches(n, micro_batch_size)), desc=desc, unit="batch"):
        batch = collate(data, idx, policy.device)
        boundary, h = policy.prefix_pass(batch.input_ids, batch.attention_mask)
        hr = gather_positions(h, batch.positions)
        lp, _ = logprobs(policy, hr, batch.targets, temperature)
        lp_all[idx, : lp.shape[1]] = lp.float().cpu()
        for j, i in enumerate(idx.tolist()):
            L_i = int(data.prompt_len[i] + data.response_len[i])
            # Kept in host memory (a GPU-scale run's caches would not fit next to the model);
            # each batch moves its rows to the device.
            ref_hidden[i] = hr[j, : int(data.response_len[i])].to("cpu", copy=True)
            if prefix is not None:
                prefix[i] = boundary[j, :L_i].to("cpu", copy=True)
    w = policy.head_weight()
    b = policy.head_bias()
    frozen_head = not w.requires_grad
    cache = Cache(prefix=prefix, ref_hidden=ref_hidden, ref_weight=w if frozen_head else w.detach().clone(),
                  ref_bias=None if b is None else (b if not b.requires_grad else b.detach().clone()))
    return cache, lp_all


@torch.no_grad()
def policy_outputs(policy: Policy, data: FixedData, cache: Cache, temperature: float, micro_batch_size: int,
                   with_hidden=False, desc="measure"):
    """No-grad pass with the current policy: log-probs, entropy, KL(π‖π0) per token (``[N, R]``),
    and optionally the response hidden states (a teacher's, for the KL signals of stage 2)."""
    n, R = len(data), data.targets.shape[1]
    lp_all, ent_all, kl_all = (torch.zeros((n, R)) for _ in range(3))
    hidden = [None] * n if with_hidden else None
    was_training = policy.model.training
    policy.model.eval()
    try:
        for idx in progress(list(micro_batches(n, micro_batch_size)), desc=desc, unit="batch"):
            batch = collate(data, idx, policy.device, cache.prefix)
            hr = response_hidden(policy, batch)
            lp, ent = logprobs(policy, hr, batch.targets, temperature, with_entropy=True)
            kl = _ops.linear_kl(hr, policy.head_weight(), batch.targets, bias=policy.head_bias(),
                                teacher_hidden=cache.ref_batch(batch), teacher_weight=cache.ref_weight,
                                teacher_bias=cache.ref_bias, direction="reverse", temperature=temperature,
                                backend=policy.backend)
            r = lp.shape[1]
            lp_all[idx, :r], ent_all[idx, :r], kl_all[idx, :r] = lp.float().cpu(), ent.float().cpu(), kl.float().cpu()
            if hidden is not None:
                for j, i in enumerate(idx.tolist()):
                    hidden[i] = hr[j, : int(data.response_len[i])].to("cpu", copy=True)
    finally:
        policy.model.train(was_training)
    return dict(logprobs=lp_all, entropy=ent_all, kl=kl_all, hidden=hidden)


def drift_metrics(out: dict, data: FixedData) -> dict:
    """Distance of the policy from π0 on the fixed data (token means over response tokens).

    * ``logratio``: mean log π/π0 on π0's tokens (what naive k1 would report);
    * ``kl_k1``, ``kl_k3``: KL(π‖π0) estimated from π0's samples with the importance weight
      r = π/π0 — E_π0[r log r] and E_π0[1 − r + r log r] (k3's IS-corrected form, ≥ 0 per token);
    * ``kl_full``: the exact per-position KL(π‖π0) over the whole vocabulary (``erpd.linear_kl``);
    * ``entropy``: mean entropy of π at those positions.
    """
    m = data.mask
    d = (out["logprobs"] - data.old_logprobs)[m].double()
    r = d.clamp(max=50).exp()
    return {
        "logratio": d.mean().item(),
        "kl_k1": (r * d).mean().item(),
        "kl_k3": (1 - r + r * d).mean().item(),
        "kl_full": out["kl"][m].double().mean().item(),
        "entropy": out["entropy"][m].double().mean().item(),
    }


# ---------------------------------------------------------------------------------------------
# sampling and held-out evaluation


@torch.no_grad()
def generate(policy: Policy, prompts: list[str], n_per_prompt: int, max_new_tokens: int, temperature: float,
             batch_size: int, seed: int, desc="sampling"):
    """``n_per_prompt`` samples per prompt (pure temperature sampling), in prompt-major order.

    Returns a list of ``(prompt_ids, response_ids, text)``; ``response_ids`` ends with EOS when the
    model stopped. Each batch is seeded from ``seed`` and its index, so results do not depend on
    what ran before.
    """
    tok = policy.tokenizer
    eos = tok.eos_token_id
    flat = [p for p in prompts for _ in range(n_per_prompt)]
    out = []
    model = policy.model
    was_training = model.training
    model.eval()
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for b, s in enumerate(progress(range(0, len(flat), batch_size), desc=desc, unit="batch")):
            chunk = flat[s : s + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(policy.device)
            torch.manual_seed(seed * 100003 + b)
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos)
            new = gen[:, enc["input_ids"].shape[1]:].cpu()
            for j in range(len(chunk)):
                p_ids = enc["input_ids"][j][enc["attention_mask"][j].bool()].cpu().tolist()
                r_ids = new[j].tolist()
                if eos in r_ids:
                    r_ids = r_ids[: r_ids.index(eos) + 1]
                if not r_ids:  # max_new_tokens=0 is rejected upstream; keep the invariant anyway
                    r_ids = [eos]
                out.append((p_ids, r_ids, tok.decode(r_ids, skip_special_tokens=True)))
    finally:
        tok.padding_side = old_side
        model.train(was_training)
    return out


def heldout_reward(policy: Policy, prompts: list[str], answers: list, verifier: Callable, n_per_prompt: int,
                   eval_cfg, desc="held-out eval") -> dict:
    samples = generate(policy, prompts, n_per_prompt, eval_cfg.max_new_tokens, eval_cfg.temperature, eval_cfg.batch_size,
                       eval_cfg.seed, desc=desc)
    rewards = [float(verifier(text, answers[i // n_per_prompt])) for i, (_, _, text) in enumerate(samples)]
    lengths = [len(r) for _, r, _ in samples]
    return {"heldout_reward": sum(rewards) / max(1, len(rewards)), "heldout_n": len(rewards),
            "heldout_len": sum(lengths) / max(1, len(lengths))}


# ---------------------------------------------------------------------------------------------
# metrics, checkpoints


class MetricsLog:
    """JSONL metrics: one object per line with ``"kind"`` = ``"step"`` or ``"epoch"``."""

    def __init__(self, path: str | os.PathLike, keep_upto_epoch: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_upto_epoch is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("epoch", 0) <= keep_upto_epoch]
        with open(self.path, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------
# the epoch loop both stages run


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


def train_stage(policy: Policy, data: FixedData, cache: Cache, scfg, temperature: float, run_dir: Path,
                step_fn: Callable, epoch_end: Callable, resume: bool, stage: str, extra_state: dict | None = None) -> list[dict]:
    """Epochs × shuffled mini-batches × micro-batches, AdamW on the trainable parameters.

    ``step_fn(batch, n_tokens, n_seqs, state) -> StepOutput`` computes one micro-batch's loss;
    ``epoch_end(epoch, state) -> dict`` measures the policy and returns the epoch's metrics;
    ``state`` is a dict the caller may use across epochs (saved in checkpoints, e.g. the anchor).
    A checkpoint (trainable weights, optimizer, ``state``, epoch) is written after every epoch;
    with ``resume`` the loop continues after the last one. The data order of epoch ``e`` depends
    only on (seed, e), so a resumed run takes exactly the steps an uninterrupted one would.
    """
    params = [p for _, p in policy.trainable_named()]
    dist.broadcast_params(params)
    opt = torch.optim.AdamW(params, lr=scfg.lr, weight_decay=scfg.weight_decay)
    ckpt_path = run_dir / "checkpoint.pt"
    state = dict(extra_state or {})
    start = 0
    if resume:
        ck = load_checkpoint(ckpt_path)
        if ck is not None:
            if ck.get("stage") != stage:
                raise ValueError(f"{ckpt_path} is a {ck.get('stage')!r} checkpoint, not {stage!r}")
            policy.load_trainable_state(ck["trainable"])
            opt.load_state_dict(ck["optimizer"])
            state.update(ck["state"])
            start = ck["epoch"]
    # A resumed run keeps the records of the epochs its checkpoint covers and drops the rest
    # (e.g. the steps of an epoch that was interrupted). Only rank 0 writes files.
    log = MetricsLog(run_dir / "metrics.jsonl", keep_upto_epoch=start if start > 0 else None) if dist.is_main() else None
    history = dist.broadcast_object([r for r in read_jsonl(log.path) if r["kind"] == "epoch"] if log else None)
    write = log.write if log else (lambda record: None)
    if start == 0:
        rec = dict(kind="epoch", stage=stage, epoch=0, **epoch_end(0, state))
        write(rec)
        history.append(rec)

    n = len(data)
    mask_all = data.mask
    step = start * math.ceil(n / scfg.batch_size)
    for epoch in range(start + 1, scfg.epochs + 1):
        t0 = time.time()
        g = torch.Generator().manual_seed(scfg.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
        sums: dict = {}
        bar = progress(list(micro_batches(n, scfg.batch_size, order)), desc=f"{stage} epoch {epoch}/{scfg.epochs}",
                       unit="step")
        for mb in bar:
            opt.zero_grad(set_to_none=True)
            n_tok, n_seq = int(mask_all[mb].sum()), len(mb)
            step_loss, step_stats = 0.0, {}
            local = dist.shard(mb)  # this rank's rows; the normalizers above count the whole mini-batch
            for idx in micro_batches(len(local), scfg.micro_batch_size):
                batch = collate(data, local[idx], policy.device, cache.prefix)
                out = step_fn(batch, n_tok, n_seq, state)
                out.loss.backward()
                step_loss += out.loss.item()
                for k, v in out.stats.items():
                    step_stats[k] = step_stats.get(k, 0.0) + float(v)
            dist.all_reduce_grads(params)
            reduced = dist.sum_floats({"loss": step_loss, **step_stats})
            step_loss = reduced.pop("loss")
            step_stats = reduced
            grad_norm = torch.nn.utils.clip_grad_norm_(params, scfg.grad_clip if scfg.grad_clip else float("inf"))
            opt.step()
            step += 1
            rec = dict(kind="step", stage=stage, epoch=epoch, step=step, loss=step_loss, grad_norm=float(grad_norm),
                       **{k: v / max(1, n_tok) for k, v in step_stats.items()})
            write(rec)
            for k in ("loss", *step_stats):
                sums[k] = sums.get(k, 0.0) + rec[k]
            sums["_steps"] = sums.get("_steps", 0) + 1
            bar.set_postfix(loss=f"{step_loss:.4f}")
        train_means = {f"train_{k}": v / sums["_steps"] for k, v in sums.items() if k != "_steps"}
        measured = epoch_end(epoch, state)
        rec = dict(kind="epoch", stage=stage, epoch=epoch, **train_means, **measured, epoch_seconds=time.time() - t0)
        write(rec)
        history.append(rec)
        if dist.is_main():
            save_checkpoint(ckpt_path, dict(stage=stage, epoch=epoch, trainable=policy.trainable_state(),
                                            optimizer=opt.state_dict(), state=state))
        dist.barrier()
    return history
