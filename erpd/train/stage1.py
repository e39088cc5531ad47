"""Stage 1 (the extreme region): many off-policy epochs on the fixed data, starting from π0.

The reference of every ratio is π0 itself (``data.old_logprobs``), never refreshed: the whole
point is to let the policy run far from π0 under a weak constraint and see reward rise while
entropy collapses and KL(π‖π0) grows. The final policy is the teacher of stage 2.
"""

from __future__ import annotations

from pathlib import Path

from erpd.train import dist, engine, losses
from erpd.train.config import RunConfig
from erpd.train.data import FixedData
from erpd.train.models import Policy, save_policy_state


def make_step(policy: Policy, data: FixedData, cfg: RunConfig):
    s1, temperature = cfg.stage1, cfg.sample.temperature
    baseline_all = data.group_baseline()

    def step(batch: engine.Batch, n_tok: int, n_seq: int, state: dict) -> engine.StepOutput:
        hr = engine.response_hidden(policy, batch)
        lp, _ = engine.logprobs(policy, hr, batch.targets, temperature)
        (old,) = engine.rows(data, batch.idx, "old_logprobs", device=lp.device)
        mask = batch.mask.to(lp.dtype)
        adv = data.advantages[batch.idx].to(lp.device)
        rewards = data.rewards[batch.idx].to(lp.device)
        stats = {}
        if s1.objective in ("ppo", "sapo", "cispo"):
            if s1.objective == "ppo":
                tok, aux = losses.ppo(lp, old, adv, s1.clip_low, s1.clip_high)
            elif s1.objective == "sapo":
                tok, aux = losses.sapo(lp, old, adv, s1.tau_pos, s1.tau_neg)
            else:
                tok, aux = losses.cispo(lp, old, adv, s1.cispo_cap)
            loss = engine.aggregate(tok, mask, s1.agg, n_tok, n_seq)
            stats["clip_frac"] = (aux["clip_frac"] * mask).sum()
        else:
            if s1.objective == "ce":
                seq, _ = losses.ce(lp, old, rewards, mask, s1.beta)
            else:
                seq, _ = losses.mse(lp, old, rewards, baseline_all[batch.idx].to(lp.device), mask, s1.beta)
            loss = seq.sum() / max(1, n_seq)
        if s1.kl_coef:
            kl = losses.kl_penalty(lp, old, s1.kl_estimator)
            loss = loss + s1.kl_coef * engine.aggregate(kl, mask, s1.agg, n_tok, n_seq)
        stats["logratio"] = ((lp - old).detach() * mask).sum()
        return engine.StepOutput(loss=loss, stats=stats)

    return step


def run(policy: Policy, data: FixedData, cache: engine.Cache, cfg: RunConfig, out_dir: Path, evaluate, resume=False):
    """Train the teacher; write ``out_dir/stage1/metrics.jsonl`` and ``out_dir/teacher``.

    ``evaluate(epoch, last) -> dict`` gives the held-out metrics for an epoch (or {} to skip).
    Returns the per-epoch history (epoch 0 = π0).
    """
    run_dir = Path(out_dir) / "stage1"

    def epoch_end(epoch: int, state: dict) -> dict:
        out = engine.policy_outputs(policy, data, cache, cfg.sample.temperature, cfg.stage1.micro_batch_size,
                                    desc="stage1 measure")
        return {**engine.drift_metrics(out, data), **dist.on_main(evaluate, epoch, epoch == cfg.stage1.epochs)}

    history = engine.train_stage(policy, data, cache, cfg.stage1, cfg.sample.temperature, run_dir, make_step(policy, data, cfg),
                                 epoch_end, resume, stage="stage1")
    final = policy.trainable_state()  # every rank: gathering FSDP shards is a collective
    if dist.is_main():
        save_policy_state(policy, Path(out_dir) / "teacher", state=final,
                          meta={"stage1": cfg.to_dict()["stage1"], "final": history[-1]})
    dist.barrier()
    return history
