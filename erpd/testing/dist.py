"""A rank of a test that spawns gloo processes: join the group, and leave it without threads.

The check at the end guards against an abort at interpreter exit (see
:func:`erpd.train.dist.shutdown`): a gloo group that survives ``destroy_process_group`` keeps its
worker threads into shutdown, where one of them can abort the process. Importing this module
imports erpd, hence ``torch._dynamo``, before the group exists, as that docstring asks.
"""

from __future__ import annotations

import contextlib
import datetime
import glob

import torch.distributed as dist

from erpd.train import dist as D


def backend_threads() -> list[str]:
    """Names of this process's threads that belong to gloo (Linux; empty elsewhere)."""
    names = []
    for path in glob.glob("/proc/self/task/*/comm"):
        with contextlib.suppress(OSError):
            with open(path) as f:
                names.append(f.read().strip())
    return sorted(n for n in names if "gloo" in n)


@contextlib.contextmanager
def gloo_rank(init_file: str, rank: int, world: int):
    """Run the body as ``rank`` of ``world`` gloo processes (file rendezvous at ``init_file``)."""
    # A collective the other ranks never join fails after 5 minutes instead of gloo's 30.
    dist.init_process_group(D.cpu_backend(), init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    try:
        yield
    finally:
        D.shutdown()
    left = backend_threads()
    assert not left, f"rank {rank}: gloo threads {left} outlived destroy_process_group (something holds the group)"
