"""Timing and peak-memory measurement shared by `python -m erpd.compare` and `benchmarks/`.

It lives inside the package (not in `benchmarks/`) because `erpd.compare` is an installed module
and must not depend on the repository layout.

A measurement is described by a *case factory*: a ``"module:function"`` string plus keyword
arguments, which :func:`measure_in_subprocess` calls in a freshly spawned interpreter. Each case
gets its own process because the CPU memory numbers are process-wide (RSS): a provider that ran
earlier in the same process would leave allocator state, thread pools and compiled code behind
and skew the next one's baseline.

Peak extra memory of a call, by device:
  * CUDA: ``max_memory_allocated()`` during the call minus ``memory_allocated()`` before it
    (the caching allocator's view; what a training step would add on top of its inputs).
  * CPU: the kernel's resident-set high-water mark (``VmHWM``) is reset to the current RSS just
    before the call by writing ``5`` to ``/proc/self/clear_refs``; the peak extra is ``VmHWM``
    after the call minus ``VmRSS`` before it. This is exact (no sampling) and lets a warm-up
    call run first without its peak counting. Where ``clear_refs`` cannot be written, a thread
    samples ``/proc/self/statm`` every 0.5 ms instead, which can miss very short peaks. The
    child runs with a fixed glibc mmap threshold so freed tensors go back to the OS at once and
    the RSS before the call is what is live, not what malloc kept cached from the warm-up.
"""

from __future__ import annotations

import datetime
import functools
import gc
import importlib
import importlib.metadata
import multiprocessing as mp
import os
import platform
import random
import resource
import statistics
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from erpd import _ext

MODES = ("fwd", "fwd+bwd")

# Large enough that per-chunk buffers are still mmapped, small enough that nothing big lingers
# in malloc's free lists between calls. Setting it also turns off glibc's dynamic threshold.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}


@dataclass
class Case:
    """One provider on one problem, with its inputs already built.

    ``fwd()`` runs the forward pass the way training does (inputs require grad, so autograd
    records what the backward needs) and returns the named outputs. ``fwd_bwd()`` also
    backpropagates fixed upstream gradients and returns the same outputs, detached.
    """

    fwd: Callable[[], dict[str, torch.Tensor]]
    fwd_bwd: Callable[[], dict[str, torch.Tensor]]
    device: str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)


def autograd_case(
    forward: Callable[[], dict[str, torch.Tensor]],
    wrt: Sequence[torch.Tensor],
    upstream: dict[str, torch.Tensor],
    device: str,
    info: dict[str, Any] | None = None,
) -> Case:
    """A Case for a differentiable provider: backprop `upstream[name]` through each output that
    has one (outputs without an upstream grad, or that the provider cannot produce, are skipped)."""
    wrt = tuple(wrt)

    def fwd_bwd():
        outs = forward()
        names = [k for k in upstream if outs.get(k) is not None]
        # autograd.grad, not .backward(): nothing accumulates in .grad between repeats.
        torch.autograd.grad([outs[k] for k in names], wrt, [upstream[k] for k in names])
        return {k: v.detach() for k, v in outs.items() if v is not None}

    return Case(fwd=forward, fwd_bwd=fwd_bwd, device=device, info=info or {})


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], *, repeats: int, device: str, warmup: int = 0) -> list[float]:
    """Wall times of `repeats` calls in ms; each result is dropped before the next call so one
    call's outputs and grads never overlap the next one's peak."""
    for _ in range(warmup):
        fn()
        sync(device)
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        res = fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
        del res
    return out


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile; fine for the handful of samples a CPU run affords."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    return {
        "median": statistics.median(samples),
        "p20": quantile(samples, 0.2),
        "p80": quantile(samples, 0.8),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


# Rounds needed before a ratio gets an interval: with fewer, resampling rounds says little.
MIN_ROUNDS_FOR_INTERVAL = 5


