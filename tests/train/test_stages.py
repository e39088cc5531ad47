import pytest
import torch
import torch.nn.functional as F
from conftest import make_policy, synthetic_data, tiny_cfg, with_old_logprobs

from erpd.train import engine, losses, stage1, stage2
from erpd.train.config import OBJECTIVES, SIGNALS
from erpd.train.models import save_policy_state


def _loss(step, data, cache, policy, state=None):
    idx = torch.arange(len(data))
    batch = engine.collate(data, idx, policy.device, cache.prefix)
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
        lp = engine.policy_outputs(policy, data, cache, 1.0, 8)["logprobs"]
    return (data.advantages[:, None] * lp * data.mask).sum().item()


def test_stage1_losses_at_pi0():
    """At π0 (ratio 1) the token objectives equal −Â (sapo: −(4/τ)·½·Â) and ce equals log 2."""
    lp = torch.randn(3, 4)
    adv = torch.tensor([1.0, -0.5, 0.0])
    assert torch.allclose(losses.ppo(lp, lp, adv, 0.2, None)[0], -adv[:, None].expand(3, 4))
    assert torch.allclose(losses.cispo(lp, lp, adv)[0], -adv[:, None] * lp)
    tau = torch.where(adv > 0, 1.0, 1.05)[:, None]
    assert torch.allclose(losses.sapo(lp, lp, adv)[0], -(4 / tau) * 0.5 * adv[:, None])
    mask = torch.ones(3, 4)
    assert torch.allclose(losses.ce(lp, lp, torch.tensor([1.0, 0.0, 1.0]), mask)[0], torch.full((3,), 0.6931472))
    assert torch.allclose(losses.mse(lp, lp, torch.tensor([1.0, 0.0, 1.0]), torch.full((3,), 0.5), mask)[0],
                          torch.full((3,), 0.25))


def test_ppo_clip_semantics():
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 2.0]]))
    loss, aux = losses.ppo(lp, old, torch.tensor([1.0]), 0.2, 0.2)
    assert torch.allclose(loss, -torch.tensor([[0.5, 0.9, 1.1, 1.2]]))
    assert aux["clip_frac"].tolist() == [[0, 0, 0, 1]]
    loss, _ = losses.ppo(lp, old, torch.tensor([1.0]), 0.2, None)  # loose: no ceiling
    assert torch.allclose(loss, -torch.tensor([[0.5, 0.9, 1.1, 2.0]]))
    loss, _ = losses.ppo(lp, old, torch.tensor([-1.0]), 0.2, None)
    assert torch.allclose(loss, torch.tensor([[0.8, 0.9, 1.1, 2.0]]))


def test_signal_post_processing():
    a = torch.tensor([[1.0, 3.0, -2.0], [2.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = torch.tensor([1.0, 0.0])
    assert torch.equal(losses.process_signal(a, mask, rewards, scale=2.0), a * 2 * mask)
    assert torch.equal(losses.process_signal(a, mask, rewards, clip=1.5), a.clamp(-1.5, 1.5) * mask)
    centered = losses.process_signal(a, mask, rewards, center=True)
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
    _, lp = engine.build_cache(policy, data, 1.0, 5)
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


# -- the fused path equals the materialized-logits composition ---------------------------------

def _logits_logprobs(policy, data, temperature):
    """Reference: model(...).logits → log_softmax → gather, at the response-predicting positions."""
    idx = torch.arange(len(data))
    batch = engine.collate(data, idx, policy.device)
    logits = policy.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = engine.gather_positions(logits, batch.positions) / temperature
    logp = F.log_softmax(logits.float(), -1)
    targets = batch.targets.clamp(min=0)
    lp = logp.gather(-1, targets[..., None])[..., 0] * batch.mask
    ent = -(logp.exp() * logp).sum(-1) * batch.mask
    return lp, ent, batch


@pytest.mark.parametrize("train_layers", [None, 1])
@pytest.mark.parametrize("objective", ["ppo", "ce"])
def test_kernel_path_equals_logits_path(train_layers, objective):
    policy = make_policy(train_layers=train_layers)
    data = synthetic_data(policy, seed=1)
    temperature = 0.7
    cache, lp0 = engine.build_cache(policy, data, temperature, 5)
    data.old_logprobs = lp0
    with torch.no_grad():  # move away from π0 so ratios and the KL are not trivial
        for _, p in policy.trainable_named():
            p.add_(0.05 * torch.randn_like(p))
    cfg = tiny_cfg(train_layers=train_layers)
    cfg.stage1.objective, cfg.sample.temperature = objective, temperature
    cfg.stage1.kl_coef = 0.1
    step = stage1.make_step(policy, data, cfg)
    params = [p for _, p in policy.trainable_named()]

    fused = _loss(step, data, cache, policy)
    g_fused = torch.autograd.grad(fused.loss, params)

    # Same loss composed on logits from the model's own forward (no prefix cache, no fused op).
    ref_lp, ref_ent, batch = _logits_logprobs(policy, data, temperature)
    idx = torch.arange(len(data))
    fwd_lp, _ = engine.logprobs(policy, engine.response_hidden(policy, engine.collate(data, idx, policy.device, cache.prefix)),
                                batch.targets, temperature)
    assert torch.allclose(fwd_lp, ref_lp, atol=1e-5)

    class _Ref:
        """The step with the log-prob function swapped for the logits reference."""

    import erpd.train.engine as E
    orig_hidden, orig_lp = E.response_hidden, E.logprobs
    try:
        E.response_hidden = lambda pol, b: None
        E.logprobs = lambda pol, h, t, temp, with_entropy=False: (_logits_logprobs(policy, data, temperature)[0], None)
        ref = _loss(stage1.make_step(policy, data, cfg), data, cache, policy)
    finally:
        E.response_hidden, E.logprobs = orig_hidden, orig_lp
    g_ref = torch.autograd.grad(ref.loss, params)
    assert abs(fused.loss.item() - ref.loss.item()) < 1e-5
    for a, b in zip(g_fused, g_ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)

    # The measurement pass too: entropy and the full-vocabulary KL(π‖π0).
    out = engine.policy_outputs(policy, data, cache, temperature, 4)
    assert torch.allclose(out["entropy"][:, : ref_ent.shape[1]], ref_ent.detach(), atol=1e-4)
    assert (out["kl"][data.mask] > 0).all()


def test_prefix_cache_equals_full_forward():
    policy = make_policy(train_layers=1)
    data = synthetic_data(policy, seed=2)
    cache = with_old_logprobs(policy, data)
    idx = torch.arange(len(data))
    b_full = engine.collate(data, idx, policy.device)
    b_cached = engine.collate(data, idx, policy.device, cache.prefix)
    with torch.no_grad():
        h_full = engine.response_hidden(policy, b_full)
        h_cached = engine.response_hidden(policy, b_cached)
    assert policy.n_frozen == 1 and b_cached.prefix is not None
    # Equal wherever a response token is predicted (padding rows differ: the cache pads with 0).
    m = b_full.mask
    assert torch.allclose(h_full[m], h_cached[m], atol=1e-5)
    assert len(policy.backbone.layers) == 2  # the top-layer swap is undone
