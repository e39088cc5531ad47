"""Stage 2: distill the stage-1 teacher(s) into π0 on the same fixed data, under a trust region.

The policy starts from π0 again. Signals, ``a_t`` per response token (docs/trainer.md, "The method
as implemented", has the full list):

* ``logratio`` (default): a_t = log πT(y_t) − log π0(y_t), fixed for the whole stage;
* ``opd``: a_t = log πT(y_t) − log πθ(y_t), recomputed at every step (the sampled-token reverse
  KL used as a reward, as in on-policy distillation);
* ``combined``: Σ_j w_j · standardize(log πTj − log π0) over several teachers;
* these are post-processed (scale, clip, centering per response or per prompt group, outcome
  gating, mixed-reward groups only) and trained with the clipped surrogate −min(ρ a, clip(ρ, 1±ε) a), ρ = πθ/π_anchor;
* ``forward_kl`` / ``reverse_kl``: the full-vocabulary KL(πT‖πθ) / KL(πθ‖πT) per token
  (``erpd.linear_kl`` with the teacher's cached final hidden states and LM head: no logits),
  with tokens outside the trust region in the direction of the pull masked.

``π_anchor`` is π0, or with ``reanchor`` the policy at the end of the previous pass (epoch).
``kl_coef > 0`` adds β · KL(πθ‖π0) over the full vocabulary to any signal.

The two full-vocabulary KL losses (the ``forward_kl`` / ``reverse_kl`` signals and the
``kl_coef`` term) are ``erpd.linear_kl(reduction="sum")`` with the step's aggregation and the
detached masks as ``token_weights``: their gradients are computed in the forward, and the
backward makes no pass over the vocabulary. Per-token KLs remain where they are not a loss: the
``kl_trust`` mask and the ``advantage`` signal's baseline (``teacher_position_kl``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

import erpd
from erpd.train import batches, dist, loop, losses, measure
from erpd.train.config import RunConfig, stage2_policy
from erpd.train.data import FixedData
from erpd.train.models import Policy, load_policy_state, save_policy_state

KL_SIGNALS = ("forward_kl", "reverse_kl")


@torch.no_grad()
def teacher_outputs(policy: Policy, data: FixedData, cache: measure.Cache, teacher_dirs: list, temperature: float,
                    micro_batch_size: int, with_hidden: bool) -> list[dict]:
    """Each teacher's log-probs (and response hidden states + head when ``with_hidden``) on the
    fixed data, computed by loading it into ``policy`` in turn; ``policy`` is restored after."""
    base = policy.trainable_state()
    outs = []
    try:
        for d in teacher_dirs:
            load_policy_state(policy, d)
            out = measure.policy_outputs(policy, data, cache, temperature, micro_batch_size, with_hidden=with_hidden,
                                        desc=f"teacher pass {Path(d).name}")
            w = policy.head_weight()
            out["head_weight"] = w.detach().clone() if w.requires_grad else w
            b = policy.head_bias()
            out["head_bias"] = None if b is None else b.detach().clone()
            out["metrics"] = measure.drift_metrics(out, data)
            outs.append(out)
    finally:
        policy.load_trainable_state(base)
    return outs


def fixed_signal(cfg: RunConfig, data: FixedData, teachers: list[dict], cache: measure.Cache | None = None,
                 temperature: float = 1.0) -> torch.Tensor | None:
    """The per-token signal ``[N, R]`` of the strategies whose signal does not depend on πθ."""
    s2, mask = cfg.stage2, data.mask
    lr = lambda t: (t["logprobs"] - data.old_logprobs) * mask  # noqa: E731
    if s2.signal == "logratio":
        raw = lr(teachers[0])
    elif s2.signal == "response":
        raw = losses.response_mean(lr(teachers[0]), mask.float())[:, None].expand(mask.shape) * mask
    elif s2.signal == "advantage":
        raw = lr(teachers[0]) + teacher_position_kl(teachers[0], data, cache, temperature)
    elif s2.signal == "reward":  # the control: every token of a response gets its group advantage
        return data.advantages[:, None] * mask
    elif s2.signal == "combined":
        weights = s2.teacher_weights or [1.0 / len(teachers)] * len(teachers)
        raw = sum(w * losses.standardize(lr(t), mask) for w, t in zip(weights, teachers))
    else:
        return None
    a = losses.process_signal(raw, mask.float(), data.rewards, s2.scale, s2.signal_clip, s2.center, s2.gating, data.group)
    return a * row_weights(cfg, data)[:, None]


def row_weights(cfg: RunConfig, data: FixedData) -> torch.Tensor:
    """1 for the responses the signal applies to, 0 for the others (``stage2.groups``)."""
    if cfg.stage2.groups == "mixed":
        return losses.mixed_groups(data.rewards, data.group).float()
    return torch.ones(len(data))


@torch.no_grad()
def teacher_position_kl(teacher: dict, data: FixedData, cache: measure.Cache, temperature: float) -> torch.Tensor:
    """KL(π0‖πT) over the whole vocabulary at every response position ``[N, R]``: minus the
    expected log πT/π0 under π0 there, the per-position baseline of the ``advantage`` signal."""
    out = torch.zeros(data.targets.shape)
    dev = cache.ref_weight.device
    for idx in batches.micro_batches(len(data), 32):
        rows = idx.tolist()
        h0 = torch.cat([cache.ref_hidden[i] for i in rows]).to(dev)  # every response token, no padding
        ht = torch.cat([teacher["hidden"][i] for i in rows]).to(dev)
        m = data.mask[idx]
        kl = erpd.linear_kl(h0, cache.ref_weight, data.targets[idx][m].to(dev), bias=cache.ref_bias, teacher_hidden=ht,
                            teacher_weight=teacher["head_weight"], teacher_bias=teacher["head_bias"], direction="reverse",
                            temperature=temperature)
        out[idx] = measure.scatter(kl, m)
    return out


def make_step(policy: Policy, data: FixedData, cache: measure.Cache, cfg: RunConfig, teachers: list[dict],
              signal_all: torch.Tensor | None):
    """One micro-batch of stage 2. The clipped surrogate −min(ρa, clip(ρ, 1±ε)a), ρ = π/π_anchor,
    is ``erpd.linear_policy_loss`` with the signal as per-token advantages and π_anchor as the old
    policy; the KL signals and the KL(π‖π0) term are ``erpd.linear_kl``."""
    s2, temperature = cfg.stage2, cfg.sample.temperature
    options = stage2_policy(cfg)
    teacher = teachers[0] if teachers else None
    weights_all = row_weights(cfg, data)
    head = dict(bias=policy.head_bias(), temperature=temperature, backend=policy.backend)

    def step(batch: batches.Batch, n_tok: int, n_seq: int, state: dict) -> loop.StepOutput:
        hr = batches.response_hidden(policy, batch)
        dev = hr.device
        R = batch.targets.shape[1]
        mask = batch.mask
        fmask = mask.to(hr.dtype)
        anchor = state["anchor"][batch.idx, :R].to(dev)
        row_w = weights_all[batch.idx].to(dev)[:, None]
        t_lp = None if teacher is None else teacher["logprobs"][batch.idx, :R].to(dev)
        stats = {}
        # aggregate(x, mask, ...) == (x * agg_w).sum(): the reduced KLs' token weights.
        agg_w = loop.aggregate_weights(mask, s2.agg, n_tok, n_seq, torch.float64 if hr.dtype == torch.float64 else torch.float32)
        kl_pi0 = dict(teacher_hidden=cache.ref_batch(batch), teacher_weight=cache.ref_weight, teacher_bias=cache.ref_bias,
                      direction="reverse", **head) if (s2.kl_coef or s2.kl_trust is not None) else None
        if s2.kl_trust is not None:  # KL(π‖π0) over the whole vocabulary, per token: a mask, no gradient
            with torch.no_grad():
                kl0 = erpd.linear_kl(hr, policy.head_weight(), batch.targets, **kl_pi0)
        # Full-vocabulary trust region: positions already too far from π0 get no distillation gradient.
        trust = torch.ones_like(fmask) if s2.kl_trust is None else (kl0 <= s2.kl_trust).to(fmask.dtype)
        if s2.kl_trust is not None:
            stats["outside_trust"] = ((1 - trust) * fmask).sum()
        if s2.signal in KL_SIGNALS or s2.signal == "opd":
            with torch.no_grad():  # the current log-probs: the pull's direction, or opd's signal
                lp, _ = batches.logprobs(policy, hr, batch.targets, temperature)
        if s2.signal in KL_SIGNALS:
            t_hidden = torch.nn.utils.rnn.pad_sequence([teacher["hidden"][i][:R] for i in batch.idx.tolist()],
                                                       batch_first=True).to(dev)
            keep = losses.kl_trust_mask(lp, anchor, t_lp - lp, s2.clip)
            # aggregate(kl * keep * trust * row_w, ...) with its gradients in the forward.
            loss = erpd.linear_kl(hr, policy.head_weight(), batch.targets, teacher_hidden=t_hidden,
                                  teacher_weight=teacher["head_weight"], teacher_bias=teacher["head_bias"],
                                  direction="forward" if s2.signal == "forward_kl" else "reverse", reduction="sum",
                                  token_weights=(keep * trust * row_w).to(agg_w.dtype) * agg_w, **head)
            stats["clip_frac"] = ((1 - keep) * fmask).sum()
        else:
            if signal_all is not None:
                a = signal_all[batch.idx, :R].to(dev)
            else:  # opd: the teacher's log-ratio to the current policy, post-processed each step
                a = losses.process_signal(t_lp - lp, fmask, data.rewards[batch.idx].to(dev), s2.scale, s2.signal_clip,
                                          s2.center, s2.gating, data.group[batch.idx].to(dev)) * row_w
            a = a * trust
            loss, m = erpd.linear_policy_loss(
                hr, policy.head_weight(), batch.targets, anchor, a, mask, options=options,
                num_items=n_tok if s2.agg == "token-mean" else n_seq,
                return_logprobs=True, **head,
            )
            lp = m["logprobs"]
            stats["clip_frac"] = m["clipfrac"] * m["num_valid"]
            stats["signal"] = (a * fmask).sum()
        if s2.kl_coef:  # aggregate(KL(π‖π0), ...) with its gradients in the forward
            kl_term = erpd.linear_kl(hr, policy.head_weight(), batch.targets, reduction="sum", token_weights=agg_w,
                                     **kl_pi0)
            loss = loss + s2.kl_coef * kl_term
        (old,) = batches.rows(data, batch.idx, "old_logprobs", device=dev)
        stats["logratio"] = ((lp.detach() - old) * fmask).sum()
        return loop.StepOutput(loss=loss, stats=stats)

    return step


def run(policy: Policy, data: FixedData, cache: measure.Cache, cfg: RunConfig, out_dir: Path, evaluate,
        teacher_dirs: list, resume=False, control: bool = False):
    """Distill into π0 (``policy`` must hold π0); write ``out_dir/stage2/metrics.jsonl`` and ``out_dir/student``.

    ``control``: the same stage with the rewards' group advantages as the signal and no teacher
    (``out_dir/control/metrics.jsonl`` and the policy ``out_dir/control/policy``): the control a
    student must beat for its gain to be credited to the teacher.
    """
    if control:
        cfg = copy.deepcopy(cfg)
        cfg.stage2.signal, teacher_dirs = "reward", []
    s2 = cfg.stage2
    if s2.signal in KL_SIGNALS + ("logratio", "response", "advantage", "opd") and len(teacher_dirs) != 1:
        raise ValueError(f"stage2.signal={s2.signal!r} distills one teacher; got {len(teacher_dirs)} (use 'combined' for several)")
    teachers = teacher_outputs(policy, data, cache, teacher_dirs, cfg.sample.temperature, s2.micro_batch_size,
                               with_hidden=s2.signal in KL_SIGNALS + ("advantage",))
    signal_all = fixed_signal(cfg, data, teachers, cache, cfg.sample.temperature)
    run_dir = Path(out_dir) / ("control" if control else "stage2")

    def epoch_end(epoch: int, state: dict) -> dict:
        out = measure.policy_outputs(policy, data, cache, cfg.sample.temperature, s2.micro_batch_size, desc="stage2 measure")
        if s2.reanchor:
            state["anchor"] = out["logprobs"]
        drift = measure.drift_metrics(out, data, s2.clip)
        stop = s2.target_kl is not None and drift["kl_full"] > s2.target_kl
        last = epoch == s2.epochs or stop
        return {**drift, **dist.on_main(evaluate, epoch, last), **({"stop": True} if stop else {})}

    history = loop.train_stage(policy, data, cache, s2, run_dir,
                                 make_step(policy, data, cache, cfg, teachers, signal_all), epoch_end, resume,
                                 stage="control" if control else "stage2",
                                 extra_state={"anchor": data.old_logprobs.clone()})
    final = policy.trainable_state()  # every rank: gathering FSDP shards is a collective
    if dist.is_main():
        save_policy_state(policy, run_dir / "policy" if control else Path(out_dir) / "student", state=final,
                          meta={"stage2": cfg.to_dict()["stage2"], "final": history[-1],
                                "teachers": [str(d) for d in teacher_dirs]})
    dist.barrier()
    teacher_metrics = [t["metrics"] for t in teachers]
    return history, teacher_metrics
