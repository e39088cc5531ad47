"""Data parallelism for the trainer, written against ``torch.distributed`` only.

Under ``torchrun`` (``WORLD_SIZE > 1``) every rank holds the whole policy and the whole fixed
data; each optimizer step's mini-batch is split across ranks (rank r takes rows r, r + W, ...).
Every loss is already normalized by the *mini-batch's* token or sequence count (see
``engine.aggregate``), so summing the ranks' gradients (one all-reduce per step) gives exactly the
single-process gradient, and every rank then takes the same AdamW step: the replicas stay equal
without a DDP wrapper (which would only synchronize through ``model.forward``, and the trainer
calls the backbone and the fused ops directly). Measurement passes run on every rank (they are
deterministic); sampling, held-out evaluation, logs and checkpoints happen on rank 0 and their
results are broadcast.

FSDP2 sharding is not implemented: the replicated scheme fits models that fit on one device.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Initialize the process group when launched by ``torchrun``; returns whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return enabled()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def shard(idx: torch.Tensor) -> torch.Tensor:
    return idx[rank():: world()] if enabled() else idx


def all_reduce_grads(params) -> None:
    """Sum each parameter's gradient over the ranks (a zero gradient for a rank with no rows)."""
    if not enabled():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def sum_floats(values: dict) -> dict:
    if not enabled() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.cpu().tolist()))


def broadcast_params(params) -> None:
    """Make every rank start from rank 0's weights."""
    if not enabled():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def broadcast_object(obj):
    if not enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if enabled():
        dist.barrier()


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only and give every rank its result."""
    return broadcast_object(fn(*args, **kwargs) if is_main() else None)
