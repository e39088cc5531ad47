"""Benchmark of `erpd.linear_kl` reduced to a loss (the mean forward KL(T‖S) over the tokens, fused
teacher), whose gradients are computed in the forward, against the ways people compute it today.

Script (from the repository root; on CPU one fresh process per provider and shape):

    python -m benchmarks.bench_linear_kl_loss --shapes cpu-small,cpu-target --dtype fp32 \
        --out benchmarks/results/cpu-linear_kl_loss.md

pytest-benchmark (CI-sized shapes; once each under the default `--benchmark-disable`):

    pytest benchmarks/bench_linear_kl_loss.py --benchmark-enable

Every provider gets the inputs of `bench_linear_kl` (student hidden [N,H], weight [V,H], a teacher
of the same sizes with its own hidden states and head), computes the mean over the tokens of the
forward KL(T‖S), the loss of distillation trainers (TRL's GKD, Liger's JSD, the ERPD trainer's KL
signals), and backpropagates it into the student's hidden and weight:
  naive          plain PyTorch: both logits materialized in the input dtype, fp32 softmaxes, mean
  reference      erpd.linear_kl(backend="torch", reduction="mean"), fp32 eager
  compiled       torch.compile of the same reduced reference loss (it keeps the logits for the
                 backward: 8·N·H·V of GEMMs too, with two [N,V] matrices held)
  liger-jsd      LigerFusedLinearJSD(jsd_beta=0): the same loss (Triton: CUDA, or TRITON_INTERPRET=1
                 on the interp shapes)
  erpd-<b>       erpd.linear_kl(backend=b, reduction="mean"): gradients in the forward, the
                 backward a scale (cpu, cuda: 8·N·H·V FLOPs)
  matmul-floor   the 4 GEMMs of a grads-in-forward design: student and teacher logits, dh, dW =
                 8·N·H·V FLOPs
"""

from __future__ import annotations

import sys

import pytest
import torch

import erpd
from erpd import _bench, backends
from erpd.testing import SHAPES, naive_linear_kl
from erpd.testing.shapes import Shape, by_name

from benchmarks import _harness, bench_linear_kl
from benchmarks._harness import Provider

OP = "linear_kl"
FLOPS_PER_NHV = 8  # grads in the forward: student and teacher logits, dh, dW; nothing recomputed
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


def reference_loss(hidden, weight, targets, teacher_hidden, teacher_weight):
    """The reduced loss in plain PyTorch on the float64-capable reference (what `compiled` compiles)."""
    kl = erpd.reference.linear_kl(hidden, weight, targets, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    return kl.sum() / (targets != -100).sum().clamp_min(1)


def make_case(provider: str, shape: str, dtype: str, device: str, seed: int = 0) -> _bench.Case:
    """Inputs for `shape` (those of bench_linear_kl, same seed) and the closures that run `provider`."""
    if provider == "liger-jsd":  # already the mean loss there
        return bench_linear_kl.make_case(provider, shape, dtype, device, seed)
    s = by_name(shape)
    h, w, y, teacher = bench_linear_kl.make_inputs(s, dtype, device, seed)
    th, tw = teacher["teacher_hidden"], teacher["teacher_weight"]
    info = {"shape": s.id, "dtype": dtype, "provider": provider}
    upstream = {"loss": torch.ones((), device=device)}

    if provider == "matmul-floor":
        hd, wd = h.detach(), w.detach()
        zs = torch.empty(hd.shape[0], wd.shape[0], dtype=hd.dtype, device=device)
        zt = torch.empty_like(zs)
        dh, dw = torch.empty_like(hd), torch.empty_like(wd)

        def fwd():
            torch.mm(hd, wd.t(), out=zs)
            torch.mm(th, tw.t(), out=zt)
            return {}

        def fwd_bwd():
            fwd()
            torch.mm(zs, wd, out=dh)  # zs stands in for dz: same shape, same cost
            torch.mm(zs.t(), hd, out=dw)
            return {}

        return _bench.Case(fwd=fwd, fwd_bwd=fwd_bwd, device=device, info=info)

    count = (y != -100).sum().clamp_min(1)
    if provider == "naive":
        def forward():
            return {"loss": naive_linear_kl(h, w, y, **teacher).sum() / count}
    elif provider == "reference":
        def forward():
            return {"loss": erpd.linear_kl(h, w, y, backend="torch", reduction="mean", **teacher)}
    elif provider == "compiled":
        compiled = torch.compile(reference_loss)

        def forward():
            return {"loss": compiled(h, w, y, th, tw)}
    elif provider.startswith("erpd-") and provider[5:] in FUSED:
        backend = provider[5:]

        def forward():
            return {"loss": erpd.linear_kl(h, w, y, backend=backend, reduction="mean", **teacher)}
    else:
        raise ValueError(f"unknown provider {provider!r}; known: {PROVIDER_NAMES}")
    return _bench.autograd_case(forward, (h, w), upstream, device, info)


# --- pytest-benchmark: CI-sized shapes ------------------------------------------------------

SMOKE_SHAPES = [s for s in SHAPES if s.tier == "interp" or s.name == "smollm-vocab"]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Liger's masked -inf lanes
@pytest.mark.parametrize("mode", _bench.MODES)
@pytest.mark.parametrize("shape", SMOKE_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_linear_kl_loss(benchmark, provider: Provider, shape: Shape, mode: str):
    device = _harness.default_device()
    reason = provider.unavailable(shape, device, "fp32", benchmark.disabled)
    if reason:
        pytest.skip(f"{provider.name}: {reason}")
    case = make_case(provider.name, shape.name, "fp32", device)
    _harness.bench_case(benchmark, case, mode, group=f"{OP} (mean) {shape.id} {mode}")


# --- script -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, device, rows, env = _harness.script("benchmarks.bench_linear_kl_loss", OP, PROVIDERS, argv,
                                              __doc__.split("\n\n")[0])
    auto = backends.resolve("auto", torch.device(device), OP)
    notes = [
        f'`backend="auto"` on {device} tensors resolves to `{auto}` in this process; '
        f'erpd.available("{device}", op="{OP}") = {erpd.available(device, op=OP)}',
        f"every provider computes the mean over the tokens of the forward KL(T‖S) with a fused teacher of the "
        f"student's sizes on {args.dtype} inputs and backpropagates it into the student's hidden and weight",
        *_harness.timing_notes(args, rows, "`fwd` is the forward with grad-requiring inputs: for the grads-in-forward "
                               "providers (erpd-*, liger-jsd) it already contains the gradient work, and fwd+bwd − fwd "
                               "is their whole backward"),
        "matmul floor: fwd = the student's and the teacher's [N,H]×[H,V] GEMMs; fwd+bwd = 4 GEMMs (both logits, "
        "dh, dW) = 8·N·H·V FLOPs",
        "max abs diff: of the loss, against `naive` in the same run",
    ]
    text = _harness.render(rows, title=f"linear_kl reduced to its mean (forward KL, fused teacher), {args.dtype}, {device}",
                           env=env, notes=notes)
    lines = bench_linear_kl.summary(rows, auto, "8·N·H·V")
    if lines:
        text += "\nSummary:\n\n" + "".join(f"- {c}\n" for c in lines)
    print(text)
    _harness.write(args.out, text, rows, env, ["python -m benchmarks.bench_linear_kl_loss", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
