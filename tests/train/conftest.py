"""Fixtures for the trainer tests: a tiny random policy and synthetic fixed data.

Everything runs on CPU with the `tiny` preset (2 Llama layers, hidden 64, a character-level
tokenizer built in code), one torch thread (spinning OpenMP threads make tiny ops slow on a busy
machine), and seconds per test.
"""

import pytest
import torch

from erpd.train import data as D
from erpd.train import measure
from erpd.train.config import RunConfig
from erpd.train.models import load_policy

torch.set_num_threads(1)


def tiny_cfg(**model) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name = "tiny"
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def make_policy(**model):
    return load_policy(tiny_cfg(**model).model, seed=0)


def synthetic_data(policy, n_prompts=3, k=4, seed=0) -> D.FixedData:
    """Random prompts/responses of varied lengths with mixed rewards in every group."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(policy.tokenizer)
    prompt_ids, response_ids, rewards, group = [], [], [], []
    for p in range(n_prompts):
        prompt = torch.randint(4, vocab, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist()
        for j in range(k):
            r_len = int(torch.randint(2, 9, (1,), generator=g))
            response_ids.append(torch.randint(4, vocab, (r_len,), generator=g).tolist())
            prompt_ids.append(prompt)
            rewards.append(float(j % 2))
            group.append(p)
    data = D.build(prompt_ids, response_ids, rewards, group, policy.tokenizer.pad_token_id,
                   questions=[f"q{p}" for p in range(n_prompts)], answers=[str(p) for p in range(n_prompts)],
                   prompts=[f"prompt {p}" for p in range(n_prompts)], responses=[f"r{i}" for i in range(len(rewards))])
    return data


def with_old_logprobs(policy, data, micro_batch_size=5):
    cache, lp = measure.build_cache(policy, data, 1.0, micro_batch_size)
    data.old_logprobs = lp
    return cache


@pytest.fixture
def tiny():
    policy = make_policy()
    data = synthetic_data(policy)
    cache = with_old_logprobs(policy, data)
    return policy, data, cache
