"""Benchmark of `erpd.linear_kl` (forward KL(T‖S), fused teacher) against the ways people compute it today.

Script (from the repository root; on CPU one fresh process per provider and shape):

    python -m benchmarks.bench_linear_kl --shapes cpu-small,cpu-target --dtype fp32 \
        --out benchmarks/results/cpu-linear_kl.md

pytest-benchmark (CI-sized shapes; once each under the default `--benchmark-disable`):

    pytest benchmarks/bench_linear_kl.py --benchmark-enable

Every provider gets the student (hidden [N,H], weight [V,H]) and a teacher of the same sizes
(its own hidden states and head), computes the per-token forward KL(T‖S) and backpropagates a
fixed random upstream gradient into the student's hidden and weight:
  naive          plain PyTorch: both logits materialized in the input dtype, fp32 softmaxes
                 (erpd.testing.naive_linear_kl)
  reference      erpd.reference.linear_kl, fp32 eager (the `torch` backend)
  compiled       torch.compile of the reference
  liger-jsd      LigerFusedLinearJSD(jsd_beta=0): the same KL, reduced to its mean (Liger's
                 JSD kernel is Triton: CUDA, or TRITON_INTERPRET=1 on the interp shapes)
  erpd-<b>       erpd.linear_kl(backend=b) for each fused backend b this process can run
  matmul-floor   the GEMMs alone: fwd = student and teacher logits; fwd+bwd = 6 GEMMs (both
                 logits, both recomputed, dh, dW) = 12·N·H·V FLOPs
"""

from __future__ import annotations

import sys

import pytest
import torch

import erpd
from erpd import _bench, backends
from erpd.testing import SHAPES, make_kl_teacher, make_linear_inputs, naive_linear_kl
from erpd.testing.shapes import Shape, by_name

from benchmarks import _harness
from benchmarks._harness import DTYPES, Provider

OP = "linear_kl"
FLOPS_PER_NHV = 12  # fwd+bwd: student and teacher logits, both recomputed, dh, dW (teacher H = student H)
FUSED = ("cpu", "cuda", "triton")

PROVIDERS: list[Provider] = [
    Provider("naive"),
    Provider("reference"),
    Provider("compiled", _harness.compiled_unavailable),
    Provider("liger-jsd", _harness.liger_triton_unavailable),
    *[Provider(f"erpd-{b}", _harness.erpd_unavailable(b, OP)) for b in FUSED],
    Provider("matmul-floor"),
]
PROVIDER_NAMES = [p.name for p in PROVIDERS]


def make_inputs(s: Shape, dtype: str, device: str, seed: int = 0):
    """The student's (hidden, weight, targets) and the fused teacher's keyword arguments for `s`."""
    x = make_linear_inputs(s.n, s.h, s.v, dtype=DTYPES[dtype], device=device, seed=seed)
    return x.hidden, x.weight, x.targets, make_kl_teacher(x, "fused", closeness=0.5, seed=seed + 1)


def make_case(provider: str, shape: str, dtype: str, device: str, seed: int = 0) -> _bench.Case:
    """Inputs for `shape` (fixed seed) and the closures that run `provider` on them."""
    s = by_name(shape)
    h, w, y, teacher = make_inputs(s, dtype, device, seed)
    th, tw = teacher["teacher_hidden"], teacher["teacher_weight"]
    upstream = {"kl": torch.randn(s.n, generator=torch.Generator().manual_seed(seed + 2)).to(device)}
    info = {"shape": s.id, "dtype": dtype, "provider": provider}

    if provider == "matmul-floor":
        hd, wd = h.detach(), w.detach()
        zs = torch.empty(s.n, s.v, dtype=hd.dtype, device=device)
        zt = torch.empty_like(zs)
        dh, dw = torch.empty_like(hd), torch.empty_like(wd)

        def fwd():
            torch.mm(hd, wd.t(), out=zs)
            torch.mm(th, tw.t(), out=zt)
            return {}

        def fwd_bwd():
            for _ in range(2):  # forward, then recomputed in the backward
                torch.mm(hd, wd.t(), out=zs)
                torch.mm(th, tw.t(), out=zt)
            torch.mm(zs, wd, out=dh)  # zs stands in for dz: same shape, same cost
            torch.mm(zs.t(), hd, out=dw)
            return {}

        return _bench.Case(fwd=fwd, fwd_bwd=fwd_bwd, device=device, info=info)

    if provider == "naive":
        def forward():
            return {"kl": naive_linear_kl(h, w, y, **teacher)}
    elif provider == "reference":
        def forward():
            return {"kl": erpd.reference.linear_kl(h, w, y, **teacher)}
    elif provider == "compiled":
        compiled = torch.compile(erpd.reference.linear_kl)

        def forward():
            return {"kl": compiled(h, w, y, **teacher)}
    elif provider == "liger-jsd":
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        loss = LigerFusedLinearJSD(jsd_beta=0.0)
        upstream = {"mean_kl": torch.ones((), device=device)}

        def forward():
            return {"mean_kl": loss(h, w, th, tw, y)}
    elif provider.startswith("erpd-") and provider[5:] in FUSED:
        backend = provider[5:]

        def forward():
            return {"kl": erpd.linear_kl(h, w, y, backend=backend, **teacher)}
    else:
        raise ValueError(f"unknown provider {provider!r}; known: {PROVIDER_NAMES}")
    return _bench.autograd_case(forward, (h, w), upstream, device, info)


