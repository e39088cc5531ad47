"""Two processes with the gloo backend train like one: replicas stay equal, and equal the
single-process run (the gradient all-reduce sums shards of losses normalized by the whole
mini-batch's counts)."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _train(out_dir, objective, epochs=2, resume=False, checkpoint_every=0, fsdp=False, train_layers=1, batch_size=6):
    from conftest import make_policy, synthetic_data, tiny_cfg, with_old_logprobs

    from erpd.train import checked_io, stage0, stage1

    torch.set_num_threads(1)
    policy = make_policy(train_layers=train_layers, fsdp=fsdp)
    from erpd.train import dist as D

    assert any(D.is_sharded(p) for _, p in policy.trainable_named()) == (fsdp and D.enabled())
    data = synthetic_data(policy, n_prompts=3, k=4, seed=7)
    cache = with_old_logprobs(policy, data)
    cfg = tiny_cfg(train_layers=train_layers)
    cfg.sample.temperature = 1.0
    cfg.stage1.objective = objective
    cfg.stage1.epochs, cfg.stage1.batch_size, cfg.stage1.micro_batch_size = epochs, batch_size, 2
    cfg.stage1.checkpoint_every = checkpoint_every

    def evaluate(epoch, last):
        # Sampling from the policy (under FSDP on every rank, with synced_gpus): a digest of the samples.
        samples = stage0.generate(policy, ["abc", "hello"], 2, 5, 1.0, 4, seed=epoch)
        return {"heldout_reward": 0.5, "sample_digest": sum(t for _, r, _ in samples for t in r)}

    stage1.run(policy, data, cache, cfg, out_dir, evaluate, resume=resume)
    return torch.cat([t.flatten() for t in policy.trainable_state().values()])  # FSDP shards gathered


def _steps(out_dir):
    from erpd.train import checked_io, stage0

    return [r for r in checked_io.read_jsonl(os.path.join(out_dir, "stage1", "metrics.jsonl")) if r["kind"] == "step"]


def _worker(rank, world, init_file, out_dir, objective, result_dir, epochs=2, resume=False, checkpoint_every=0,
            fsdp=False, train_layers=1, batch_size=6):
    sys.path.insert(0, os.path.dirname(__file__))
    from erpd.testing.dist import gloo_rank

    with gloo_rank(init_file, rank, world):
        flat = _train(out_dir, objective, epochs, resume, checkpoint_every, fsdp, train_layers, batch_size)
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        torch.save(gathered, os.path.join(result_dir, f"rank{rank}.pt"))


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
    from erpd.train import checked_io, stage0

    steps = [r for r in checked_io.read_jsonl(tmp_path / "ddp" / "stage1" / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    ref = [r for r in checked_io.read_jsonl(tmp_path / "single" / "stage1" / "metrics.jsonl") if r["kind"] == "step"]
    for a, b in zip(steps, ref):  # every logged metric is the global one, reduced over the ranks
        for key in ("loss", "grad_norm", "clip_frac", "logratio"):
            if key in b:
                assert abs(a[key] - b[key]) < 1e-5, key


@pytest.mark.parametrize("world,batch_size", [(2, 11), (3, 5)])
def test_a_rank_without_rows_in_a_step_keeps_up(tmp_path, world, batch_size):
    """12 rows in mini-batches of 11 + 1 on 2 ranks, or 5 + 5 + 2 on 3: in the last step one rank
    has no rows. It runs a zero-weight micro-batch and reduces the same stats as the others (it
    used to reduce fewer, and the step's metric all-reduce never completed); every logged metric
    and the final weights equal one process's."""
    args = (world, str(tmp_path / "init"), str(tmp_path / "ddp"), "ppo", str(tmp_path), 1, False, 0, False, 1, batch_size)
    mp.spawn(_worker, args=args, nprocs=world, join=True)
    gathered = torch.load(tmp_path / "rank0.pt")
    assert all(torch.equal(g, gathered[0]) for g in gathered[1:])
    single = _train(tmp_path / "single", "ppo", 1, batch_size=batch_size)
    assert torch.allclose(gathered[0], single, atol=1e-5, rtol=1e-4)
    steps, ref = _steps(tmp_path / "ddp"), _steps(tmp_path / "single")
    assert [r["step"] for r in steps] == list(range(1, len(ref) + 1)) and len(ref) == -(-12 // batch_size)
    for a, b in zip(steps, ref, strict=True):
        assert set(a) == set(b)
        for key in ("loss", "grad_norm", "clip_frac", "logratio"):
            assert abs(a[key] - b[key]) < 1e-5, key


def test_gradient_buckets_keep_order_dtype_and_size():
    """The gradient all-reduce's buckets: consecutive, one dtype each, at most the limit (a larger
    tensor alone), every tensor exactly once."""
    from erpd.train.dist import _buckets

    ts = [torch.zeros(n, dtype=d) for n, d in [(3, torch.float32), (2, torch.float32), (10, torch.float32),
                                                (1, torch.bfloat16), (1, torch.bfloat16), (4, torch.float32)]]
    got = list(_buckets(ts, limit=20))  # 20 bytes: five fp32 elements
    assert [[t.numel() for t in b] for b in got] == [[3, 2], [10], [1, 1], [4]]
    assert [id(t) for b in got for t in b] == [id(t) for t in ts]
    assert all(len({t.dtype for t in b}) == 1 for b in got)


def _initial():
    from conftest import make_policy

    return torch.cat([p.detach().flatten() for _, p in make_policy(train_layers=1).trainable_named()])


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_checkpoint_resumes_on_a_different_world_size(tmp_path, first, then):
    """Train epoch 1 (2 steps) on ``first`` processes, resume epoch 2 on ``then``: the next step's
    loss, every logged loss and the final weights equal an uninterrupted one-process run's. The
    checkpoint holds full tensors and no per-rank state (mid-epoch resumes: test_resume.py)."""

    def run(world, epochs, resume, tag):
        if world == 1:
            return _train(tmp_path / "run", "ppo", epochs, resume, checkpoint_every=1)
        init = tmp_path / f"init_{tag}"
        mp.spawn(_worker, args=(world, str(init), str(tmp_path / "run"), "ppo", str(tmp_path), epochs, resume, 1),
                 nprocs=world, join=True)
        return torch.load(tmp_path / "rank0.pt")[0]

    run(first, 1, False, "a")
    ck = torch.load(tmp_path / "run" / "stage1" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["step"] == 2
    final = run(then, 2, True, "b")
    straight = _train(tmp_path / "single", "ppo", 2)
    assert torch.allclose(final, straight, atol=1e-5, rtol=1e-4)
    resumed, ref = _steps(tmp_path / "run"), _steps(tmp_path / "single")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[2]["loss"] == pytest.approx(ref[2]["loss"], abs=1e-5)  # the first step after the resume
    for a, b in zip(resumed, ref):
        assert abs(a["loss"] - b["loss"]) < 1e-5


def _epochs(out_dir):
    from erpd.train import checked_io, stage0

    return [r for r in checked_io.read_jsonl(os.path.join(out_dir, "stage1", "metrics.jsonl")) if r["kind"] == "epoch"]


@pytest.mark.parametrize("train_layers", [1, None])
def test_fsdp2_two_gloo_processes_equal_one_process(tmp_path, train_layers):
    """FSDP2 (``model.fsdp``) on CPU/gloo: decoder layers sharded over 2 ranks, mini-batches of 5
    rows (shards of 3 and 2 rows: the short rank runs a zero-weight micro-batch to stay in
    lockstep), step checkpoints gathered from the shards. Same losses, grad norms, samples and
    final weights as one unsharded process; the checkpoint then resumes on one process."""
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (the feature under test)

    args = (2, str(tmp_path / "init"), str(tmp_path / "fsdp"), "ppo", str(tmp_path), 2, False, 2, True, train_layers, 5)
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    gathered = torch.load(tmp_path / "rank0.pt")
    assert torch.equal(gathered[0], gathered[1])  # full weights gathered from the shards agree
    single = _train(tmp_path / "single", "ppo", 2, checkpoint_every=2, train_layers=train_layers, batch_size=5)
    assert torch.allclose(gathered[0], single, atol=1e-5, rtol=1e-4)
    for a, b in zip(_steps(tmp_path / "fsdp"), _steps(tmp_path / "single"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    for a, b in zip(_epochs(tmp_path / "fsdp"), _epochs(tmp_path / "single"), strict=True):
        assert a["sample_digest"] == b["sample_digest"] and abs(a["kl_full"] - b["kl_full"]) < 1e-5
    # The FSDP checkpoint (full tensors) continues on one unsharded process.
    ck = torch.load(tmp_path / "fsdp" / "stage1" / "checkpoint.pt", weights_only=False)
    assert all(type(t) is torch.Tensor for t in ck["trainable"].values())
    more = _train(tmp_path / "fsdp", "ppo", 3, resume=True, checkpoint_every=2, train_layers=train_layers, batch_size=5)
    ref = _train(tmp_path / "single", "ppo", 3, resume=True, checkpoint_every=2, train_layers=train_layers, batch_size=5)
    assert torch.allclose(more, ref, atol=1e-5, rtol=1e-4)


def _within_30s(condition) -> bool:
    """Poll ``condition`` until true or 30 s pass: gloo's threads name themselves only once they
    run, which under load can be well after ``init_process_group`` returns."""
    import time

    deadline = time.monotonic() + 30
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_shutdown_frees_the_group_and_its_threads(tmp_path):
    """``dist.shutdown`` leaves no gloo thread behind, and warns when something still holds the
    group (a world-1 gloo group in this process)."""
    import gc

    from erpd.testing.dist import backend_threads
    from erpd.train import dist as D

    def started():
        return _within_30s(lambda: len(backend_threads()) > len(before))

    before = backend_threads()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'a'}", rank=0, world_size=1)
    assert started()  # the group runs threads of its own
    D.shutdown()
    assert backend_threads() == before
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'b'}", rank=0, world_size=1)
    held = dist.group.WORLD
    assert started()
    with pytest.warns(RuntimeWarning, match="still referenced"):
        D.shutdown()
    assert len(backend_threads()) > len(before)
    del held
    gc.collect()
    assert backend_threads() == before


def test_cpu_backend_runs_collectives_on_one_gloo_worker(tmp_path):
    """``dist.cpu_backend()`` is gloo with one worker thread (torch's default of two races on a
    shared status string and can corrupt the heap, see its docstring); stock gloo starts two. Both
    reduce correctly."""
    import time

    from erpd.testing.dist import backend_threads
    from erpd.train import dist as D

    def workers(backend, name, expected):
        dist.init_process_group(backend, init_method=f"file://{tmp_path / name}", rank=0, world_size=1)
        try:
            t = torch.arange(4.0)
            dist.all_reduce(t)
            assert torch.equal(t, torch.arange(4.0))
            _within_30s(lambda: backend_threads().count("pt_gloo_runloop") >= expected)
            time.sleep(0.2)  # room for a worker beyond the expected ones to name itself
            return backend_threads().count("pt_gloo_runloop")
        finally:
            D.shutdown()

    assert workers(D.cpu_backend(), "a", 1) == 1
    assert workers("gloo", "b", 2) == 2
    assert D.cpu_backend() == D.cpu_backend()  # registering twice is harmless


def test_torch_pins_a_group_created_before_dynamo_is_imported(tmp_path):
    """Why erpd creates its process groups after ``import erpd``: in a fresh process, a group
    created before ``torch._dynamo`` is imported survives ``destroy_process_group`` (bound as a
    default argument in torch.distributed.nn.functional), and ``dist.shutdown`` says so."""
    import subprocess

    script = f"""
import warnings
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://{tmp_path / 'init'}", rank=0, world_size=1)
import torch._dynamo
from erpd.testing.dist import backend_threads
from erpd.train import dist as D
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    D.shutdown()
print("warned" if any("still referenced" in str(w.message) for w in caught) else "silent", len(backend_threads()))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    warned, threads = p.stdout.split()
    assert warned == "warned" and int(threads) > 0


@pytest.mark.parametrize("fsdp", [False, True])
def test_torchrun_demo_two_processes(tmp_path, fsdp):
    """The documented command, end to end on CPU: ``torchrun --nproc-per-node 2 -m erpd.cli demo``
    (tiny model, step checkpoints, packing), replicated and with ``--fsdp``."""
    import subprocess

    from test_cli import TINY

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "erpd.cli",
           "demo", "--out", str(out), *(["--fsdp"] if fsdp else []), *TINY, "stage1.checkpoint_every=1", "stage1.pack=true",
           "model.threads=1"]
    env = dict(os.environ, ERPD_PROGRESS="0", PYTHONPATH=os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "still referenced after destroy_process_group" not in p.stderr  # the group and its threads ended
    assert "| student |" in p.stdout and (out / "summary.json").is_file()
    steps = [r["step"] for r in _steps(out)]
    assert steps == sorted(set(steps)) and steps  # rank 0 logged each step once
