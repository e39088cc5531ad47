"""Stage 1 (the extreme region): many off-policy epochs on the fixed data, starting from π0.

The reference of every ratio is π0 itself (``data.old_logprobs``), never refreshed: the whole
point is to let the policy run far from π0 under a weak constraint and see reward rise while
entropy collapses and KL(π‖π0) grows. The final policy is the teacher of stage 2.

The token-level objectives (ppo, sapo, cispo, with the optional KL(π‖π0) term on the sampled
tokens) are ``erpd.linear_policy_loss`` itself: one fused call from the final hidden states and
the LM head, whose gradients are computed in the forward (no second pass over the vocabulary in
the backward). The response-level ones (ce, mse) take the log-probs from
``erpd.linear_logprobs`` and are in ``erpd.train.losses``.
"""

from __future__ import annotations

from pathlib import Path

import erpd
from erpd.train import batches, dist, loop, losses, measure
from erpd.train.config import RunConfig, stage1_policy
from erpd.train.data import FixedData
from erpd.train.models import Policy, save_policy_state

TOKEN_OBJECTIVES = ("ppo", "sapo", "cispo")


def make_step(policy: Policy, data: FixedData, cfg: RunConfig):
    s1, temperature = cfg.stage1, cfg.sample.temperature
    options = stage1_policy(cfg)
    baseline_all = data.group_baseline()

    def step(batch: batches.Batch, n_tok: int, n_seq: int, state: dict) -> loop.StepOutput:
        hr = batches.response_hidden(policy, batch)
        dev = hr.device
        (old,) = batches.rows(data, batch.idx, "old_logprobs", device=dev)
        mask = batch.mask
        stats = {}
        if s1.objective in TOKEN_OBJECTIVES:
            loss, m = erpd.linear_policy_loss(
                hr, policy.head_weight(), batch.targets, old, data.advantages[batch.idx].to(dev), mask,
                bias=policy.head_bias(), temperature=temperature, options=options,
                ref_logprobs=old if s1.kl_coef else None, num_items=n_tok if s1.agg == "token-mean" else n_seq,
                backend=policy.backend, return_logprobs=True,
            )
            lp = m["logprobs"]
            stats["clip_frac"] = m["clipfrac"] * m["num_valid"]
        else:
            lp, _ = batches.logprobs(policy, hr, batch.targets, temperature)
            rewards = data.rewards[batch.idx].to(dev)
            fmask = mask.to(lp.dtype)
            if s1.objective == "ce":
                seq = losses.ce(lp, old, rewards, fmask, s1.beta)
            else:
                seq = losses.mse(lp, old, rewards, baseline_all[batch.idx].to(dev), fmask, s1.beta)
            loss = seq.sum() / max(1, n_seq)
            if s1.kl_coef:
                kl = losses.kl_estimate(lp, old, s1.kl_estimator)
                loss = loss + s1.kl_coef * loop.aggregate(kl, fmask, s1.agg, n_tok, n_seq)
        stats["logratio"] = ((lp.detach() - old) * mask).sum()
        return loop.StepOutput(loss=loss, stats=stats)

    return step


def run(policy: Policy, data: FixedData, cache: measure.Cache, cfg: RunConfig, out_dir: Path, evaluate, resume=False):
    """Train the teacher; write ``out_dir/stage1/metrics.jsonl`` and ``out_dir/teacher``.

    ``evaluate(epoch, last) -> dict`` adds metrics to an epoch's record (or {}).
    Returns the per-epoch history (epoch 0 = π0).
    """
    run_dir = Path(out_dir) / "stage1"

    def epoch_end(epoch: int, state: dict) -> dict:
        out = measure.policy_outputs(policy, data, cache, cfg.sample.temperature, cfg.stage1.micro_batch_size,
                                    desc="stage1 measure")
        return {**measure.drift_metrics(out, data), **dist.on_main(evaluate, epoch, epoch == cfg.stage1.epochs)}

    history = loop.train_stage(policy, data, cache, cfg.stage1, run_dir, make_step(policy, data, cfg),
                                 epoch_end, resume, stage="stage1")
    final = policy.trainable_state()  # every rank: gathering FSDP shards is a collective
    if dist.is_main():
        save_policy_state(policy, Path(out_dir) / "teacher", state=final,
                          meta={"stage1": cfg.to_dict()["stage1"], "final": history[-1]})
    dist.barrier()
    return history
