import math

import pytest
import torch
import torch.nn.functional as F

import erpd
from conftest import make_policy, synthetic_data, tiny_cfg, with_old_logprobs

from erpd.train import batches, losses, measure, stage1, stage2
from erpd.train.config import OBJECTIVES, SIGNALS
from erpd.train.models import load_policy_state, save_policy_state


def _loss(step, data, cache, policy, state=None):
    idx = torch.arange(len(data))
    batch = batches.collate(data, idx, policy.device, cache.prefix)
    return step(batch, int(data.mask.sum()), len(data), state if state is not None else {})


def _moves(step, data, cache, policy, state=None, lr=2e-3, steps=2):
    params = [p for _, p in policy.trainable_named()]
    opt = torch.optim.Adam(params, lr=lr)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        out = _loss(step, data, cache, policy, state)
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        assert sum(p.grad.abs().sum() for p in params) > 0
        opt.step()
        first = out.loss.item() if first is None else first
    last = _loss(step, data, cache, policy, state).loss.item()
    return first, last


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_stage1_objective_decreases_its_loss(tiny, objective, kl_coef):
    policy, data, cache = tiny
    cfg = tiny_cfg()
    cfg.stage1.objective, cfg.stage1.kl_coef = objective, kl_coef
    pg_before = _pg_objective(policy, data, cache)
    first, last = _moves(stage1.make_step(policy, data, cfg), data, cache, policy)
    if objective == "cispo":
        # CISPO's value is not a quantity that descends (its detached weight min(r, c) moves with
        # the policy); its gradient is a policy gradient, so check the objective it ascends.
        assert abs(last - first) > 1e-4
        assert _pg_objective(policy, data, cache) > pg_before
    else:
        assert last < first - 1e-4, (first, last)


def _pg_objective(policy, data, cache):
    """Σ Â log π over the response tokens: what every stage-1 objective pushes up."""
    with torch.no_grad():
        lp = measure.policy_outputs(policy, data, cache, 1.0, 8)["logprobs"]
    return (data.advantages[:, None] * lp * data.mask).sum().item()


