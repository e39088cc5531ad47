"""Every op's benchmark, one suite at a time: tables, CSV/JSON rows and a plot per op.

    python -m benchmarks.run --suite cpu          # cpu-small, cpu-target; fp32; 3 rounds
    python -m benchmarks.run --suite gpu          # the gpu tier of erpd/testing/shapes.py; bf16

For each op it runs that op's `bench_<op>.py` script (all providers side by side, same process
rules, same shape registry) and writes, under ``--out-dir`` (default benchmarks/results/):

  <suite>-<op>.md    the table (ms, × naive, × floor, peak memory, max abs diff vs naive)
  <suite>-<op>.json  raw samples and the environment
  <suite>-<op>.csv   one row per (provider, shape, mode): median/p20/p80 ms, effective TFLOP/s
                     on the op's declared FLOP basis, × floor (with its 95% interval over rounds
                     from 5 rounds up), peak extra MB, % of naive's memory,
                     plus op, dtype, device name, commit and date
  <suite>-<op>.png   fwd+bwd time per provider and shape, and its multiple of the matmul floor

FLOP basis (fwd+bwd, what "effective TFLOP/s" divides): linear_logprobs 8·N·H·V (logits,
recomputed logits, dh, dW); linear_kl 12·N·H·V (the teacher's GEMMs too); linear_kl_loss
(linear_kl reduced to its mean) 8·N·H·V and linear_policy_loss 6·N·H·V (their gradients are made
in the forward, so nothing is recomputed).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
from pathlib import Path

from erpd import _bench
from erpd.testing.shapes import SHAPES

OPS = {
    "linear_logprobs": "benchmarks.bench_linear_logprobs",
    "linear_kl": "benchmarks.bench_linear_kl",
    "linear_kl_loss": "benchmarks.bench_linear_kl_loss",
    "linear_policy_loss": "benchmarks.bench_policy_loss",
}
SUITES = {
    # Rounds pool samples over several passes: on a shared CPU box a burst of someone else's
    # load then spreads over providers instead of skewing one.
    "cpu": dict(shapes="cpu-small,cpu-target", dtype="fp32", repeats=3, rounds=3, warmup=1),
    "gpu": dict(shapes="gpu", dtype="bf16", repeats=10, rounds=1, warmup=2),
}
FLOOR = "matmul-floor"
BASELINE = "naive"


def _sig(ms: float) -> float:
    """A time in ms to 6 significant digits: fixed decimals would leave a 17 µs floor 3 digits,
    too few to recompute the x_floor ratio of its row from the CSV."""
    return float(f"{ms:.6g}")


def csv_rows(op: str, raw: dict, flops_per_nhv: int) -> list[dict]:
    env = raw["env"]
    shapes = {s.id: s for s in SHAPES}
    by_key = {(r["shape"], r["provider"]): r for r in raw["rows"]}
    out = []
    for r in raw["rows"]:
        shape = shapes[r["shape"]]
        flops = flops_per_nhv * shape.n * shape.h * shape.v
        base = by_key.get((r["shape"], BASELINE), {})
        floor = by_key.get((r["shape"], FLOOR), {})
        common = dict(
            op=op, provider=r["provider"], shape=shape.name, n=shape.n, h=shape.h, v=shape.v,
            dtype=raw.get("dtype", ""), device=env.get("device", ""), commit=env.get("commit", ""), date=env.get("date", ""),
        )
        if "times" not in r:
            out.append(dict(common, mode="", status=r.get("skipped") and "skipped" or "failed", note=r.get("skipped") or r.get("error", "")))
            continue
        for mode, samples in r["times"].items():
            s = _bench.summarize(samples)
            floor_ms = _bench.summarize(floor["times"][mode])["median"] if "times" in floor and mode in floor["times"] else None
            is_floor = r["provider"] == FLOOR
            ci = None if is_floor else _bench.ratio_interval(r, floor, mode)  # None without paired rounds
            row = dict(
                common, mode=mode, status="ok", median_ms=_sig(s["median"]), p20_ms=_sig(s["p20"]), p80_ms=_sig(s["p80"]),
                tflops=round(flops / s["median"] / 1e9, 2) if mode == "fwd+bwd" else "",
                x_floor=round(s["median"] / floor_ms, 3) if floor_ms else "",
                x_floor_lo=round(ci[0], 3) if ci else "",
                x_floor_hi=round(ci[1], 3) if ci else "",
                peak_extra_mb="" if is_floor else round(r["peak_extra_bytes"] / 2**20, 1),
                mem_pct_of_naive="" if is_floor or not base.get("peak_extra_bytes") else round(100 * r["peak_extra_bytes"] / base["peak_extra_bytes"], 2),
                note="",
            )
            out.append(row)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def plot(path: Path, op: str, rows: list[dict], title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    ok = [r for r in rows if r["status"] == "ok" and r["mode"] == "fwd+bwd"]
    if not ok:
        return "nothing measured: no plot"
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        xs, ms, xf = [], [], []
        for j, s in enumerate(shapes):
            hit = [r for r in ok if r["provider"] == p and r["shape"] == s]
            if hit:
                xs.append(j + i * width)
                ms.append(hit[0]["median_ms"])
                xf.append(hit[0]["x_floor"] or float("nan"))
        axes[0].bar(xs, ms, width, label=p)
        axes[1].bar(xs, xf, width, label=p)
    for ax, label in ((axes[0], "fwd+bwd ms (median)"), (axes[1], "fwd+bwd × matmul floor")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=15)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of: " + ", ".join(OPS))
    ap.add_argument("--shapes", default=None, help="override the suite's shapes (names or tiers)")
    ap.add_argument("--providers", default=None, help="override every op's providers (names as in its bench module)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--label", default="", help="suffix of the output names, <suite>-<op>-<label>.* (e.g. the shapes of a partial run)")
    args = ap.parse_args(argv)
    cfg = dict(SUITES[args.suite])
    for k in ("shapes", "repeats", "rounds"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise SystemExit(f"unknown op(s) {unknown}; known: {', '.join(OPS)}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if args.suite == "gpu" else "cpu"
    status = 0
    for op in ops:
        mod = importlib.import_module(OPS[op])
        md = out_dir / (f"{args.suite}-{op}" + (f"-{args.label}" if args.label else "") + ".md")
        bench_argv = [
            "--shapes", cfg["shapes"], "--dtype", cfg["dtype"], "--device", device, "--repeats", str(cfg["repeats"]),
            "--rounds", str(cfg["rounds"]), "--warmup", str(cfg["warmup"]), "--out", str(md),
        ]
        if args.providers:
            bench_argv += ["--providers", ",".join(p for p in args.providers.split(",") if p in mod.PROVIDER_NAMES)]
        print(f"=== {op}: python -m {OPS[op]} {' '.join(bench_argv)}", file=sys.stderr, flush=True)
        try:
            mod.main(bench_argv)
        except Exception as exc:  # noqa: BLE001  (one op failing must not lose the others' results)
            print(f"{op}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
            continue
        raw = json.loads(md.with_suffix(".json").read_text())
        raw["dtype"] = cfg["dtype"]
        rows = csv_rows(op, raw, mod.FLOPS_PER_NHV)
        write_csv(md.with_suffix(".csv"), rows)
        why = plot(md.with_suffix(".png"), op, rows, f"{op}, {cfg['dtype']}, {raw['env'].get('device', device)} ({raw['env'].get('commit', '')})")
        print(f"wrote {md.with_suffix('.csv')}" + (f" ({why})" if why else f" and {md.with_suffix('.png')}"), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
