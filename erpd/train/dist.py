"""Data parallelism for the trainer, written against ``torch.distributed`` only.

Under ``torchrun`` (``WORLD_SIZE > 1``) every rank holds the whole fixed data; each optimizer
step's mini-batch is split across ranks (rank r takes rows r, r + W, ...). Every loss is already
normalized by the *mini-batch's* token or sequence count (see ``loop.aggregate``), so summing
the ranks' gradients gives exactly the single-process gradient, and every rank then takes the
same AdamW step. Per-step metrics are the ranks' shares of those global sums, summed over ranks,
so rank 0 logs the global numbers.

Two ways to hold the model:

* replicated (default): a full replica per rank, one all-reduce of the gradients per step
  (no DDP wrapper: it would only synchronize through ``model.forward``, and the trainer calls the
  backbone and the fused ops directly);
* ``model.fsdp`` (``erpd --fsdp``): FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every
  decoder layer over the ranks: all-gathered for each forward/backward, gradients
  reduce-scattered (summed, not averaged). The embeddings, final norm and LM head stay
  replicated (the fused ops need the whole head; vocabulary sharding is the ``tp_group`` route)
  and their gradients are all-reduced as above. Sharded layers make every forward a collective,
  so the ranks then run in *lockstep*: the same number of micro-batches per step (a rank short
  of rows runs a zero-weight one), and sampling/evaluation run on every rank (HF ``generate``
  with ``synced_gpus``), rank 0's result being the one used.

Measurement passes run on every rank (they are deterministic); sampling, held-out evaluation,
logs and checkpoints happen on rank 0 (or on every rank in lockstep) and their results are
broadcast. Checkpoints hold full tensors, so a run resumes on any number of processes.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import sys
import weakref

import torch
import torch.distributed as dist

_LOCKSTEP = False  # set by shard_model: the model holds FSDP-sharded parameters


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


GLOO = "erpd_gloo"  # gloo with one worker thread: see cpu_backend


def cpu_backend() -> str:
    """The name of the backend to give ``init_process_group`` for CPU processes: gloo, with one
    worker thread instead of torch's two.

    torch's gloo process group (2.13) records the name of each finished collective in a status
    string it shares between its worker threads, written by each worker outside its lock. Names
    longer than the 15 characters a string holds inline live on the heap (``ALLGATHER_COALESCED``:
    every FSDP2 all-gather and ``DTensor.full_tensor``), so two such collectives finishing at the
    same moment on the two workers free the same buffer twice. The heap is then corrupt and a later
    allocation crashes the rank (SIGSEGV or "malloc(): unaligned tcache chunk detected"; rare on its
    own, every run once the two workers are made to finish together). With one worker there is
    nothing to race with, and it costs nothing here: the trainer waits for each collective before
    it issues the next. ``init_process_group`` ignores gloo options, hence a registered backend.
    Honors ``GLOO_SOCKET_IFNAME`` like stock gloo. See docs/trainer.md, *Several processes*.
    """
    if GLOO not in dist.Backend.backend_list:
        dist.Backend.register_backend(GLOO, _gloo_one_worker, devices=["cpu"])
    return GLOO


def _gloo_one_worker(store, rank: int, size: int, timeout):
    pgg = dist.ProcessGroupGloo
    opts = pgg._Options()
    opts._threads = 1
    opts._timeout = timeout
    ifnames = [n for n in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if n]
    opts._devices = [pgg.create_device(interface=n) for n in ifnames] or [pgg.create_default_device()]
    return pgg(store, rank, size, opts)


def init_from_env(timeout_minutes: float = 120.0) -> bool:
    """Initialize the process group when launched by ``torchrun``; returns whether it did.

    ``timeout_minutes`` bounds every collective's wait (``model.dist_timeout_minutes``): the other
    ranks wait in one while rank 0 samples the fixed data or evaluates.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return enabled()
    backend = "nccl" if torch.cuda.is_available() else cpu_backend()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def shutdown() -> None:
    """Destroy the default process group, so that its backend's threads end before the interpreter.

    A gloo group still alive at interpreter shutdown can abort the process ("terminate called
    without an active exception"): a gloo worker thread that drops the last C++ reference to a
    Python-owned tensor (the tail of a finished collective) must take the GIL, the finalizing
    interpreter makes it exit instead, and the forced unwind through C++ calls std::terminate.

    ``destroy_process_group`` frees nothing while something else holds the group. torch's DTensor
    caches do after an FSDP2 run (emptied here, see :func:`_clear_mesh_caches`). So does
    ``torch.distributed.nn.functional``, which binds ``group.WORLD`` as default arguments when
    first imported: ``torch._dynamo`` (so ``import erpd``) imports it, and a process that creates
    its group *before* importing them pins the group for life; create it after ``import erpd``.
    Warns if the group is still held.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    _clear_mesh_caches()
    gc.collect()  # free unreachable cycles that still hold the group before judging
    if group() is not None:
        import warnings

        warnings.warn("the default process group is still referenced after destroy_process_group(), so its "
                      "threads outlive it into interpreter shutdown (see erpd.train.dist.shutdown); was "
                      "torch._dynamo (or torch.distributed.nn.functional) first imported after init_process_group?",
                      RuntimeWarning, stacklevel=2)


def _clear_mesh_caches() -> None:
    """Empty torch.distributed's caches, which hold device meshes and so their process groups.

    DTensor (FSDP2's parameters) caches sharding propagation, redistribution planners and mesh
    topology per device mesh, and a mesh holds its groups: after an FSDP2 run these caches alone
    keep the destroyed default group alive. Their entries are stale once the groups are gone.
    """
    import functools

    redistribute = sys.modules.get("torch.distributed.tensor._redistribute")
    if hasattr(redistribute, "clear_redistribute_planner_cache"):
        redistribute.clear_redistribute_planner_cache()  # a dict, not an lru_cache
    if hasattr(torch._C, "_clear_DTensor_sharding_propagator_cache"):
        torch._C._clear_DTensor_sharding_propagator_cache()  # the C++ dispatch fast path's cache
    for obj in gc.get_objects():
        if type(obj) is functools._lru_cache_wrapper and getattr(obj, "__module__", "").startswith("torch.distributed"):
            obj.cache_clear()


def shard(idx: torch.Tensor) -> torch.Tensor:
    return idx[rank():: world()] if enabled() else idx


def lockstep() -> bool:
    """Whether every forward pass is a collective (FSDP-sharded layers): all ranks must run it."""
    return _LOCKSTEP and enabled()


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def micro_batch_count(mini_batch: int, micro_batch_size: int) -> int:
    """Micro-batches every rank runs per step in lockstep: those of the largest shard."""
    return math.ceil(math.ceil(mini_batch / world()) / micro_batch_size)


def micro_batch_plan(mini_batch: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor | None]:
    """This rank's micro-batches of an optimizer step's rows (rank r takes rows r, r + W, ...).

    ``None`` is a zero-weight micro-batch that keeps the ranks' collectives matched: in lockstep
    (FSDP: every forward is a collective) a rank short of rows runs as many as the others; otherwise
    a rank left without rows (a last mini-batch smaller than the world, or batch_size < world) runs
    one, so that it reduces the same stats as the others.
    """
    local = shard(mini_batch)
    chunks: list[torch.Tensor | None] = [local[s : s + micro_batch_size] for s in range(0, len(local), micro_batch_size)]
    if lockstep():
        chunks += [None] * (micro_batch_count(len(mini_batch), micro_batch_size) - len(chunks))
    elif not chunks:
        chunks = [None]
    return chunks


def shard_model(policy) -> None:
    """FSDP2: shard each decoder layer over all ranks (gradients summed; see the module doc)."""
    global _LOCKSTEP
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # torch < 2.6
        raise RuntimeError("model.fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6)") from e
    if not enabled():
        return  # one process: nothing to shard over
    if not policy._layers_attr():
        raise ValueError("model.fsdp needs a decoder whose blocks are in a `.layers` ModuleList")
    mesh = init_device_mesh(policy.device.type, (world(),))
    layers = policy.backbone.layers
    in_layers = {id(p) for p in layers.parameters()}
    for module in (*layers, policy.backbone):
        if module is policy.backbone:
            # The backbone is the FSDP root (the trainer calls it, not the LM wrapper); without a
            # root each layer would be its own and keep its parameters unsharded after a no-grad
            # forward. Its own parameters (embeddings, final norm; the tied head) stay replicated.
            ignored = {p for p in module.parameters() if id(p) not in in_layers}
            fully_shard(module, mesh=mesh, ignored_params=ignored)
        else:
            fully_shard(module, mesh=mesh)
        # Losses are normalized by the global counts: the ranks' gradients are summed, with plain
        # SUM collectives (gloo has no PREMUL_SUM; NCCL's zero-copy path wants SUM too).
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    _LOCKSTEP = True


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter or state; a collective if sharded."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like`` (a DTensor: this rank's shard, cut locally, no communication)."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with sharded states gathered (a collective under FSDP)."""
    sd = opt.state_dict()
    if lockstep():
        sd["state"] = {i: {k: full_tensor(v).cpu() if is_sharded(v) else v for k, v in st.items()}
                       for i, st in sd["state"].items()}
    return sd


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Load full-tensor optimizer state; states of sharded parameters are re-sharded locally."""
    opt.load_state_dict(sd)
    for group in opt.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and not is_sharded(v) and v.shape == p.shape:
                    opt.state[p][k] = shard_like(v, p)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Global gradient-norm clipping; sharded gradients' squares are summed over the ranks."""
    if not lockstep():
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() for g in grads if is_sharded(g)]
    dev = grads[0].to_local().device if is_sharded(grads[0]) else grads[0].device
    sharded_sq = torch.stack([g.float().pow(2).sum() for g in local]).sum() if local else torch.zeros((), device=dev)
    dist.all_reduce(sharded_sq, op=dist.ReduceOp.SUM)
    rep = [g for g in grads if not is_sharded(g)]
    rep_sq = torch.stack([g.float().pow(2).sum() for g in rep]).sum().to(dev) if rep else torch.zeros((), device=dev)
    total = (sharded_sq + rep_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if is_sharded(g) else g).mul_(coef.to((g.to_local() if is_sharded(g) else g).device))
    return total


