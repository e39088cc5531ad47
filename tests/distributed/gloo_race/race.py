"""Reproducer for the torch gloo race that ``erpd.train.dist.cpu_backend`` avoids (not a test).

Two gloo ranks run back-to-back functional all-gathers (gloo's ALLGATHER_COALESCED, the op behind
FSDP2's all-gathers and ``DTensor.full_tensor``). Under ``shim.so``, which holds each gloo worker
right before its unlocked write of the finished collective's name until the other worker arrives,
stock gloo (two workers) corrupts the heap within seconds; ``erpd_gloo`` (one worker) does not.

    g++ -O1 -shared -fPIC -std=c++17 tests/distributed/gloo_race/shim.cpp -o /tmp/shim.so -ldl
    LD_PRELOAD=/tmp/shim.so python tests/distributed/gloo_race/race.py gloo 20000
    LD_PRELOAD=/tmp/shim.so python tests/distributed/gloo_race/race.py erpd_gloo 20000
"""

import os
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _rank(rank, backend, iters, init_file):
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    from erpd.train import dist as D

    D.cpu_backend()  # registers erpd_gloo
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    inp = torch.full((4,), float(rank))
    for _ in range(iters):
        out = funcol.all_gather_tensor(inp, 0, dist.group.WORLD).wait()
    assert torch.equal(out, torch.tensor([0.0] * 4 + [1.0] * 4))
    D.shutdown()


if __name__ == "__main__":
    backend, iters = sys.argv[1], int(sys.argv[2])
    init = os.path.join(tempfile.mkdtemp(), "init")
    t = time.time()
    mp.spawn(_rank, args=(backend, iters, init), nprocs=2, join=True)
    print(f"{backend}: {iters} all-gathers on 2 ranks, no crash ({time.time() - t:.0f} s)")
