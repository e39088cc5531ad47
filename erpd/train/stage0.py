"""Stage 0: the fixed data both stages train on, sampled once from π0.

``sample_fixed_data`` draws ``k`` responses per prompt from π0 (``generate``: pure temperature
sampling, batched), scores them with the verifier, computes π0's log-prob of every response token
(teacher-forced, through the same fused path the trainer uses, so the stage-1 ratio is exactly 1
before the first update) and the group-normalized advantages. The format on disk is
``erpd.train.data``'s.
"""

from __future__ import annotations

import dataclasses

import torch

from erpd.train import dist
from erpd.train.data import FixedData, build
from erpd.train.measure import Cache, build_cache
from erpd.train.models import Policy
from erpd.train.progress import progress
from erpd.train.task import chat_prompt


@torch.no_grad()
def generate(policy: Policy, prompts: list[str], n_per_prompt: int, max_new_tokens: int, temperature: float | None,
             batch_size: int, seed: int, desc="sampling"):
    """``n_per_prompt`` samples per prompt (pure temperature sampling; greedy decoding when
    ``temperature`` is None), in prompt-major order.

    Returns a list of ``(prompt_ids, response_ids, text)``; ``response_ids`` ends with EOS when the
    model stopped. Each batch is seeded from ``seed`` and its index, so results do not depend on
    what ran before.
    """
    tok = policy.tokenizer
    eos = tok.eos_token_id
    flat = [p for p in prompts for _ in range(n_per_prompt)]
    out = []
    model = policy.model
    was_training = model.training
    model.eval()
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for b, s in enumerate(progress(range(0, len(flat), batch_size), desc=desc, unit="batch")):
            chunk = flat[s : s + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(policy.device)
            torch.manual_seed(seed * 100003 + b)
            decoding = (dict(do_sample=False, temperature=None, top_k=None, top_p=None) if temperature is None
                        else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0))
            gen = model.generate(**enc, **decoding,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos,
                                 # FSDP: every rank decodes until all ranks are done (forwards are collectives)
                                 synced_gpus=dist.lockstep())
            new = gen[:, enc["input_ids"].shape[1]:].cpu()
            for j in range(len(chunk)):
                p_ids = enc["input_ids"][j][enc["attention_mask"][j].bool()].cpu().tolist()
                r_ids = new[j].tolist()
                if eos in r_ids:
                    r_ids = r_ids[: r_ids.index(eos) + 1]
                if not r_ids:  # max_new_tokens=0 is rejected upstream; keep the invariant anyway
                    r_ids = [eos]
                out.append((p_ids, r_ids, tok.decode(r_ids, skip_special_tokens=True)))
    finally:
        tok.padding_side = old_side
        model.train(was_training)
    return out


def sample_fixed_data(policy: Policy, problems: list, cfg, verifier, system_prompt=None) -> tuple[FixedData, Cache]:
    """Sample ``cfg.sample.k`` responses per problem from ``policy`` (π0), score them, and fill in
    π0's log-probs. Returns ``(data, cache)``; the cache (see ``erpd.train.measure.build_cache``)
    is what the π0 pass computed on the way and saves stage 1 a second pass."""
    sc = cfg.sample
    if sc.max_new_tokens < 1:
        raise ValueError("sample.max_new_tokens must be >= 1")
    prompts = [chat_prompt(policy.tokenizer, p.question, system_prompt) for p in problems]
    samples = generate(policy, prompts, sc.k, sc.max_new_tokens, sc.temperature, sc.batch_size, sc.seed,
                       desc="stage 0: sampling π0")
    rewards, group = [], []
    for i, (_, _, text) in enumerate(samples):
        g = i // sc.k
        rewards.append(float(verifier(text, problems[g].answer)))
        group.append(g)
    data = build([s[0] for s in samples], [s[1] for s in samples], rewards, group, policy.tokenizer.pad_token_id,
                 sc.advantage, questions=[p.question for p in problems], answers=[str(p.answer) for p in problems],
                 prompts=prompts, responses=[s[2] for s in samples])
    cache, lp = build_cache(policy, data, sc.temperature, cfg.stage1.micro_batch_size, desc="stage 0: π0 log-probs")
    data.old_logprobs = lp
    data.meta = {"model": policy.name, "train_layers": policy.cfg.train_layers, "temperature": sc.temperature,
                 "sample": dataclasses.asdict(sc), "task": dataclasses.asdict(cfg.task),
                 "mean_reward": float(data.rewards.mean()) if len(data) else 0.0}
    return data, cache
