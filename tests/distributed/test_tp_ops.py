"""Vocabulary-parallel ops over gloo: 2 and 3 CPU processes, each holding an uneven shard of the
LM head, give the unsharded op's values and gradients (hidden: all-reduced; weight and bias: the
shard's rows of the full gradient).

Each worker computes the unsharded op on the full head itself (same seed on every rank), so every
comparison runs inside the workers; a failed assertion in any rank fails the spawn.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import erpd
from erpd.ops import _tp
from erpd.testing.dist import gloo_rank

N, H, H_T, V = 12, 16, 8, 101
SHARDS = {2: [40, 61], 3: [50, 17, 34]}  # uneven on purpose; 17 < the 3-rank mean
IGNORE = -100
TOL = dict(rtol=1e-4, atol=2e-5)
F64_TOL = dict(rtol=1e-9, atol=1e-10)  # the torch backend in float64


def _inputs(seed, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.6  # logits of std ~2.4: peaked, far from uniform
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[0, 1, 2]] = torch.tensor([0, V - 1, 40])  # shard edges
    targets[[5, 9]] = IGNORE
    return hidden, weight, b, targets


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


def _shard(x, rank, world):
    if x is None:
        return None
    sizes = SHARDS[world]
    v0 = sum(sizes[:rank])
    return x[v0 : v0 + sizes[rank]]


def _grads(out, upstream, leaves):
    sum(((o.double() if o.dim() else o.double()) * u).sum() for o, u in zip(out, upstream)).backward()
    return [None if x is None else x.grad for x in leaves]


def _compare(label, full_vals, tp_vals, full_grads, tp_grads, rank, world):
    tol = F64_TOL if full_vals[0].dtype == torch.float64 else TOL
    for i, (a, b) in enumerate(zip(full_vals, tp_vals)):
        torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{label}: value {i}, rank {rank}/{world}: {m}")
    names = ("hidden", "weight", "bias")
    for name, a, b in zip(names, full_grads, tp_grads):
        if a is None:
            assert b is None, f"{label}: unexpected grad of {name}"
            continue
        if name != "hidden":
            a = _shard(a, rank, world)
        # Normwise: the shard kernels' fp32 GEMMs err by ~eps * |largest gradient entry| anywhere
        # (the anchor correction subtracts g_lp·t·h from a row of near-zero gradient).
        scale = float(a.abs().max())
        torch.testing.assert_close(
            b, a, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale),
            msg=lambda m: f"{label}: grad {name}, rank {rank}/{world} (max|grad| {scale:.3g}): {m}",
        )


class _Collectives:
    """Records the element count of every all-reduce `erpd.ops._tp` issues (the communication the
    README lists is checked here: O(N) in the forward, one [N, H] in the backward)."""

    def __init__(self):
        self.sizes = []

    def __enter__(self):
        self._orig = _tp._all_reduce

        def record(t, op, group):
            self.sizes.append(t.numel() * t.element_size())
            return self._orig(t, op, group)

        _tp._all_reduce = record
        return self

    def __exit__(self, *exc):
        _tp._all_reduce = self._orig


def _run_pair(label, op, rank, world, seed, bias, n_out, explicit_start, dtype=torch.float32):
    """op(hidden, weight, bias, **tp) -> tuple of outputs; compares sharded with unsharded."""
    hidden, weight, b, _ = _inputs(seed, bias, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    upstream = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(n_out)]

    leaves = [_leaf(hidden), _leaf(weight), _leaf(b)]
    full = op(*leaves)
    full_grads = _grads(full, upstream, leaves)

    sizes = SHARDS[world]
    tp = dict(tp_group=dist.group.WORLD, vocab_start=sum(sizes[:rank]) if explicit_start else None)
    leaves = [_leaf(hidden), _leaf(_shard(weight, rank, world)), _leaf(_shard(b, rank, world))]
    with _Collectives() as fwd:
        out = op(*leaves, **tp)
    with _Collectives() as bwd:
        tp_grads = _grads(out, upstream, leaves)
    # Bytes: forward all-reduces are fp32 [k, N] with k <= 5 (24 B/token for log-probs, 20 or 24
    # for the KL); the backward all-reduces dhidden once.
    budget = 24 if label.startswith("linear_logprobs") else (24 if " jsd " in label else 20)
    width = 2 if dtype == torch.float64 else 1  # float64 inputs reduce float64 statistics
    assert sum(fwd.sizes) == budget * N * width, (label, fwd.sizes)
    assert bwd.sizes == [N * H * hidden.element_size()], (label, bwd.sizes)
    _compare(label, [o.detach() for o in full], [o.detach() for o in out], full_grads, tp_grads, rank, world)


def _triton_too(world):
    # The Triton interpreter is slow on CPU: one case per op, on 2 ranks only.
    return world == 2 and "triton" in erpd.available("cpu") and "triton" in erpd.available("cpu", op="linear_kl")


def _check_logprobs(rank, world):
    _, _, _, targets = _inputs(0)
    cases = [(True, 1.0, True, "cpu"), (False, 0.7, True, "cpu"), (True, 1.3, False, "cpu"), (True, 0.7, True, "torch")]
    if _triton_too(world):
        cases.append((True, 0.7, True, "triton"))
    for i, (bias, temperature, with_entropy, backend) in enumerate(cases):
        def op(h, w, b, **tp):
            lp, ent = erpd.linear_logprobs(h, w, targets, bias=b, temperature=temperature, ignore_index=IGNORE,
                                           with_entropy=with_entropy, backend=backend, **tp)
            return (lp, ent) if with_entropy else (lp,)

        _run_pair(f"linear_logprobs {backend} bias={bias} T={temperature} ent={with_entropy}", op, rank, world, 10 + i, bias,
                  2 if with_entropy else 1, explicit_start=(i % 2 == 0),
                  dtype=torch.float64 if backend == "torch" else torch.float32)


def _check_kl(rank, world):
    _, _, _, targets = _inputs(0)
    g = torch.Generator().manual_seed(123)
    t_hidden = torch.randn(N, H_T, generator=g)
    t_weight = torch.randn(V, H_T, generator=g) * 0.8
    t_bias = torch.randn(V, generator=g)
    t_logits = torch.randn(N, V, generator=g) * 2.0
    cases = [("forward", "fused", 1.0, True, "cpu"), ("reverse", "fused", 0.8, False, "cpu"),
             ("jsd", "fused", 1.0, True, "cpu"), ("forward", "dense", 1.0, True, "cpu"),
             ("reverse", "dense", 1.0, True, "cpu"), ("jsd", "dense", 0.8, False, "cpu"),
             ("forward", "fused", 0.8, True, "torch"), ("reverse", "dense", 1.0, False, "torch"),
             ("jsd", "fused", 1.0, True, "torch")]
    if _triton_too(world):
        cases.append(("jsd", "fused", 0.8, True, "triton"))
    for i, (direction, form, temperature, masked, backend) in enumerate(cases):
        dtype = torch.float64 if backend == "torch" else torch.float32

        def op(h, w, b, tp_group=None, vocab_start=None):
            sharded = tp_group is not None
            cut = (lambda x: _shard(x, rank, world)) if sharded else (lambda x: x)
            teacher = (dict(teacher_hidden=t_hidden.to(dtype), teacher_weight=cut(t_weight).to(dtype),
                            teacher_bias=cut(t_bias).to(dtype))
                       if form == "fused" else dict(teacher_logits=cut(t_logits.T).T))
            return (erpd.linear_kl(h, w, targets if masked else None, bias=b, direction=direction, beta=0.3,
                                   temperature=temperature, ignore_index=IGNORE, backend=backend,
                                   tp_group=tp_group, vocab_start=vocab_start, **teacher),)

        _run_pair(f"linear_kl {backend} {direction} {form} T={temperature} masked={masked}", op, rank, world, 20 + i, True, 1,
                  explicit_start=(i % 2 == 1), dtype=dtype)

    # Reduced to its mean: grads-in-forward unsharded, the per-token op reduced through autograd
    # with tp_group. (Broadcast to [N] for the comparison's per-row upstream gradient.)
    weights = torch.rand(N, generator=g)

    def reduced(h, w, b, tp_group=None, vocab_start=None):
        cut = (lambda x: _shard(x, rank, world)) if tp_group is not None else (lambda x: x)
        loss = erpd.linear_kl(h, w, targets, bias=b, teacher_hidden=t_hidden, teacher_weight=cut(t_weight),
                              teacher_bias=cut(t_bias), ignore_index=IGNORE, backend="cpu", reduction="mean",
                              num_items=N + 3, token_weights=weights, tp_group=tp_group, vocab_start=vocab_start)
        return (loss.expand(N),)

    _run_pair("linear_kl cpu forward fused reduced", reduced, rank, world, 40, True, 1, explicit_start=True)


def _check_policy(rank, world):
    B, T = 3, N // 3
    _, _, _, targets = _inputs(0)
    targets = targets.view(B, T)
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[0] = True
    adv = torch.randn(B, generator=g)
    ref = -torch.rand(B, T, generator=g) * 3
    cases = [
        dict(method="ppo", agg="token-mean", entropy_coef=0.01, kl_coef=0.1, ref_logprobs=ref, old=True),
        dict(method="gspo", agg="seq-mean-token-mean", old=True),
        dict(method="cispo", agg="seq-mean-token-sum", entropy_coef=0.05, old=False),
        dict(method="sapo", agg="seq-mean-token-sum-norm", old=True),
        dict(method="reinforce", agg="token-mean", reinforce_cap=2.0, old=False),
        dict(method="gspo", agg="seq-mean-token-sum", entropy_coef=0.02, old=True, backend="torch"),
    ]
    for i, case in enumerate(cases):
        case = dict(case)
        use_old = case.pop("old")
        backend = case.pop("backend", "cpu")
        dtype = torch.float64 if backend == "torch" else torch.float32

        def op(h, w, b, **tp):
            hidden = h.view(B, T, H)
            # A fixed, nearby old policy: ratios spread around 1, some clipped.
            old = (torch.randn(B, T, generator=torch.Generator().manual_seed(9), dtype=dtype) * 0.3 - 4.0) if use_old else None
            loss, metrics = erpd.linear_policy_loss(hidden, w, targets, old, adv.to(dtype), mask, bias=b, temperature=0.9,
                                                    ignore_index=IGNORE, backend=backend, **case, **tp)
            return (loss, *[metrics[k] for k in sorted(metrics)])

        hidden, weight, b, _ = _inputs(30 + i, dtype=dtype)
        leaves = [_leaf(hidden), _leaf(weight), _leaf(b)]
        full = op(*leaves)
        full[0].backward()
        full_grads = [x.grad for x in leaves]
        leaves = [_leaf(hidden), _leaf(_shard(weight, rank, world)), _leaf(_shard(b, rank, world))]
        with _Collectives() as fwd:
            out = op(*leaves, tp_group=dist.group.WORLD)
        with _Collectives() as bwd:
            out[0].backward()
        # Only the log-probs communicate: 24 B/token forward (fp32 statistics, fp64 for float64
        # inputs), one dhidden all-reduce backward; the policy loss runs on every rank alone.
        assert sum(fwd.sizes) == 24 * N * (2 if dtype == torch.float64 else 1), fwd.sizes
        assert bwd.sizes == [N * H * hidden.element_size()], bwd.sizes
        _compare(f"linear_policy_loss {case['method']} {case['agg']}", [o.detach() for o in full],
                 [o.detach() for o in out], full_grads, [x.grad for x in leaves], rank, world)


def _check_errors(rank, world):
    hidden, weight, _, targets = _inputs(0, bias=False)
    w = _shard(weight, rank, world)
    bad = targets.clone()
    bad[3] = V + 5  # beyond every shard: every rank sees found == 0 and raises
    with pytest.raises(ValueError, match="union of the ranks' vocabulary shards"):
        erpd.linear_logprobs(hidden, w, bad, backend="cpu", tp_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="check vocab_start"):  # every rank claims to start at 0
        erpd.linear_logprobs(hidden, w, targets, backend="cpu", tp_group=dist.group.WORLD, vocab_start=0)
    B, T = 3, N // 3
    soft = torch.full((B, T), 0.5)  # not a 0/1 mask: refused as the unsharded op refuses it
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        erpd.linear_policy_loss(hidden.view(B, T, H), w, targets.view(B, T), None, torch.randn(B), soft, backend="cpu",
                                tp_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="teacher_topk"):
        ids = torch.arange(4).expand(N, 4)
        erpd.linear_kl(hidden, w, teacher_topk=(torch.full((N, 4), -2.0), ids), backend="cpu",
                       tp_group=dist.group.WORLD)


def _check_double_backward(rank, world):
    """The vocab-parallel backwards are shard kernels on every backend, torch included: a gradient
    taken with create_graph=True is refused on every rank (each raises before any collective)."""
    hidden, weight, b, targets = _inputs(0)
    for backend in ("cpu", "torch"):
        h, w, bias = _leaf(hidden), _leaf(_shard(weight, rank, world)), _leaf(_shard(b, rank, world))
        t_w = _shard(weight, rank, world).flip(0)
        for op, out in (
            ("linear_logprobs", erpd.linear_logprobs(h, w, targets, bias=bias, with_entropy=True, backend=backend,
                                                     tp_group=dist.group.WORLD)[1]),
            ("linear_kl", erpd.linear_kl(h, w, targets, bias=bias, teacher_hidden=hidden, teacher_weight=t_w,
                                         backend=backend, tp_group=dist.group.WORLD)),
        ):
            with pytest.raises(RuntimeError, match=rf"erpd\.{op}: double backward"):
                torch.autograd.grad(out.sum(), (h, w), create_graph=True)


def _worker(rank, world, init_file):
    torch.set_num_threads(1)
    with gloo_rank(init_file, rank, world):
        _check_logprobs(rank, world)
        _check_kl(rank, world)
        _check_policy(rank, world)
        _check_errors(rank, world)
        _check_double_backward(rank, world)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif("cpu" not in erpd.available("cpu"), reason="needs the compiled cpu backend")
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])  # 3 ranks: the slow tier
def test_vocab_parallel_ops_match_unsharded(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "init")), nprocs=world, join=True)
