"""Micro-batches of the fixed data and the fused log-prob path: what every trainer pass (training
steps, measurement passes, the π0 pass) runs on.

A :class:`Batch` holds the model inputs of ``b`` responses (right-padded, or packed several to a
row), the column of the hidden state that predicts each response token, and the targets.
``response_hidden`` runs the backbone and gathers those hidden states ``[b, R, H]``; the LM head
is then applied by the fused ops (``erpd.linear_logprobs`` / ``linear_policy_loss`` /
``linear_kl``), never as a ``[tokens, vocab]`` logits tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

import erpd
from erpd.train.data import FixedData
from erpd.train.models import Policy

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