BUCKET_BYTES = 64 << 20


def all_reduce_grads(params, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum each replicated parameter's gradient over the ranks (a zero gradient where a rank has
    none); FSDP-sharded parameters were already reduce-scattered in backward.

    Gradients are flattened into buckets of up to ``bucket_bytes`` (one dtype and device each), so a
    step issues a few large all-reduces instead of one per parameter (~270 for SmolLM2-135M).
    """
    if not enabled():
        return
    grads = []
    for p in params:
        if is_sharded(p):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in _buckets(grads, bucket_bytes):
        if len(bucket) == 1:
            dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM)
            continue
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))


def _buckets(tensors, limit: int):
    """Consecutive runs of ``tensors`` of one dtype and device, each at most ``limit`` bytes
    (a larger tensor alone)."""
    bucket, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > limit or (t.dtype, t.device) != (bucket[0].dtype, bucket[0].device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def sum_floats(values: dict) -> dict:
    """Each value summed over the ranks; every rank must pass the same keys (one all-reduce of
    their values in key order: a rank with other keys would pair up mismatched numbers or hang)."""
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
            if not is_sharded(p):  # FSDP shards came from identical replicas
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


_IN_ON_MAIN = False


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only (every rank in lockstep) and give every rank rank 0's result.

    Re-entrant: inside ``fn`` a nested ``on_main`` just calls its function (it already runs
    where it should, and the other ranks are waiting for the outer broadcast, not this one).
    """
    global _IN_ON_MAIN
    if _IN_ON_MAIN:
        return fn(*args, **kwargs)
    result = None
    if is_main() or lockstep():
        _IN_ON_MAIN = True
        try:
            result = fn(*args, **kwargs)
        finally:
            _IN_ON_MAIN = False
    return broadcast_object(result)
