"""Benchmark of the policy loss computed from hidden states: fused vs unfused vs Liger vs plain PyTorch.

Script (from the repository root; on CPU one fresh process per provider and shape):

    python -m benchmarks.bench_policy_loss --shapes cpu-small,cpu-target --dtype fp32 \
        --out benchmarks/results/cpu-policy_loss.md

pytest-benchmark (CI-sized shapes; once each under the default `--benchmark-disable`):

    pytest benchmarks/bench_policy_loss.py --benchmark-enable

Every provider computes the same loss, the DAPO setting that Liger's GRPO loss also supports:
ppo with clip-higher (clip 0.2 / 0.28), token-mean over the completion mask, old log-probs one
drift away from the current ones, per-sequence advantages, no KL and no entropy bonus. Rows of a
shape's N tokens are B sequences of T = 256 (or N when N is not a multiple of 256). Providers:
  naive            plain PyTorch: materialized logits (erpd.testing.naive_linear_logprobs, with
                   entropy) + erpd.reference.policy_loss
  reference        erpd.linear_policy_loss(backend="torch"), the reference composition
  unfused-<b>      erpd.linear_logprobs(backend=b) + erpd.policy_loss(backend=b): the log-prob op's
                   backward recomputes the logits (8·N·H·V FLOPs)
  erpd-<b>         erpd.linear_policy_loss(backend=b): gradients in the forward, the backward a
                   scale (cpu: 6·N·H·V FLOPs)
  liger-grpo       Liger's LigerFusedLinearGRPOLoss(loss_type="dapo"), its chunked loss with
                   gradients in the forward (torch.compile of the loss math on CUDA only)
  matmul-floor     the 3 GEMMs of a grads-in-forward design (logits, dh, dW = 6·N·H·V FLOPs)

A second table times the pointwise erpd.policy_loss alone at B=8, T=1024 (µs per eager call):
the op must not be dominated by its dispatch and argument handling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pytest
import torch

import erpd
from erpd import _bench, backends
from erpd.testing import SHAPES, make_linear_inputs, make_policy_inputs, naive_linear_logprobs
from erpd.testing.shapes import Shape, by_name

from benchmarks import _harness
from benchmarks._harness import DTYPES, Provider

OP = "linear_policy_loss"
FLOPS_PER_NHV = 6  # grads in the forward: logits, dh, dW; nothing recomputed
FUSED = ("cpu", "cuda", "triton")
LOSS = dict(method="ppo", agg="token-mean", clip_low=0.2, clip_high=0.28)


def _interpreted(device: str) -> bool:
    return torch.device(device).type == "cpu" and backends.triton_interpreting()


_INTERP_SMOKE = ("tiny", "odd")


def _only_interp_when_interpreted(shape: Shape, device: str, smoke: bool) -> str | None:
    if not _interpreted(device):
        return None
    if shape.tier != "interp":
        return "runs under the Triton interpreter on CPU: interp-tier shapes only"
    if smoke and shape.name not in _INTERP_SMOKE:
        return f"runs under the Triton interpreter on CPU: the smoke run uses {', '.join(_INTERP_SMOKE)} only"
    return None


def _erpd_unavailable(backend: str, op: str):
    def why(shape: Shape, device: str, dtype: str, smoke: bool) -> str | None:
        dev = torch.device(device)
        reason = backends.why_unavailable(backend, dev, op) or backends.why_unavailable(backend, dev, "linear_logprobs")
        if reason:
            return reason
        return _only_interp_when_interpreted(shape, device, smoke) if backend == "triton" else None

    return why


def _liger_unavailable(shape, device, dtype, smoke):
    import importlib.util

    return None if importlib.util.find_spec("liger_kernel") else "liger-kernel is not installed (pip install liger-kernel)"


PROVIDERS: list[Provider] = [
    Provider("naive"),
    Provider("reference"),
    *[Provider(f"unfused-{b}", _erpd_unavailable(b, "policy_loss")) for b in FUSED],
    *[Provider(f"erpd-{b}", _erpd_unavailable(b, OP)) for b in FUSED],
    Provider("liger-grpo", _liger_unavailable),
    Provider("matmul-floor"),
]
PROVIDER_NAMES = [p.name for p in PROVIDERS]


def batch_shape(n: int) -> tuple[int, int]:
    t = 256 if n % 256 == 0 else n
    return n // t, t


def make_case(provider: str, shape: str, dtype: str, device: str, seed: int = 0) -> _bench.Case:
    """Inputs for `shape` (fixed seed) and the closures that run `provider` on them."""
    s = by_name(shape)
    B, T = batch_shape(s.n)
    x = make_linear_inputs((B, T), s.h, s.v, dtype=DTYPES[dtype], device=device, seed=seed)
    h, w, y = x.hidden, x.weight, x.targets
    with torch.no_grad():
        lp0, _ = erpd.linear_logprobs(h, w, y, backend="auto" if torch.device(device).type == "cuda" else "torch")
    g = torch.Generator().manual_seed(seed + 1)
    old = (lp0.float().cpu() + torch.randn(B, T, generator=g) * 0.3).to(device)
    adv = torch.randn(B, generator=g).to(device)
    lengths = (torch.rand(B, generator=g) * T * 0.5 + T * 0.5).long().clamp(1, T)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    info = {"shape": s.id, "dtype": dtype, "provider": provider, "B": B, "T": T}
    upstream = {"loss": torch.ones((), device=device)}

    if provider == "matmul-floor":
        hd, wd = h.detach().reshape(B * T, s.h), w.detach()
        z = torch.empty(B * T, s.v, dtype=hd.dtype, device=device)
        dh, dw = torch.empty_like(hd), torch.empty_like(wd)

        def fwd():
            torch.mm(hd, wd.t(), out=z)
            return {}

        def fwd_bwd():
            torch.mm(hd, wd.t(), out=z)  # logits
            torch.mm(z, wd, out=dh)  # dh = dz W  (z stands in for dz)
            torch.mm(z.t(), hd, out=dw)  # dW = dz^T h
            return {}

        return _bench.Case(fwd=fwd, fwd_bwd=fwd_bwd, device=device, info=info)

    if provider == "naive":
        def forward():
            lp, ent = naive_linear_logprobs(h, w, y)
            loss, _ = erpd.reference.policy_loss(lp, old, adv, mask, entropy=ent, **LOSS)
            return {"loss": loss}
    elif provider == "reference":
        def forward():
            return {"loss": erpd.linear_policy_loss(h, w, y, old, adv, mask, backend="torch", **LOSS)[0]}
    elif provider.startswith("unfused-"):
        b = provider[len("unfused-"):]

        def forward():
            lp, ent = erpd.linear_logprobs(h, w, y, with_entropy=True, backend=b)
            return {"loss": erpd.policy_loss(lp, old, adv, mask, entropy=ent, backend=b, **LOSS)[0]}
    elif provider.startswith("erpd-"):
        b = provider[len("erpd-"):]

        def forward():
            return {"loss": erpd.linear_policy_loss(h, w, y, old, adv, mask, backend=b, **LOSS)[0]}
    elif provider == "liger-grpo":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", epsilon_low=0.2,
                                       epsilon_high=0.28, compiled=torch.device(device).type == "cuda")
        m = mask.long()

        def forward():
            return {"loss": mod(h, w, y, m, adv, old_per_token_logps=old)[0]}
    else:
        raise ValueError(f"unknown provider {provider!r}; known: {PROVIDER_NAMES}")
    return _bench.autograd_case(forward, (h, w), upstream, device, info)


# --- pytest-benchmark: CI-sized shapes ------------------------------------------------------

SMOKE_SHAPES = [s for s in SHAPES if s.tier == "interp" or s.name == "smollm-vocab"]


@pytest.mark.parametrize("mode", _bench.MODES)
@pytest.mark.parametrize("shape", SMOKE_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_policy_loss(benchmark, provider: Provider, shape: Shape, mode: str):
    device = _harness.default_device()
    reason = provider.unavailable(shape, device, "fp32", benchmark.disabled)
    if reason:
        pytest.skip(f"{provider.name}: {reason}")
    case = make_case(provider.name, shape.name, "fp32", device)
    _harness.bench_case(benchmark, case, mode, group=f"{OP} {shape.id} {mode}")


# --- the pointwise op's eager cost ------------------------------------------------------------


def pointwise_overhead(device: str, repeats: int = 200, b: int = 8, t: int = 1024) -> list[str]:
    """Markdown rows: µs per eager erpd.policy_loss call (fwd, fwd+bwd) for each backend here, with
    torch's default thread count and with one thread (the reference's many small ops pay for
    the OpenMP pool on a busy machine)."""
    x = make_policy_inputs(b, t, seed=0, device=device)
    lp = x.logprobs.detach().nan_to_num(-1.0).requires_grad_()
    old = x.old_logprobs.nan_to_num(-1.0)
    rows = []

    def timed(fn) -> float:
        for _ in range(20):
            fn()
        samples = []
        for _ in range(7):
            _bench.sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            _bench.sync(device)
            samples.append((time.perf_counter() - t0) / repeats * 1e6)
        return statistics.median(samples)

    names = [n for n in ("torch", "cpu", "cuda", "triton") if n == "torch" or backends.why_unavailable(n, torch.device(device), "policy_loss") is None]
    if _interpreted(device):
        names = [n for n in names if n != "triton"]  # interpreter timings mean nothing
    default_threads = torch.get_num_threads()
    try:
        for threads in dict.fromkeys((default_threads, 1)):
            torch.set_num_threads(threads)
            for name in names:
                for validate in (None, False):
                    def fwd():
                        return erpd.policy_loss(lp, old, x.advantages, x.mask, backend=name, validate=validate, **LOSS)

                    def fwd_bwd():
                        loss, _ = fwd()
                        torch.autograd.grad(loss, lp)

                    label = "default value checks" if validate is None else "validate=False"
                    rows.append(f"| {name} | {threads} | {label} | {timed(fwd):.0f} | {timed(fwd_bwd):.0f} |")
    finally:
        torch.set_num_threads(default_threads)
    return rows


def pointwise_section(device: str) -> str:
    over = pointwise_overhead(device)
    return (
        f"\n### erpd.policy_loss alone, B=8, T=1024 ({device})\n\n"
        "µs per eager call (median of 7 × 200 calls, in the script's own process); `torch` is the reference "
        "implementation. Default value checks (mask 0/1, no NaN at valid positions) run on CPU tensors only.\n\n"
        "| backend | threads | checks | fwd µs | fwd+bwd µs |\n|---|--:|---|--:|--:|\n" + "\n".join(over) + "\n"
    )


# --- script -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_policy_loss", description=__doc__.split("\n\n")[0])
    device0 = _harness.default_device()
    default_shapes = "cpu-small,cpu-target" if device0 == "cpu" else "gpu"
    _harness.add_cli_args(ap, default_shapes=default_shapes, provider_names=PROVIDER_NAMES)
    ap.add_argument("--pointwise-only", action="store_true",
                    help="only time the pointwise erpd.policy_loss (B=8, T=1024); --out gets that section alone")
    args = ap.parse_args(argv)
    device = args.device or device0
    if args.pointwise_only:
        env = _bench.environment(device, args.threads)
        env["command"] = "python -m benchmarks.bench_policy_loss " + " ".join(argv)
        text = "## erpd.policy_loss eager cost\n\n" + "".join(f"- **{k}**: {v}\n" for k, v in env.items())
        text += pointwise_section(device)
        if hasattr(os, "getloadavg"):
            text += "\nload average at the end (1/5/15 min): " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + "\n"
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return 0
    shapes = _harness.select_shapes(args.shapes)
    providers = _harness.pick_providers(args.providers, PROVIDERS)
    if args.providers == ap.get_default("providers"):
        dev = torch.device(device)
        # By default leave out the erpd backends this device can never run (cuda here; triton on a
        # CPU without the interpreter) instead of filling the table with them.
        providers = [
            p for p in providers
            if not (p.name.startswith(("erpd-", "unfused-")) and backends.why_unavailable(p.name.split("-", 1)[1], dev, "policy_loss"))
        ]

    env = _bench.environment(device, args.threads)
    rows = _harness.run(
        f"{__name__ if __name__ != '__main__' else 'benchmarks.bench_policy_loss'}:make_case",
        providers, shapes, device=device, dtype=args.dtype,
        warmup=args.warmup, repeats=args.repeats, threads=args.threads, rounds=args.rounds, seed=args.seed,
    )
    env.update({"liger-kernel": _bench.package_version("liger-kernel"), "command": "python -m benchmarks.bench_policy_loss " + " ".join(argv)})
    if hasattr(os, "getloadavg"):
        env["load average at the end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    if (after := _bench.git_commit()) != env["commit"]:
        env["commit"] += f" (changed to {after} during the run: rows may mix both)"
    auto = backends.resolve("auto", torch.device(device), OP)
    notes = [
        f'`backend="auto"` on {device} tensors resolves to `{auto}` in this process; '
        f'erpd.available("{device}", "{OP}") = {erpd.available(device, OP)}',
        "every provider computes the same DAPO-style loss (ppo, clip 0.2/0.28, token-mean; B sequences of T = 256 tokens "
        f"with 50–100% valid) on {args.dtype} inputs and backpropagates it into hidden and weight",
        *_harness.timing_notes(
            args, rows,
            "`fwd` is the forward with grad-requiring inputs: for the grads-in-forward providers (erpd-*, liger-grpo) "
            "it already contains the gradient work, and fwd+bwd − fwd is their whole backward",
        ),
        "matmul floor: fwd = one [N,H]×[H,V] GEMM; fwd+bwd = 3 GEMMs (logits, dh, dW) = 6·N·H·V FLOPs",
        "max abs diff: of the loss, against `naive` in the same run",
    ]
    for r in rows:
        if r.provider == "matmul-floor" and "times" in r.result:
            fb = _harness.median_ms(r, "fwd+bwd")
            notes.append(f"matmul floor on {r.shape.name}: {6 * r.shape.n * r.shape.h * r.shape.v / fb / 1e6:,.1f} GFLOP/s")
    title = f"linear_policy_loss (ppo, token-mean), {args.dtype}, {device}"
    text = _harness.render(rows, title=title, env=env, notes=notes, floor_label="matmul floor (6·N·H·V)")

    lines = []
    for shape in dict.fromkeys(r.shape for r in rows):
        me = _harness.find(rows, shape, f"erpd-{auto}")
        if me is None:
            continue
        f, fb = _harness.median_ms(me, "fwd"), _harness.median_ms(me, "fwd+bwd")
        parts = [f"backward (fwd+bwd − fwd) {fb - f:,.1f} ms of {fb:,.1f} ms"]
        for rival in ("naive", f"unfused-{auto}", "liger-grpo", "matmul-floor"):
            other = _harness.find(rows, shape, rival)
            if other is not None:
                parts.append(f"{fb / _harness.median_ms(other, 'fwd+bwd'):.2f}× {rival}")
        lines.append(f"{shape.name}: `erpd-{auto}` fwd+bwd: " + "; ".join(parts))
    if lines:
        text += "\nSummary:\n\n" + "".join(f"- {c}\n" for c in lines)

    text += pointwise_section(device)
    print(text)
    _harness.write(args.out, text, rows, env, ["python -m benchmarks.bench_policy_loss", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
