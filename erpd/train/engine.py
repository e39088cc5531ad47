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

import erpd
from erpd.train import checked_io, dist
from erpd.train.checked_io import read_jsonl
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
    """A micro-batch of ``b`` responses of the fixed data, ready for the backbone.

    Unpacked (the default), row j of the model inputs is response j, right-padded. Packed
    (``collate(..., pack=True)``), several responses share a row: ``packed_row[j]`` is response
    j's row, ``position_ids`` restart at 0 for each response, and ``segment_ids`` (-1 on padding)
    tell the policy which tokens may attend to which (block-diagonal causal). Either way the
    fields indexed by response (``idx``, ``positions``, ``targets``) are ``[b, ...]``, so losses,
    per-response aggregations and advantages apply per response unchanged.
    """

    idx: torch.Tensor  # [b] rows of the fixed data
    input_ids: torch.Tensor  # [rows, L]
    attention_mask: torch.Tensor  # [rows, L] 1 on real tokens
    positions: torch.Tensor  # [b, R] column (in its row) of the hidden state predicting each response token
    targets: torch.Tensor  # [b, R], -100 past the end
    prefix: torch.Tensor | None  # [rows, L, H] cached frozen-bottom activations
    packed_row: torch.Tensor | None = None  # [b] packed row of each response (None: row j is response j)
    position_ids: torch.Tensor | None = None  # [rows, L] (packed only)
    segment_ids: torch.Tensor | None = None  # [rows, L] response index within the batch, -1 on padding (packed only)

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


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: groups of sequence indices whose lengths sum to at most ``capacity``.

    Deterministic (ties keep the input order), so a packed step is reproducible.
    """
    if lengths and max(lengths) > capacity:
        raise ValueError(f"pack_length={capacity} is shorter than a sequence of {max(lengths)} tokens "
                         "(prompt + response); raise it or set it to 0 (the micro-batch's longest sequence)")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                bins[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def collate(data: FixedData, idx: torch.Tensor, device, prefix_rows: list | None = None, pack: bool = False,
            pack_length: int = 0) -> Batch:
    plen, rlen = data.prompt_len[idx], data.response_len[idx]
    R = int(rlen.max())
    targets = data.targets[idx, :R].to(device)
    if pack:
        return _collate_packed(data, idx, device, prefix_rows, pack_length, targets)
    L = int((plen + rlen).max())
    positions = (plen[:, None] - 1 + torch.arange(R)[None, :]).clamp(max=L - 1)
    prefix = None
    if prefix_rows is not None:
        prefix = pad_sequence([prefix_rows[i][:L] for i in idx.tolist()], batch_first=True).to(device)
    return Batch(idx=idx, input_ids=data.input_ids[idx, :L].to(device), attention_mask=data.attention_mask[idx, :L].to(device),
                 positions=positions.to(device), targets=targets, prefix=prefix)


def _collate_packed(data, idx, device, prefix_rows, pack_length, targets) -> Batch:
    plen, rlen = data.prompt_len[idx], data.response_len[idx]
    lengths = (plen + rlen).tolist()
    capacity = pack_length or max(lengths)
    groups = pack_rows(lengths, capacity)
    L = max(sum(lengths[j] for j in g) for g in groups)
    n_rows, R = len(groups), targets.shape[1]
    # Padding ids are arbitrary: padding is a block of its own that no response token sees.
    input_ids = torch.zeros((n_rows, L), dtype=data.input_ids.dtype)
    segment_ids = torch.full((n_rows, L), -1, dtype=torch.long)
    # Padding gets positions 0, 1, ... too: a block of its own, as a further "sequence".
    position_ids = torch.zeros((n_rows, L), dtype=torch.long)
    packed_row = torch.empty(len(idx), dtype=torch.long)
    positions = torch.empty((len(idx), R), dtype=torch.long)
    prefix = None
    if prefix_rows is not None:
        first = prefix_rows[int(idx[0])]
        prefix = first.new_zeros((n_rows, L, first.shape[-1]))
    for r, g in enumerate(groups):
        off = 0
        for j in g:
            i, n = int(idx[j]), lengths[j]
            input_ids[r, off : off + n] = data.input_ids[i, :n]
            segment_ids[r, off : off + n] = j
            position_ids[r, off : off + n] = torch.arange(n)
            if prefix is not None:
                prefix[r, off : off + n] = prefix_rows[i][:n]
            packed_row[j] = r
            # Past a response's end the position is clamped inside it; those targets are -100.
            positions[j] = (off + int(plen[j]) - 1 + torch.arange(R)).clamp(max=off + n - 1)
            off += n
        position_ids[r, off:] = torch.arange(L - off)
    return Batch(idx=idx, input_ids=input_ids.to(device), attention_mask=(segment_ids >= 0).long().to(device),
                 positions=positions.to(device), targets=targets, prefix=None if prefix is None else prefix.to(device),
                 packed_row=packed_row.to(device), position_ids=position_ids.to(device), segment_ids=segment_ids.to(device))


def response_hidden(policy: Policy, batch: Batch) -> torch.Tensor:
    """Final hidden states at the positions that predict the response tokens: ``[b, R, H]``."""
    if batch.packed_row is None:
        h = policy.final_hidden(batch.input_ids, batch.attention_mask, batch.prefix)
        return gather_positions(h, batch.positions)
    h = policy.final_hidden(batch.input_ids, batch.attention_mask, batch.prefix, position_ids=batch.position_ids,
                            segment_ids=batch.segment_ids)
    L = h.shape[1]
    return h.reshape(-1, h.shape[-1])[batch.packed_row[:, None] * L + batch.positions]


def gather_positions(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return torch.gather(h, 1, positions[..., None].expand(-1, -1, h.shape[-1]))


def logprobs(policy: Policy, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy=False):
    """``erpd.linear_logprobs`` of the policy's LM head on ``hidden`` (targets -100 give 0)."""
    return erpd.linear_logprobs(hidden, policy.head_weight(), targets, bias=policy.head_bias(), temperature=temperature,
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
            kl = erpd.linear_kl(hr, policy.head_weight(), batch.targets, bias=policy.head_bias(),
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


def drift_metrics(out: dict, data: FixedData, band: float = 0.2) -> dict:
    """Distance of the policy from π0 on the fixed data (token means over response tokens).

    * ``logratio``: mean log π/π0 on π0's tokens (what naive k1 would report);
    * ``kl_k1``, ``kl_k3``: KL(π‖π0) estimated from π0's samples with the importance weight
      r = π/π0 — E_π0[r log r] and E_π0[1 − r + r log r] (k3's IS-corrected form, ≥ 0 per token);
    * ``kl_full``: the exact per-position KL(π‖π0) over the whole vocabulary (``erpd.linear_kl``);
    * ``entropy``: mean entropy of π at those positions;
    * ``out_of_band``: the fraction of tokens whose ratio π/π0 left [1 − band, 1 + band];
    * ``auc``: within-prompt AUC of each response's mean log π/π0 against its reward (how often a
      rewarded response is ranked above an unrewarded one of the same prompt; 0.5 = no relation).
    """
    m = data.mask
    d_all = (out["logprobs"] - data.old_logprobs) * m
    d = d_all[m].double()
    r = d.clamp(max=50).exp()
    return {
        "logratio": d.mean().item(),
        "kl_k1": (r * d).mean().item(),
        "kl_k3": (1 - r + r * d).mean().item(),
        "kl_full": out["kl"][m].double().mean().item(),
        "entropy": out["entropy"][m].double().mean().item(),
        "out_of_band": ((r < 1 - band) | (r > 1 + band)).double().mean().item(),
        "auc": within_group_auc(d_all.sum(1) / m.sum(1).clamp(min=1), data.rewards, data.group),
    }


def within_group_auc(score: torch.Tensor, rewards: torch.Tensor, group: torch.Tensor) -> float | None:
    """P(score of a rewarded response > score of an unrewarded one of the same group), ties ½;
    None when no group has both."""
    wins = pairs = 0.0
    for g in group.unique().tolist():
        s, r = score[group == g].double(), rewards[group == g]
        pos, neg = s[r > 0], s[r <= 0]
        if len(pos) and len(neg):
            diff = pos[:, None] - neg[None, :]
            wins += (diff > 0).sum().item() + 0.5 * (diff == 0).sum().item()
            pairs += diff.numel()
    return wins / pairs if pairs else None


# ---------------------------------------------------------------------------------------------
# sampling and held-out evaluation


@torch.no_grad()
def generate(policy: Policy, prompts: list[str], n_per_prompt: int, max_new_tokens: int, temperature: float | None,
             batch_size: int, seed: int, desc="sampling"):
    """``n_per_prompt`` samples per prompt (pure temperature sampling; greedy decoding when
    ``temperature`` is None), in prompt-major order.

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
            decoding = (dict(do_sample=False, temperature=None, top_k=None, top_p=None) if temperature is None
                        else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0))
            gen = model.generate(**enc, **decoding,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos,
                                 # FSDP: every rank decodes until all ranks are done (forwards are collectives)
                                 synced_gpus=dist.lockstep())
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


CHECKPOINT_VERSION = 3  # 3: the checked_io checksum trailer


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


def _rng_state() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(rng: dict | None) -> None:
    if not rng:
        return
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


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

    A checkpoint (trainable weights, AdamW, ``state``, RNG, the epoch and how many of its steps
    are done, the epoch's running metric sums) is written after every epoch and, with
    ``scfg.checkpoint_every = k > 0``, after every k-th optimizer step; with ``resume`` the loop
    continues from it. The data order of epoch ``e`` depends only on (seed, e), so a resumed run
    skips the steps already taken and then takes exactly the steps an uninterrupted one would.
    The checkpoint holds full (unsharded) tensors and no rank-dependent state, so a run may
    resume on a different number of processes.
    """
    params = [p for _, p in policy.trainable_named()]
    dist.broadcast_params(params)
    # foreach kernels take no mix of DTensor (FSDP-sharded) and plain parameters.
    opt = torch.optim.AdamW(params, lr=scfg.lr, weight_decay=scfg.weight_decay, foreach=False if dist.lockstep() else None)
    ckpt_path = run_dir / "checkpoint.pt"
    state = dict(extra_state or {})
    done_epochs, skip, step, sums = 0, 0, 0, {}
    ck = load_checkpoint(ckpt_path) if resume else None
    if ck is not None:
        if ck.get("stage") != stage:
            raise ValueError(f"{ckpt_path} is a {ck.get('stage')!r} checkpoint, not {stage!r}")
        policy.load_trainable_state(ck["trainable"])
        dist.load_optimizer_state(opt, ck["optimizer"])
        state.update(ck["state"])
        done_epochs = ck["epoch"]
        skip = ck.get("step_in_epoch", 0)
        step = ck.get("step", done_epochs * math.ceil(len(data) / scfg.batch_size))
        sums = dict(ck.get("sums", {}))
        _set_rng_state(ck.get("rng"))

    def covered(r: dict) -> bool:  # records the checkpoint covers; the rest is redone
        return r["step"] <= step if r["kind"] == "step" else r["epoch"] <= done_epochs

    # Only rank 0 writes files.
    log = MetricsLog(run_dir / "metrics.jsonl", keep=covered if ck is not None else None) if dist.is_main() else None
    history = dist.broadcast_object([r for r in read_jsonl(log.path) if r["kind"] == "epoch"] if log else None)
    write = log.write if log else (lambda record: None)
    if ck is None:
        rec = dict(kind="epoch", stage=stage, epoch=0, **epoch_end(0, state))
        write(rec)
        history.append(rec)

    def checkpoint(epoch_done: int, step_in_epoch: int) -> None:
        # Gathered on every rank (a collective under FSDP), written by rank 0.
        trainable, optimizer = policy.trainable_state(), dist.optimizer_state(opt)
        if dist.is_main():
            save_checkpoint(ckpt_path, dict(version=CHECKPOINT_VERSION, stage=stage, epoch=epoch_done,
                                            step_in_epoch=step_in_epoch, step=step, sums=dict(sums),
                                            trainable=trainable, optimizer=optimizer, state=state, rng=_rng_state()))
        dist.barrier()

    n = len(data)
    mask_all = data.mask
    every = getattr(scfg, "checkpoint_every", 0)
    for epoch in range(done_epochs + 1, scfg.epochs + 1):
        t0 = time.time()
        g = torch.Generator().manual_seed(scfg.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
        mini = list(micro_batches(n, scfg.batch_size, order))
        bar = progress(total=len(mini), initial=skip, desc=f"{stage} epoch {epoch}/{scfg.epochs}", unit="step")
        for k, mb in enumerate(mini):
            if k < skip:  # taken before the checkpoint this run resumed from
                continue
            opt.zero_grad(set_to_none=True)
            n_tok, n_seq = int(mask_all[mb].sum()), len(mb)
            step_loss, step_stats = 0.0, {}
            local = dist.shard(mb)  # this rank's rows; the normalizers above count the whole mini-batch
            chunks = [local[idx] for idx in micro_batches(len(local), scfg.micro_batch_size)]
            if dist.lockstep():
                # Every forward/backward is a collective: a rank short of rows runs zero-weight ones.
                chunks += [None] * (dist.micro_batch_count(len(mb), scfg.micro_batch_size) - len(chunks))
            elif not chunks:
                # No rows here (a last mini-batch smaller than the world, or batch_size < world): one
                # zero-weight micro-batch, so that this rank reduces the same stats as the others.
                chunks = [None]
            for rows_ in chunks:
                batch = collate(data, mb[:1] if rows_ is None else rows_, policy.device, cache.prefix,
                                pack=getattr(scfg, "pack", False), pack_length=getattr(scfg, "pack_length", 0))
                out = step_fn(batch, n_tok, n_seq, state)
                if rows_ is None:
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
            checked_io.check_step(stage, step + 1, step_loss, float(grad_norm), ckpt_path)  # same on every rank
            opt.step()
            step += 1
            rec = dict(kind="step", stage=stage, epoch=epoch, step=step, loss=step_loss, grad_norm=float(grad_norm),
                       **{key: v / max(1, n_tok) for key, v in step_stats.items()})
            write(rec)
            for key in ("loss", *step_stats):
                sums[key] = sums.get(key, 0.0) + rec[key]
            sums["_steps"] = sums.get("_steps", 0) + 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if every and step % every == 0 and k + 1 < len(mini):
                checkpoint(epoch - 1, k + 1)
        bar.close()
        skip = 0
        train_means = {f"train_{key}": v / sums["_steps"] for key, v in sums.items() if key != "_steps"}
        sums = {}
        measured = epoch_end(epoch, state)
        rec = dict(kind="epoch", stage=stage, epoch=epoch, **train_means, **measured, epoch_seconds=time.time() - t0)
        write(rec)
        history.append(rec)
        checkpoint(epoch, 0)
        if measured.get("stop"):  # e.g. a target KL reached: the remaining epochs are not run
            break
    return history