def test_signal_post_processing():
    a = torch.tensor([[1.0, 3.0, -2.0], [2.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = torch.tensor([1.0, 0.0])
    assert torch.equal(losses.process_signal(a, mask, rewards, scale=2.0), a * 2 * mask)
    assert torch.equal(losses.process_signal(a, mask, rewards, clip=1.5), a.clamp(-1.5, 1.5) * mask)
    centered = losses.process_signal(a, mask, rewards, center="response")
    assert torch.allclose((centered * mask).sum(1), torch.zeros(2), atol=1e-6) and centered[1, 2] == 0
    assert torch.equal(losses.process_signal(a, mask, rewards, gating="drop")[1], torch.zeros(3))
    assert torch.equal(losses.process_signal(a, mask, rewards, gating="negate")[1], -a[1] * mask[1])
    assert torch.equal(losses.process_signal(a, mask, rewards, gating="negate")[0], a[0])


@pytest.fixture
def teacher_dir(tmp_path):
    """A teacher: the tiny π0 with its trainable weights perturbed, saved like stage 1 saves."""
    t = make_policy()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in t.trainable_named():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    return save_policy_state(t, tmp_path / "teacher")


@pytest.mark.parametrize("signal", SIGNALS)
def test_stage2_strategy_decreases_its_loss(tiny, teacher_dir, signal):
    policy, data, cache = tiny
    cfg = tiny_cfg()
    cfg.stage2.signal = signal
    if signal == "response":
        cfg.stage2.center = "group"
    dirs = [teacher_dir, teacher_dir] if signal == "combined" else [teacher_dir]
    if signal == "combined":
        cfg.stage2.teacher_weights = [0.7, 0.3]
    teachers = stage2.teacher_outputs(policy, data, cache, dirs, 1.0, 4,
                                      with_hidden=signal in stage2.KL_SIGNALS + ("advantage",))
    # The teacher pass leaves the policy at π0.
    _, lp = measure.build_cache(policy, data, 1.0, 5)
    assert torch.allclose(lp, data.old_logprobs, atol=1e-6)
    step = stage2.make_step(policy, data, cache, cfg, teachers, stage2.fixed_signal(cfg, data, teachers, cache, 1.0))
    first, last = _moves(step, data, cache, policy, state={"anchor": data.old_logprobs.clone()})
    assert last < first - 1e-4, (first, last)


@pytest.mark.parametrize("options", [dict(kl_coef=0.5), dict(reanchor=True), dict(center=True, gating="negate", signal_clip=0.5)])
def test_stage2_options_run(tiny, teacher_dir, options):
    policy, data, cache = tiny
    cfg = tiny_cfg()
    for k, v in options.items():
        setattr(cfg.stage2, k, v)
    teachers = stage2.teacher_outputs(policy, data, cache, [teacher_dir], 1.0, 4, with_hidden=False)
    step = stage2.make_step(policy, data, cache, cfg, teachers, stage2.fixed_signal(cfg, data, teachers))
    first, last = _moves(step, data, cache, policy, state={"anchor": data.old_logprobs.clone()})
    assert last < first


def test_kl_trust_mask():
    anchor = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    pull = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    # Tokens already past 1 ± ε in the direction of the pull are dropped; the others keep moving.
    assert losses.kl_trust_mask(lp, anchor, pull, 0.2).tolist() == [[0, 1, 0, 1]]


# -- a trainer step equals the same loss on materialized logits -------------------------------
#
# The reference below is written from the formulas (docs/trainer.md), on the model's own logits
# (model(...).logits, no prefix cache, no fused op), in float64: the trainer's step, through the
# fused ops on backend="torch" in float64, must give the same loss and every gradient.


def _f64_setup(train_layers, temperature=0.7, seed=1):
    policy = make_policy(train_layers=train_layers)
    policy.model.to(torch.float64)
    policy.dtype = torch.float64
    policy.backend = "torch"
    data = synthetic_data(policy, seed=seed)
    cache, lp0 = measure.build_cache(policy, data, temperature, 5)
    data.old_logprobs = lp0.double()
    with torch.no_grad():  # move away from π0 so that ratios, clips and KLs are not trivial
        g = torch.Generator().manual_seed(seed)
        for _, p in policy.trainable_named():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy, data, cache


def _logits(policy, data, temperature):
    """[N, R, V] logits at the response-predicting positions, from the model's own forward."""
    batch = batches.collate(data, torch.arange(len(data)), policy.device)
    logits = policy.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return batches.gather_positions(logits, batch.positions) / temperature, batch


def _reference_stage1(policy, data, cfg, temperature):
    s1 = cfg.stage1
    z, batch = _logits(policy, data, temperature)
    logp = F.log_softmax(z, -1)
    m = batch.mask.double()
    lp = logp.gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0] * m
    old = data.old_logprobs[:, : lp.shape[1]] * m
    adv = data.advantages.double()[:, None]
    r = torch.exp(lp - old)
    n_tok, n_seq = m.sum(), len(data)
    if s1.objective == "ppo":
        hi = math.inf if s1.clip_high is None else s1.clip_high
        tok = -torch.minimum(r * adv, r.clamp(1 - s1.clip_low, 1 + hi) * adv)
    elif s1.objective == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, s1.tau_pos), torch.full_like(adv, s1.tau_neg))
        tok = -(4 / tau) * torch.sigmoid(tau * (r - 1)) * adv
    elif s1.objective == "cispo":
        tok = -r.detach().clamp(max=s1.cispo_cap) * adv * lp
    if s1.objective in ("ppo", "sapo", "cispo"):
        loss = (tok * m).sum() / n_tok
    else:
        delta = s1.beta * ((lp - old) * m).sum(1)
        R = data.rewards.double()
        if s1.objective == "ce":
            seq = -(R * F.logsigmoid(delta) + (1 - R) * F.logsigmoid(-delta))
        else:
            seq = (delta - (R - data.group_baseline().double())) ** 2
        loss = seq.sum() / n_seq
    d = old - lp
    return loss + s1.kl_coef * ((d.exp() - d - 1) * m).sum() / n_tok


