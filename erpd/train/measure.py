"""Teacher-forced measurements on the fixed data: the π0 quantities cached once per run, and each
policy's log-probs, entropy and full-vocabulary KL(π‖π0) per token, summarized per epoch as drift
metrics (KL, entropy, out-of-band fraction, within-prompt AUC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

import erpd
from erpd.train.batches import Batch, collate, gather_positions, logprobs, micro_batches, response_hidden
from erpd.train.data import FixedData
from erpd.train.models import Policy
from erpd.train.progress import progress

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
        m = batch.mask  # the response tokens only: padding rows would cost vocabulary GEMMs for nothing
        lp, _ = logprobs(policy, hr[m], batch.targets[m], temperature)
        lp_all[idx, : m.shape[1]] = scatter(lp, m)
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
            m = batch.mask  # the response tokens only (see build_cache)
            h, targets = hr[m], batch.targets[m]
            lp, ent = logprobs(policy, h, targets, temperature, with_entropy=True)
            kl = erpd.linear_kl(h, policy.head_weight(), targets, bias=policy.head_bias(),
                                teacher_hidden=cache.ref_batch(batch)[m], teacher_weight=cache.ref_weight,
                                teacher_bias=cache.ref_bias, direction="reverse", temperature=temperature,
                                backend=policy.backend)
            r = m.shape[1]
            lp_all[idx, :r], ent_all[idx, :r], kl_all[idx, :r] = scatter(lp, m), scatter(ent, m), scatter(kl, m)
            if hidden is not None:
                for j, i in enumerate(idx.tolist()):
                    hidden[i] = hr[j, : int(data.response_len[i])].to("cpu", copy=True)
    finally:
        policy.model.train(was_training)
    return dict(logprobs=lp_all, entropy=ent_all, kl=kl_all, hidden=hidden)


def scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[n]`` values of the ``mask``'s True positions back into a zero ``[b, R]`` float32 (host)."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out[mask.cpu()] = values.float().cpu()
    return out


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
