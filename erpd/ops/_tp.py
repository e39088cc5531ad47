"""What the vocabulary-parallel (tensor-parallel) forms of the ops share.

Each rank of ``tp_group`` holds one contiguous shard ``weight[v0 : v0 + V_r, H]`` of the LM head
(``bias[v0 : v0 + V_r]`` with it; shards may be uneven) and the *same* hidden states and targets.
Each rank runs its backend's single-device kernels on its shard (the `torch` backend's too: they
follow the same contract), which gives per-row statistics normalized over the shard only; the
op's ``tp.py`` combines them into the full-vocabulary values with all-reduces of O(N) float32
tensors (float64 for float64 inputs). No rank ever holds more than a chunk of its own shard's
logits. The backward of each op is its kernel's own backward on the shard, fed the *global*
statistics: its gradient w.r.t. the shard's logits is then the full gradient restricted to the
shard, so dweight and dbias stay local and dhidden is a SUM all-reduce of the ranks' partial
products.

Shard offsets: ``vocab_start`` (this rank's v0) if the caller passes it, else one all-gather of
the shard sizes per call (an int64 per rank, read on the host: with NCCL that is a sync, so pass
``vocab_start`` in a training loop). Every rank must call the op with the same N, arguments and
``requires_grad`` pattern, as with any collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from erpd import backends


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


def all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    """In place; every collective of the vocabulary-parallel ops goes through here (the tests count them)."""
    return _all_reduce(t, op, group)


def shard_start(weight: torch.Tensor, group, vocab_start: int | None) -> int:
    """This rank's first vocabulary id: ``vocab_start``, or the sum of the lower ranks' shard sizes."""
    if vocab_start is not None:
        return vocab_start
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return int(sum(int(s.item()) for s in sizes[:rank]))


def resolve(backend: str, hidden: torch.Tensor, op: str) -> str:
    name = backends.resolve(backend, hidden.device, op)
    if hidden.dtype == torch.float64 and name != "torch":
        raise TypeError(f"backend={name!r} supports fp32/bf16/fp16 inputs; float64 runs only on backend='torch'")
    return name