# --- pytest-benchmark: CI-sized shapes ------------------------------------------------------

SMOKE_SHAPES = [s for s in SHAPES if s.tier == "interp" or s.name == "smollm-vocab"]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Liger's masked -inf lanes
@pytest.mark.parametrize("mode", _bench.MODES)
@pytest.mark.parametrize("shape", SMOKE_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_linear_kl(benchmark, provider: Provider, shape: Shape, mode: str):
    device = _harness.default_device()
    reason = provider.unavailable(shape, device, "fp32", benchmark.disabled)
    if reason:
        pytest.skip(f"{provider.name}: {reason}")
    case = make_case(provider.name, shape.name, "fp32", device)
    _harness.bench_case(benchmark, case, mode, group=f"{OP} {shape.id} {mode}")


# --- script -----------------------------------------------------------------------------------


def summary(rows, auto: str, floor_basis: str = "12·N·H·V") -> list[str]:
    """One line per shape: the `auto` backend against naive, the floor, liger-jsd and compiled."""
    out = []
    fused = f"erpd-{auto}"
    for shape in dict.fromkeys(r.shape for r in rows):
        me, naive, floor = (_harness.find(rows, shape, p) for p in (fused, "naive", "matmul-floor"))
        if me is None or "times" not in me.result:
            continue
        fb = _harness.median_ms(me, "fwd+bwd")
        parts = []
        if naive is not None and "times" in naive.result:
            parts.append(f"{fb / _harness.median_ms(naive, 'fwd+bwd'):.2f}× naive's time")
            if naive.result["peak_extra_bytes"] >= 2**20:
                parts.append(
                    f"{me.result['peak_extra_bytes'] / 2**20:,.0f} MB peak extra memory = "
                    f"{me.result['peak_extra_bytes'] / naive.result['peak_extra_bytes']:.1%} of naive's "
                    f"{naive.result['peak_extra_bytes'] / 2**20:,.0f} MB (two [N,V] fp32 logits alone: {2 * shape.naive_logits_bytes / 2**20:,.0f} MB)"
                )
        if floor is not None and "times" in floor.result:
            parts.append(f"{fb / _harness.median_ms(floor, 'fwd+bwd'):.2f}× the matmul floor ({floor_basis})")
        for rival in ("liger-jsd", "compiled"):
            other = _harness.find(rows, shape, rival)
            if other is not None and "times" in other.result:
                x = fb / _harness.median_ms(other, "fwd+bwd")
                parts.append(f"{x:.2f}× {rival} ({'faster' if x < 1 else 'slower'})")
        out.append(f"{shape.name}: `backend=\"auto\"` ({fused}) fwd+bwd: " + "; ".join(parts))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, device, rows, env = _harness.script("benchmarks.bench_linear_kl", OP, PROVIDERS, argv, __doc__.split("\n\n")[0])
    auto = backends.resolve("auto", torch.device(device), OP)
    notes = [
        f'`backend="auto"` on {device} tensors resolves to `{auto}` in this process; '
        f'erpd.available("{device}", op="{OP}") = {erpd.available(device, op=OP)}',
        f"every provider computes the per-token forward KL(T‖S) with a fused teacher of the student's sizes on {args.dtype} "
        "inputs (except `liger-jsd`: its mean) and backpropagates a fixed random upstream gradient into the student's hidden and weight",
        *_harness.timing_notes(args, rows),
        "matmul floor: fwd = the student's and the teacher's [N,H]×[H,V] GEMMs; fwd+bwd = 6 GEMMs = 12·N·H·V FLOPs",
        "max abs diff: against `naive` in the same run",
    ]
    text = _harness.render(rows, title=f"linear_kl (forward KL, fused teacher), {args.dtype}, {device}", env=env, notes=notes)
    lines = summary(rows, auto)
    if lines:
        text += "\nSummary:\n\n" + "".join(f"- {c}\n" for c in lines)
    print(text)
    _harness.write(args.out, text, rows, env, ["python -m benchmarks.bench_linear_kl", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
