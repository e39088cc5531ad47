"""Two processes with the gloo backend train like one: replicas stay equal, and equal the
single-process run (the gradient all-reduce sums shards of losses normalized by the whole
mini-batch's counts)."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _train(out_dir, objective):
    from conftest import make_policy, synthetic_data, tiny_cfg, with_old_logprobs

    from erpd.train import stage1

    torch.set_num_threads(1)
    policy = make_policy(train_layers=1)
    data = synthetic_data(policy, n_prompts=3, k=4, seed=7)
    cache = with_old_logprobs(policy, data)
    cfg = tiny_cfg(train_layers=1)
    cfg.sample.temperature = 1.0
    cfg.stage1.objective = objective
    cfg.stage1.epochs, cfg.stage1.batch_size, cfg.stage1.micro_batch_size = 2, 6, 2
    stage1.run(policy, data, cache, cfg, out_dir, lambda epoch, last: {"heldout_reward": 0.5})
    return torch.cat([p.detach().flatten() for _, p in policy.trainable_named()])


def _worker(rank, world, init_file, out_dir, objective, result_dir):
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        flat = _train(out_dir, objective)
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        torch.save(gathered, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("objective", ["ppo", "ce"])
def test_two_gloo_processes_stay_in_sync(tmp_path, objective):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), objective, str(tmp_path)), nprocs=2,
             join=True)
    gathered = torch.load(tmp_path / "rank0.pt")
    assert torch.equal(gathered[0], gathered[1])  # the replicas are bit-identical
    single = _train(tmp_path / "single", objective)
    assert not torch.equal(single, _initial())  # training moved the weights
    assert torch.allclose(gathered[0], single, atol=1e-5, rtol=1e-4)
    # Only rank 0 wrote the metrics, once per step.
    from erpd.train import engine

    steps = [r for r in engine.read_jsonl(tmp_path / "ddp" / "stage1" / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    ref = [r for r in engine.read_jsonl(tmp_path / "single" / "stage1" / "metrics.jsonl") if r["kind"] == "step"]
    for a, b in zip(steps, ref):
        assert abs(a["loss"] - b["loss"]) < 1e-5


def _initial():
    from conftest import make_policy

    return torch.cat([p.detach().flatten() for _, p in make_policy(train_layers=1).trainable_named()])