def round_samples(result: dict[str, Any], mode: str) -> dict[int, list[float]] | None:
    """A measurement's samples of `mode` by round id (harness results pooled over rounds)."""
    ids, sizes = result.get("round_ids"), result.get("round_sizes", {}).get(mode)
    samples = result.get("times", {}).get(mode)
    if not ids or not sizes or samples is None or len(ids) != len(sizes) or sum(sizes) != len(samples):
        return None
    out, i = {}, 0
    for rid, n in zip(ids, sizes):
        out[rid] = samples[i : i + n]
        i += n
    return out


def ratio_interval(
    a: dict[str, Any], b: dict[str, Any], mode: str, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of median(a) / median(b) over the rounds both ran.

    Rounds are the independent units: calls within one process share its state (allocator,
    page cache, a neighbour's burst), and each round ran `a` and `b` one after the other. So
    rounds are resampled in pairs, the same round ids for both, and the two medians recomputed
    from the pooled calls of the resampled rounds. None with fewer than MIN_ROUNDS_FOR_INTERVAL
    rounds in common.
    """
    ra, rb = round_samples(a, mode), round_samples(b, mode)
    if ra is None or rb is None:
        return None
    common = sorted(set(ra) & set(rb))
    if len(common) < MIN_ROUNDS_FOR_INTERVAL:
        return None
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        pick = [common[rng.randrange(len(common))] for _ in common]
        stats.append(statistics.median([x for r in pick for x in ra[r]]) / statistics.median([x for r in pick for x in rb[r]]))
    tail = (1.0 - level) / 2
    return quantile(stats, tail), quantile(stats, 1.0 - tail)


# --- memory -----------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        return _status_kb("VmRSS") * 1024
    except (OSError, KeyError):
        # No procfs (macOS): ru_maxrss is a high-water mark, the best there is.
        scale = 1 if platform.system() == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _StatmSampler:
    """Fallback peak-RSS tracker for kernels that do not let us reset VmHWM."""

    def __init__(self, period_s: float = 5e-4):
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._t = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(self.period_s)

    def __enter__(self):
        self.peak = self._read()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._read())


def peak_extra_bytes(fn: Callable[[], Any], device: str) -> tuple[int, float, Any, str]:
    """Run `fn` once; return (peak extra bytes, wall ms, fn's result, method used)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = fn()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        return torch.cuda.max_memory_allocated() - base, ms, res, "torch.cuda.max_memory_allocated"
    base = rss_bytes()
    if _reset_hwm():
        t0 = time.perf_counter()
        res = fn()
        ms = (time.perf_counter() - t0) * 1e3
        return max(0, _status_kb("VmHWM") * 1024 - base), ms, res, "VmHWM reset via /proc/self/clear_refs"
    with _StatmSampler() as s:
        t0 = time.perf_counter()
        res = fn()
        ms = (time.perf_counter() - t0) * 1e3
    return max(0, s.peak - base), ms, res, "statm sampled every 0.5 ms"


# --- one measurement, in this process or a fresh one ----------------------------------------


def _resolve(factory: str) -> Callable[..., Case]:
    mod, _, fn = factory.partition(":")
    return getattr(importlib.import_module(mod), fn)


def measure(
    factory: str,
    kwargs: dict[str, Any],
    *,
    warmup: int = 1,
    repeats: int = 5,
    threads: int | None = None,
    modes: tuple[str, ...] = MODES,
) -> dict[str, Any]:
    """Build the case, warm it up, measure one fwd+bwd's peak extra memory, then time each mode.

    Never raises: failures (a backend that is missing, a compiler that is absent) come back as
    ``{"error": ...}`` so that a table can report them next to the providers that worked.
    """
    result: dict[str, Any] = {}
    stage = "setup"
    try:
        if threads:
            torch.set_num_threads(threads)
        result["threads"] = torch.get_num_threads()
        case = _resolve(factory)(**kwargs)
        result["info"] = dict(case.info)
        stage = "warm-up"
        for _ in range(warmup):
            case.fwd_bwd()
            sync(case.device)
        stage = "fwd+bwd"
        # The logits blocks the cpu backend kept from the warm-up would otherwise be resident
        # before the measured call and drop out of its peak extra memory.
        _ext.release_cpu_scratch()
        extra, ms, outs, method = peak_extra_bytes(case.fwd_bwd, case.device)
        result.update(peak_extra_bytes=extra, memory_method=method, first_measured_ms=ms)
        # numpy, not tensors: torch pickles tensors across processes as shared-memory handles
        # that die with this child.
        result["outputs"] = {k: v.detach().float().cpu().numpy() for k, v in (outs or {}).items()}
        del outs
        result["times"] = {}
        for mode in modes:
            stage = mode
            fn = case.fwd if mode == "fwd" else case.fwd_bwd
            result["times"][mode] = time_ms(fn, repeats=repeats, device=case.device, warmup=1 if mode == "fwd" else 0)
    except Exception as exc:  # noqa: BLE001  (reported, not hidden)
        msg = f"{type(exc).__name__}: {exc}".strip()
        result["error"] = f"{stage}: {msg.splitlines()[0][:300] if msg else type(exc).__name__}"
        result["traceback"] = traceback.format_exc(limit=8)
    return result


def release(device: str | torch.device) -> None:
    """Give back what a measurement in this process left cached, before the next one."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _child(conn, fn):
    try:
        conn.send(fn())
    finally:
        conn.close()


def measure_in_subprocess(factory: str, kwargs: dict[str, Any], *, timeout_s: float = 3600, **opts) -> dict[str, Any]:
    """:func:`measure` in a freshly spawned interpreter (see the module docstring for why)."""
    return in_subprocess(functools.partial(measure, factory, kwargs, **opts), timeout_s=timeout_s)


def in_subprocess(fn: Callable[[], Any], *, timeout_s: float = 3600) -> Any:
    """``fn()`` (picklable: a module-level function, or a partial of one) in a freshly spawned
    interpreter with the tables' malloc settings; its result, or ``{"error": why}`` when the child
    timed out, died or sent nothing back."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    saved = {k: os.environ.get(k) for k in _MALLOC_ENV}
    os.environ.update(_MALLOC_ENV)  # glibc reads these once, at the child's start
    try:
        proc = ctx.Process(target=_child, args=(send, fn), daemon=True)
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    send.close()
    result = None
    try:
        if recv.poll(timeout_s):
            result = recv.recv()
    except (EOFError, OSError) as exc:
        result = {"error": f"lost the child's result: {type(exc).__name__}: {exc}"}
    proc.join(timeout=30 if result is not None else 0.1)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        code = proc.exitcode
        if code is None or code == -9:
            why = f"timed out after {timeout_s:.0f} s" if code is None else "killed by SIGKILL (out of memory?)"
        else:
            why = f"child exited with code {code}"
        result = {"error": why}
    return result


# --- environment header -----------------------------------------------------------------------


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def package_version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit(path: str | Path | None = None) -> str:
    """Short HEAD of the checkout erpd was imported from, "-dirty" if tracked files differ
    (the results folder aside: a suite rewrites its tables as it goes).

    ERPD_COMMIT overrides it: a copy of the working tree on another machine (a lent GPU) may
    carry a stale .git, and the header must name the code that was measured."""
    if os.environ.get("ERPD_COMMIT"):
        return os.environ["ERPD_COMMIT"]
    cwd = Path(path) if path else Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
            cwd=cwd, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def environment(device: str, threads: int | None = None) -> dict[str, str]:
    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "threads": str(threads or torch.get_num_threads()),
        "cpu epilogue ISA": _ext.cpu_isa() or "—",
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if hasattr(os, "getloadavg"):
        # The CPU tables come from shared 2-core machines; a busy neighbour shows here.
        env["load average at the start (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return env


def fmt_mb(nbytes: float | None) -> str:
    if nbytes is None:
        return "—"
    mb = nbytes / 2**20
    return f"{mb:,.0f}" if mb >= 10 else f"{mb:.2f}"
