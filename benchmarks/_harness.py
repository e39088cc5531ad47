"""Provider plumbing, the side-by-side runner and the markdown table, for every `bench_<op>.py`.

An op's benchmark module supplies:
  * a list of :class:`Provider` (name, and why it cannot run on a given shape/device/dtype);
  * ``make_case(provider, shape, dtype, device, seed) -> erpd._bench.Case``, a module-level
    function so that a spawned child can import and call it by name;
and calls :func:`run` + :func:`render` (script) or :func:`bench_case` (pytest-benchmark).

Ratios are always against providers measured in the same run, on the same machine, one fresh
process each: ``baseline`` (the naive PyTorch code) and ``floor`` (the bare GEMMs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from erpd import _bench, backends
from erpd._bench import MODES, Case, autograd_case  # noqa: F401  (re-exported for bench_<op>.py)
from erpd.testing.shapes import SHAPES, Shape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Provider:
    name: str
    # (shape, device, dtype name, for_smoke_test) -> None if it can run, else the reason.
    unavailable: Callable[[Shape, str, str, bool], str | None] = lambda *_: None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def select_shapes(spec: str) -> list[Shape]:
    """Comma-separated shape names and/or tier names (`interp`, `cpu`, `gpu`) from the registry."""
    out: list[Shape] = []
    for tok in filter(None, (t.strip() for t in spec.split(","))):
        hits = [s for s in SHAPES if tok in (s.name, s.tier)]
        if not hits:
            known = ", ".join(s.name for s in SHAPES)
            raise SystemExit(f"unknown shape or tier {tok!r}; known shapes: {known}; tiers: interp, cpu, gpu")
        out += [s for s in hits if s not in out]
    return out


# --- availability rules shared by every bench_<op>.py -------------------------------------------


def interpreted(device: str) -> bool:
    return torch.device(device).type == "cpu" and backends.triton_interpreting()


# The interpreter costs seconds per call even on interp shapes; the one-shot smoke run keeps it
# to the two smallest so that `python -m pytest` (which turns the interpreter on) stays fast.
INTERP_SMOKE = ("tiny", "odd")


def only_interp_when_interpreted(shape: Shape, device: str, smoke: bool) -> str | None:
    if not interpreted(device):
        return None
    if shape.tier != "interp":
        return "runs under the Triton interpreter on CPU: interp-tier shapes only"
    if smoke and shape.name not in INTERP_SMOKE:
        return f"runs under the Triton interpreter on CPU: the smoke run uses {', '.join(INTERP_SMOKE)} only"
    return None


def erpd_unavailable(backend: str, op: str) -> Callable[[Shape, str, str, bool], str | None]:
    def why(shape: Shape, device: str, dtype: str, smoke: bool) -> str | None:
        reason = backends.why_unavailable(backend, torch.device(device), op)
        if reason:
            return reason
        return only_interp_when_interpreted(shape, device, smoke) if backend == "triton" else None

    return why


def compiled_unavailable(shape: Shape, device: str, dtype: str, smoke: bool) -> str | None:
    if smoke and os.environ.get("ERPD_BENCH_COMPILE") != "1":
        return (
            "torch.compile takes 20-30 s per shape on a cold 2-core CPU: skipped in the one-shot smoke "
            "run (set ERPD_BENCH_COMPILE=1 or pass --benchmark-enable); the script always measures it"
        )
    return None


def liger_installed() -> str | None:
    return None if importlib.util.find_spec("liger_kernel") else "liger-kernel is not installed (pip install liger-kernel)"


def liger_triton_unavailable(shape: Shape, device: str, dtype: str, smoke: bool) -> str | None:
    """Liger providers whose kernels are Triton only: CUDA, or the interpreter on interp shapes."""
    if (why := liger_installed()) is not None:
        return why
    if torch.device(device).type == "cuda":
        return None
    if not backends.triton_interpreting():
        return "Liger's kernels here are Triton-only: needs CUDA, or TRITON_INTERPRET=1 (interp-tier shapes)"
    return only_interp_when_interpreted(shape, device, smoke)


def trl_fused_head_unavailable(shape: Shape, device: str, dtype: str, smoke: bool) -> str | None:
    """TRL's chunked log-prob kernel (the fused LM head of TRL >= 1.15): torch GEMM tiles folded by
    Triton on CUDA, by torch ops on CPU."""
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install -r requirements/test-clients.txt)"
    if importlib.util.find_spec("trl.kernels.chunked_logprob") is None:
        return "this TRL has no trl.kernels.chunked_logprob (the fused LM head of TRL >= 1.15)"
    return None


# --- pytest-benchmark -------------------------------------------------------------------------


def bench_case(benchmark, case: Case, mode: str, group: str) -> dict[str, torch.Tensor]:
    """Time one mode of `case` with pytest-benchmark (or, with --benchmark-disable, run it once)."""
    fn = case.fwd if mode == "fwd" else case.fwd_bwd

    def call():
        out = fn()
        _bench.sync(case.device)
        return out

    benchmark.group = group
    benchmark.extra_info.update(case.info)
    out = benchmark(call)
    for name, t in out.items():
        if t is not None:
            assert torch.isfinite(t.detach()).all(), f"{name} is not finite"
    return out


# --- the script: run, render, write ---------------------------------------------------------


@dataclass
class Row:
    shape: Shape
    provider: str
    result: dict[str, Any]  # from erpd._bench.measure, or {"skipped": reason}


def run(
    factory: str,
    providers: Sequence[Provider],
    shapes: Sequence[Shape],
    *,
    device: str,
    dtype: str,
    warmup: int,
    repeats: int,
    threads: int | None,
    rounds: int = 1,
    seed: int = 0,
    isolate: bool | None = None,
    log=sys.stderr,
) -> list[Row]:
    """Measure every (shape, provider) in its own fresh process, `rounds` times over.

    ``isolate=None`` means a fresh process per measurement on CPU, where the memory figure is
    the process's resident set and anything an earlier provider left behind would count, and
    this process on CUDA, where the figure comes from the caching allocator's counters (reset
    per call) and a fresh process would only add seconds of CUDA start-up per row.

    Rounds go over all providers before repeating any, and their samples are pooled: on a
    shared machine a burst of someone else's load then lands on several providers instead of
    skewing one of them, which keeps the ratios honest.
    """
    in_process = torch.device(device).type == "cuda" if isolate is None else not isolate
    results: dict[tuple[str, str], dict[str, Any]] = {}
    order: list[tuple[Shape, str]] = []
    for rnd in range(rounds):
        for shape in shapes:
            for p in providers:
                key = (shape.name, p.name)
                if rnd == 0:
                    order.append((shape, p.name))
                elif "times" not in results[key]:
                    continue  # skipped or failed: once is enough
                tag = f"[{shape.name}]" + (f" round {rnd + 1}/{rounds}" if rounds > 1 else "")
                reason = p.unavailable(shape, device, dtype, False)
                if reason:
                    results[key] = {"skipped": reason}
                    print(f"{tag} {p.name}: skipped ({reason})", file=log, flush=True)
                    continue
                print(f"{tag} {p.name} ...", end=" ", file=log, flush=True)
                kwargs = dict(provider=p.name, shape=shape.name, dtype=dtype, device=device, seed=seed)
                opts = dict(warmup=warmup, repeats=repeats, threads=threads)
                if in_process:
                    res = _bench.measure(factory, kwargs, **opts)
                    _bench.release(device)
                else:
                    res = _bench.measure_in_subprocess(factory, kwargs, **opts)
                if "error" in res:
                    print(f"FAILED: {res['error']}", file=log, flush=True)
                else:
                    print(
                        "  ".join(f"{m} {_bench.summarize(v)['median']:.1f} ms" for m, v in res["times"].items())
                        + f"  peak extra {_bench.fmt_mb(res['peak_extra_bytes'])} MB",
                        file=log, flush=True,
                    )
                if rnd == 0:
                    results[key] = res
                    if "times" in res:
                        res["round_ids"] = [0]
                        res["round_sizes"] = {m: [len(v)] for m, v in res["times"].items()}
                elif "error" in res:
                    results[key].setdefault("round_errors", []).append(res["error"])
                else:
                    prev = results[key]
                    prev["round_ids"].append(rnd)
                    for m, v in res["times"].items():
                        prev["times"][m] += v
                        prev["round_sizes"][m].append(len(v))
                    prev.setdefault("peak_extra_bytes_rounds", [prev["peak_extra_bytes"]]).append(res["peak_extra_bytes"])
                    prev["peak_extra_bytes"] = int(statistics.median(prev["peak_extra_bytes_rounds"]))
    return [Row(shape, name, results[(shape.name, name)]) for shape, name in order]


def _ms(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def _time_cell(stats: dict[str, float] | None) -> str:
    if not stats:
        return "—"
    if stats["n"] == 1:
        return _ms(stats["median"])
    return f"{_ms(stats['median'])} ({_ms(stats['p20'])}–{_ms(stats['p80'])})"


def _ratio(a: float | None, b: float | None, fmt: str = "{:.2f}×") -> str:
    return "—" if a is None or not b else fmt.format(a / b)


def _floor_cell(row: Row, floor: Row | None, mode: str = "fwd+bwd") -> str:
    """× floor, with its 95% interval over paired rounds in brackets where there are enough."""
    cell = _ratio(median_ms(row, mode), median_ms(floor, mode))
    if floor is None or floor is row:
        return cell
    ci = _bench.ratio_interval(row.result, floor.result, mode)
    return cell if ci is None else f"{cell} ({ci[0]:.2f}–{ci[1]:.2f})"


def median_ms(row: Row | None, mode: str) -> float | None:
    if row is None or "times" not in row.result or mode not in row.result["times"]:
        return None
    return _bench.summarize(row.result["times"][mode])["median"]


def find(rows: Sequence[Row], shape: Shape, provider: str) -> Row | None:
    ok = [r for r in rows if r.shape == shape and r.provider == provider and "times" in r.result]
    return ok[0] if ok else None


def max_abs_diff(row: Row, ref: Row | None) -> dict[str, float]:
    if ref is None or row is ref or "outputs" not in row.result:
        return {}
    out = {}
    for k, v in row.result["outputs"].items():
        r = ref.result["outputs"].get(k)
        if r is not None and r.shape == v.shape:
            out[k] = float(abs(v.astype("float64") - r.astype("float64")).max()) if v.size else 0.0
    return out


def render(
    rows: Sequence[Row],
    *,
    title: str,
    env: dict[str, str],
    notes: Sequence[str] = (),
    baseline: str = "naive",
    floor: str = "matmul-floor",
    floor_label: str = "matmul floor",
    short_names: dict[str, str] | None = None,
) -> str:
    """Markdown: environment bullets, one table (rows grouped by shape), footnotes."""
    short_names = short_names or {}
    lines = [f"## {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in env.items()]
    lines += [f"- {n}" for n in notes]
    lines += [
        "",
        f"| shape | provider | fwd ms | fwd+bwd ms | fwd × {baseline} | fwd+bwd × {baseline} | fwd+bwd × floor "
        f"| peak extra MB (fwd+bwd) | mem % of {baseline} | max abs diff vs {baseline} |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    footnotes: list[str] = []
    for shape in dict.fromkeys(r.shape for r in rows):
        base, flo = find(rows, shape, baseline), find(rows, shape, floor)
        base_mem = base.result["peak_extra_bytes"] if base else None
        for r in (r for r in rows if r.shape == shape):
            label = floor_label if r.provider == floor else r.provider
            head = f"| {shape.name} (N={shape.n}, H={shape.h}, V={shape.v}) | {label} "
            if "times" not in r.result:
                why = r.result.get("skipped") or r.result.get("error", "?")
                kind = "skipped" if "skipped" in r.result else "failed"
                footnotes.append(f"{label} on {shape.name}: {why}")
                lines.append(head + f"| {kind} [{len(footnotes)}] | | | | | | | |")
                continue
            t = {m: _bench.summarize(v) for m, v in r.result["times"].items()}
            fwd, fb = median_ms(r, "fwd"), median_ms(r, "fwd+bwd")
            if r.provider == floor:
                # The floor's GEMMs write into preallocated buffers: its memory is not comparable.
                mem, mem_pct = "—", "—"
            else:
                mem = _bench.fmt_mb(r.result["peak_extra_bytes"])
                mem_pct = _ratio(r.result["peak_extra_bytes"], base_mem, "{:.1%}")
            diffs = max_abs_diff(r, base)
            diff = ", ".join(f"{short_names.get(k, k)} {v:.1e}" for k, v in diffs.items()) or "—"
            lines.append(
                head
                + f"| {_time_cell(t.get('fwd'))} | {_time_cell(t.get('fwd+bwd'))} "
                + f"| {_ratio(fwd, median_ms(base, 'fwd'))} | {_ratio(fb, median_ms(base, 'fwd+bwd'))} "
                + f"| {_floor_cell(r, flo)} | {mem} | {mem_pct} | {diff} |"
            )
    if footnotes:
        lines += ["", *[f"[{i}] {n}" for i, n in enumerate(footnotes, 1)]]
    return "\n".join(lines) + "\n"


def add_cli_args(ap: argparse.ArgumentParser, *, default_shapes: str, provider_names: Sequence[str]) -> None:
    ap.add_argument("--shapes", default=default_shapes, help=f"shape names or tiers from erpd/testing/shapes.py (default: {default_shapes})")
    ap.add_argument("--providers", default=",".join(provider_names), help="comma-separated subset of: " + ", ".join(provider_names))
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed fwd+bwd calls before measuring (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per mode (default 5)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep, pooling samples (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the table here (and the raw samples to <out>.json)")


def pick_providers(spec: str, providers: Sequence[Provider]) -> list[Provider]:
    by_name = {p.name: p for p in providers}
    wanted = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; known: {', '.join(by_name)}")
    return [by_name[w] for w in by_name if w in wanted]  # registry order: baseline first


def write(out: str | None, text: str, rows: Sequence[Row], env: dict[str, str], argv: Sequence[str]) -> None:
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    raw = {
        "command": " ".join(argv),
        "env": env,
        "rows": [
            {
                "shape": r.shape.id,
                "provider": r.provider,
                **{k: v for k, v in r.result.items() if k not in ("outputs", "traceback")},
            }
            for r in rows
        ],
    }
    path.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print(f"wrote {path} and {path.with_suffix('.json')}", file=sys.stderr)


# --- the script's common run ------------------------------------------------------------------


def script(module: str, op: str, providers: Sequence[Provider], argv: list[str], description: str):
    """Parse the common CLI, run every provider × shape side by side, and return
    ``(args, device, rows, env)``; `module` is the bench module's import name (children import
    ``module:make_case``)."""
    prog = f"python -m {module}"
    ap = argparse.ArgumentParser(prog=prog, description=description)
    device0 = default_device()
    add_cli_args(ap, default_shapes="cpu-small,cpu-target" if device0 == "cpu" else "gpu", provider_names=[p.name for p in providers])
    args = ap.parse_args(argv)
    device = args.device or device0
    shapes = select_shapes(args.shapes)
    chosen = pick_providers(args.providers, providers)
    if args.providers == ap.get_default("providers"):
        # By default leave out backends this device can never run (erpd-cuda on a CPU box, ...),
        # instead of filling the table with them; asked for by name, they show as skipped.
        dev = torch.device(device)
        chosen = [p for p in chosen if not (p.name.startswith("erpd-") and backends.why_unavailable(p.name[5:], dev, op))]
    # Taken before the run: the header should name the code that was measured.
    env = _bench.environment(device, args.threads)
    rows = run(
        f"{module}:make_case", chosen, shapes, device=device, dtype=args.dtype,
        warmup=args.warmup, repeats=args.repeats, threads=args.threads, rounds=args.rounds, seed=args.seed,
    )
    env.update({"liger-kernel": _bench.package_version("liger-kernel"), "command": f"{prog} " + " ".join(argv)})
    if hasattr(os, "getloadavg"):
        env["load average at the end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    if (after := _bench.git_commit()) != env["commit"]:
        env["commit"] += f" (changed to {after} during the run: rows may mix both)"
    return args, device, rows, env


def timing_notes(args, rows: Sequence[Row], fwd_meaning: str = "`fwd` is the forward with grad-requiring inputs (what training runs), `fwd+bwd` adds the backward") -> list[str]:
    """The notes every table carries: how times and memory were taken."""
    methods = sorted({r.result["memory_method"] for r in rows if "memory_method" in r.result})
    where = "one process for all (CUDA allocator counters reset per call)" if "torch.cuda" in " ".join(methods) else "a fresh process per provider"
    notes = [
        f"times: median of {args.repeats} calls × {args.rounds} round(s) (p20–p80 in brackets), each round {where}, "
        f"after {args.warmup} warm-up fwd+bwd; {fwd_meaning}",
        "peak extra memory: one fwd+bwd, high-water mark minus what was resident just before "
        f"(inputs, upstream grads, warm-up done); includes the returned grads (dW alone is V·H·{DTYPES[args.dtype].itemsize} B); "
        f"measured by {', '.join(methods) or '—'}",
    ]
    if args.rounds >= _bench.MIN_ROUNDS_FOR_INTERVAL:
        notes.append(
            "× floor (a–b): a 95% percentile bootstrap interval of the ratio of medians, resampling rounds "
            "(each round ran every provider once, one after the other), the same rounds for both sides"
        )
    return notes