@pytest.mark.parametrize("train_layers", [None, 1])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_stage1_step_equals_the_materialized_logits_step(train_layers, objective):
    temperature = 0.7
    policy, data, cache = _f64_setup(train_layers, temperature)
    cfg = tiny_cfg(train_layers=train_layers)
    cfg.stage1.objective, cfg.sample.temperature, cfg.stage1.kl_coef = objective, temperature, 0.1
    cfg.stage1.clip_high = 0.28 if train_layers else math.inf  # clip-higher, and the loose default
    params = [p for _, p in policy.trainable_named()]
    got = _loss(stage1.make_step(policy, data, cfg), data, cache, policy)
    ref = _reference_stage1(policy, data, cfg, temperature)
    assert got.loss.dtype == torch.float64
    torch.testing.assert_close(got.loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("signal, kl_trust", [("logratio", False), ("reverse_kl", False), ("forward_kl", False),
                                              ("forward_kl", True), ("logratio", True)])
def test_stage2_step_equals_the_materialized_logits_step(teacher_dir, signal, kl_trust, agg):
    temperature = 0.7
    policy, data, cache = _f64_setup(2, temperature, seed=3)  # the student θ, away from π0 (as the teacher fixture)
    cfg = tiny_cfg(train_layers=2)
    cfg.sample.temperature, cfg.stage2.signal, cfg.stage2.kl_coef, cfg.stage2.center = temperature, signal, 0.3, "group"
    cfg.stage2.agg = agg
    theta = policy.trainable_state()
    with torch.no_grad():
        load_policy_state(policy, teacher_dir)
        z_t, _ = _logits(policy, data, temperature)
        pi0 = make_policy()
        pi0.model.to(torch.float64)
        z_0, _ = _logits(pi0, data, temperature)
    policy.load_trainable_state(theta)
    teachers = stage2.teacher_outputs(policy, data, cache, [teacher_dir], temperature, 4, with_hidden=True)
    anchor = data.old_logprobs + 0.1 * torch.randn(data.old_logprobs.shape, dtype=torch.float64,
                                                   generator=torch.Generator().manual_seed(0))
    # (the teacher pass loads and restores θ in place: the reference's graph starts after it)
    step = stage2.make_step(policy, data, cache, cfg, teachers, stage2.fixed_signal(cfg, data, teachers, cache, temperature))

    z, batch = _logits(policy, data, temperature)
    logp, logp_t, logp_0 = F.log_softmax(z, -1), F.log_softmax(z_t, -1), F.log_softmax(z_0, -1)
    m = batch.mask.double()
    kl0 = (logp.exp() * (logp - logp_0)).sum(-1)
    trust = torch.ones_like(m)
    if kl_trust:  # a threshold halfway across the widest gap of the tokens' KL(π‖π0) near their median
        v = kl0[batch.mask].detach().sort().values
        lo = len(v) // 4
        i = lo + int((v[lo + 1 : 3 * lo + 1] - v[lo : 3 * lo]).argmax())
        cfg.stage2.kl_trust = float(v[i] + v[i + 1]) / 2
        trust = (kl0.detach() <= cfg.stage2.kl_trust).double()
        assert 0 < (trust * m).sum() < m.sum()
    params = [p for _, p in policy.trainable_named()]
    got = _loss(step, data, cache, policy, state={"anchor": anchor})

    R = m.shape[1]
    pick = lambda lq: lq.gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0] * m  # noqa: E731
    lp, t_lp, anc = pick(logp), pick(logp_t), anchor[:, :R] * m
    rho = torch.exp(lp - anc)
    if signal == "logratio":  # log πT/π0 centered per prompt group (mean of its responses' means)
        # (the trainer keeps the teacher's per-token log-probs, like π0's, in float32)
        a = (t_lp.float().double() - data.old_logprobs[:, :R]) * m
        mean = a.sum(1) / m.sum(1)
        group_mean = torch.stack([mean[data.group == g].mean() for g in data.group.tolist()])
        a = (a - group_mean[:, None]) * m * trust
        tok = -torch.minimum(rho * a, rho.clamp(1 - cfg.stage2.clip, 1 + cfg.stage2.clip) * a)
    else:
        p, pt = logp.exp(), logp_t.exp()
        kl = (pt * (logp_t - logp)).sum(-1) if signal == "forward_kl" else (p * (logp - logp_t)).sum(-1)
        pull, r = (t_lp - lp).detach(), rho.detach()
        outside = ((r > 1 + cfg.stage2.clip) & (pull > 0)) | ((r < 1 - cfg.stage2.clip) & (pull < 0))
        assert outside[batch.mask].any() and not outside[batch.mask].all()  # the trust mask acts
        tok = kl * ~outside * trust
    per_token = (tok + cfg.stage2.kl_coef * kl0) * m
    if agg == "token-mean":
        ref = per_token.sum() / m.sum()
    else:
        ref = (per_token.sum(1) / m.sum(1)).sum() / len(data)
    torch.testing.assert_close(got.loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_stage1_backward_makes_no_vocabulary_pass():
    """The fused stage-1 step: its backward runs no GEMM with the vocabulary in its shape (the LM
    head's gradients were computed in the forward) and calls no erpd kernel; the backbone's own
    backward still runs."""
    policy = make_policy(train_layers=1)
    if "cpu" not in erpd.available("cpu", "linear_policy_loss"):
        pytest.skip("erpd._C not built")
    policy.backend = "cpu"
    data = synthetic_data(policy, seed=4)
    cache = with_old_logprobs(policy, data)
    out = _loss(stage1.make_step(policy, data, tiny_cfg(train_layers=1)), data, cache, policy)
    V = policy.head_weight().shape[0]
    _assert_backward_makes_no_vocabulary_pass(out.loss, V)
    assert all(p.grad is not None for _, p in policy.trainable_named())


def _assert_backward_makes_no_vocabulary_pass(loss, V):
    """The backward of ``loss`` runs GEMMs (the backbone's) but none over the vocabulary ``V`` and
    no erpd kernel: every LM-head gradient was computed in a forward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    events = prof.events()
    gemms = [e for e in events if e.name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")]
    assert gemms, "the backbone's backward should run GEMMs"
    assert not [e.input_shapes for e in gemms if any(V in s for s in e.input_shapes if s)], "a GEMM over the vocabulary"
    assert not [e.name for e in events if e.name.startswith("erpd::")]


def _stage2_setup(teacher_dir, signal, backend, **options):
    policy = make_policy()
    policy.backend = backend
    data = synthetic_data(policy, seed=4)
    cache = with_old_logprobs(policy, data)
    with torch.no_grad():  # θ away from π0: KL(π‖π0) and its gradient are not 0
        g = torch.Generator().manual_seed(6)
        for _, p in policy.trainable_named():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    cfg = tiny_cfg()
    cfg.stage2.signal = signal
    for k, v in options.items():
        setattr(cfg.stage2, k, v)
    teachers = stage2.teacher_outputs(policy, data, cache, [teacher_dir], 1.0, 4,
                                      with_hidden=signal in stage2.KL_SIGNALS)
    step = stage2.make_step(policy, data, cache, cfg, teachers, stage2.fixed_signal(cfg, data, teachers, cache, 1.0))
    anchor = data.old_logprobs + 0.1 * torch.randn(data.old_logprobs.shape, generator=torch.Generator().manual_seed(0))
    return policy, _loss(step, data, cache, policy, state={"anchor": anchor})


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("signal, options", [("forward_kl", dict(kl_coef=0.3)), ("reverse_kl", dict(kl_trust=0.00172)),  # in a gap of the tokens' KL(π‖π0)
                                             ("logratio", dict(kl_coef=0.3, kl_trust=0.00172))])
def test_stage2_reduced_kls_equal_the_per_token_ops(teacher_dir, signal, options, agg):
    """The stage-2 KL losses on backend cpu (linear_kl with a reduction: gradients in the forward)
    equal the same step on backend torch (per-token KLs reduced through autograd), fp32."""
    if "cpu" not in erpd.available("cpu", "linear_kl"):
        pytest.skip("erpd._C not built")
    got, ref = (_stage2_setup(teacher_dir, signal, b, agg=agg, **options) for b in ("cpu", "torch"))
    torch.testing.assert_close(got[1].loss, ref[1].loss, rtol=1e-5, atol=1e-7)
    got[1].loss.backward()
    ref[1].loss.backward()
    for (name, a), (_, b) in zip(got[0].trainable_named(), ref[0].trainable_named()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("signal", ["forward_kl", "logratio"])
def test_stage2_backward_makes_no_vocabulary_pass(teacher_dir, signal):
    """With the KL term (and a KL signal), the stage-2 backward runs no GEMM over the vocabulary
    and no erpd kernel: every LM-head gradient was computed in a forward."""
    if "cpu" not in erpd.available("cpu", "linear_kl"):
        pytest.skip("erpd._C not built")
    policy, out = _stage2_setup(teacher_dir, signal, "cpu", kl_coef=0.3)
    V = policy.head_weight().shape[0]
    _assert_backward_makes_no_vocabulary_pass(out.loss, V)
    assert all(p.grad is not None for _, p in policy.trainable_named())


def test_prefix_cache_equals_full_forward():
    policy = make_policy(train_layers=1)
    data = synthetic_data(policy, seed=2)
    cache = with_old_logprobs(policy, data)
    idx = torch.arange(len(data))
    b_full = batches.collate(data, idx, policy.device)
    b_cached = batches.collate(data, idx, policy.device, cache.prefix)
    with torch.no_grad():
        h_full = batches.response_hidden(policy, b_full)
        h_cached = batches.response_hidden(policy, b_cached)
    assert policy.n_frozen == 1 and b_cached.prefix is not None
    # Equal wherever a response token is predicted (padding rows differ: the cache pads with 0).
    m = b_full.mask
    assert torch.allclose(h_full[m], h_cached[m], atol=1e-5)
    assert len(policy.backbone.layers) == 2  # the top-layer swap is undone
