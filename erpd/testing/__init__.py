"""Helpers shared by the tests and the benchmarks: the shape registry, input factories, the
plain-PyTorch baseline and the tolerance rule.

Tolerance rule (as flash-attention and Cut Cross-Entropy use it): a backend's error against the
float64 reference may be at most ``factor`` (2) times the error that plain PyTorch makes on the
same inputs in the same precision, plus a small floor relative to the reference's magnitude
(the floor covers fp32 cases where plain PyTorch happens to be almost exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from erpd import reference
from erpd.testing.shapes import SHAPES, Shape, shapes

__all__ = [
    "SHAPES", "Shape", "shapes", "LinearInputs", "make_linear_inputs", "naive_linear_logprobs",
    "make_kl_teacher", "naive_linear_kl", "max_err", "three_way", "assert_within_rule",
    "PolicyInputs", "make_policy_inputs", "LinearPolicyInputs", "make_linear_policy_inputs",
]


@dataclass
class LinearInputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    bias: torch.Tensor | None

    def to64(self) -> "LinearInputs":
        """Leaf float64 copies (requiring grad) of the same values, for the reference."""
        d = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
        return LinearInputs(d(self.hidden), d(self.weight), self.targets, d(self.bias))

    def clone(self) -> "LinearInputs":
        """Fresh leaves with the same values (so each backend gets its own .grad)."""
        c = lambda t: None if t is None else t.detach().clone().requires_grad_(t.requires_grad)  # noqa: E731
        return LinearInputs(c(self.hidden), c(self.weight), self.targets, c(self.bias))


def make_linear_inputs(
    n: int | tuple[int, ...],
    h: int,
    v: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    bias: bool = False,
    ignore_frac: float = 0.0,
    ignore_index: int = -100,
    logit_std: float = 3.0,
    seed: int | None = None,
    requires_grad: bool = True,
) -> LinearInputs:
    """Random LM-head inputs whose logits have standard deviation about `logit_std` (peaked,
    realistic softmaxes rather than near-uniform ones). `n` may be a shape of leading dims."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed)
    lead = (n,) if isinstance(n, int) else tuple(n)
    hidden = torch.randn(*lead, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (logit_std / h**0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, v, lead, generator=g)
    if ignore_frac > 0:
        targets[torch.rand(lead, generator=g) < ignore_frac] = ignore_index
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    return LinearInputs(cast(hidden), cast(weight), targets.to(device), cast(b))


def naive_linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100):
    """What plain PyTorch code does in the input precision: logits in the input dtype (bf16
    logits are rounded), then a float32 log-softmax. The baseline of the tolerance rule, and the
    `naive` provider of the benchmarks."""
    logits = F.linear(hidden, weight, bias).float() / temperature
    logp_all = logits.log_softmax(-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.where(valid, logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    entropy = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    return logp, entropy


TEACHER_FORMS = ("fused", "dense", "topk")


def make_kl_teacher(x: LinearInputs, form: str, *, h: int | None = None, k: int = 8, closeness: float = 0.0,
                    bias: bool = False, seed: int = 0) -> dict:
    """Teacher keyword arguments of `erpd.linear_kl` for the student inputs `x`, in `x`'s dtype and
    device: ``fused`` (own hidden size `h`), ``dense`` logits, or ``topk`` (k log-probs and ids of
    the dense teacher's softmax at temperature 1). ``closeness`` in [0, 1] mixes the student's
    own logits into the teacher's (1: the teacher is the student), so divergences range from
    large to tiny."""
    g = torch.Generator().manual_seed(seed)
    lead, v = tuple(x.targets.shape), x.weight.shape[0]
    h = h or x.hidden.shape[-1]
    dtype, device = x.hidden.dtype, x.hidden.device
    th = torch.randn(*lead, h, generator=g)
    tw = torch.randn(v, h, generator=g) * (3.0 / h**0.5)
    tb = torch.randn(v, generator=g) * 0.5 if bias else None
    if closeness > 0:
        # Mix at the level of hidden states and heads, so the fused form stays a true GEMM.
        assert h == x.hidden.shape[-1], "closeness needs the student's hidden size"
        mix = lambda a, b: (1 - closeness) * a + closeness * b.detach().float().cpu()  # noqa: E731
        th, tw = mix(th, x.hidden), mix(tw, x.weight)
        tb = None if x.bias is None else mix(torch.zeros(v) if tb is None else tb, x.bias)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    if form == "fused":
        return dict(teacher_hidden=cast(th), teacher_weight=cast(tw), teacher_bias=cast(tb))
    logits = F.linear(th.double(), tw.double(), None if tb is None else tb.double())
    if form == "dense":
        return dict(teacher_logits=cast(logits))
    if form == "topk":
        vals, ids = logits.log_softmax(-1).topk(k, dim=-1)
        return dict(teacher_topk=(vals.float().to(device), ids.to(device)))
    raise ValueError(f"form must be one of {TEACHER_FORMS}, got {form!r}")


def naive_linear_kl(hidden, weight, targets=None, bias=None, *, teacher_hidden=None, teacher_weight=None,
                    teacher_bias=None, teacher_logits=None, teacher_topk=None, direction="forward", beta=0.5,
                    temperature=1.0, ignore_index=-100):
    """What plain PyTorch code does in the input precision: both logits in the input dtype (bf16
    logits are rounded), then float32 softmaxes. The baseline of the tolerance rule, and the
    `naive` provider of the benchmarks."""
    from erpd.reference import kl_from_logits

    logits = F.linear(hidden, weight, bias).float()
    if teacher_logits is None and teacher_topk is None:
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    t_logits = None if teacher_logits is None else teacher_logits.float()
    kl = kl_from_logits(logits, t_logits, teacher_topk, direction=direction, beta=beta, temperature=temperature)
    return kl if targets is None else torch.where(targets != ignore_index, kl, 0.0)


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double() - expected.detach().double()).abs().max().item() if expected.numel() else 0.0


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul", "aten::linear", "aten::bmm")


def gemm_counts(fn) -> tuple[dict, dict]:
    """Runs ``fn()`` under the CPU profiler: (the count of each GEMM op it ran, the count of every
    op), e.g. to check that a backward makes no pass over the vocabulary."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = Counter(e.name for e in prof.events())
    return {k: counts[k] for k in GEMM_OPS if counts[k]}, counts


def three_way(run, backend: str, *, exact, fresh, baseline: str = "naive") -> tuple:
    """The three providers of the tolerance rule on the same values, in this order:
    ``(reference, baseline, backend)``, each ``run(inputs, provider)``.

    ``exact()`` gives float64 copies of the inputs, which ``run`` gets with provider ``"torch"``
    (the float64 reference); ``fresh()`` gives fresh leaves with the inputs' own values and dtype,
    called once per provider so that each gets its own ``.grad``. ``baseline`` is the provider of
    plain PyTorch in the input precision: ``"naive"`` (:func:`naive_linear_logprobs`,
    :func:`naive_linear_kl`), or ``"torch"`` where the reference run in the input dtype is that
    baseline (the pointwise policy loss). Compare the results with :func:`assert_within_rule`.
    """
    ref = run(exact(), "torch")
    base = run(fresh(), baseline)
    got = run(fresh(), backend)
    return ref, base, got


def assert_within_rule(actual, expected64, baseline, *, name: str, factor: float = 2.0, floor: float = 1e-5) -> None:
    """Assert ``err(actual) <= factor * err(baseline) + floor * max|expected|``."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected64).all(), f"{name}: finiteness differs from the reference"
    e_act, e_base = max_err(actual, expected64), max_err(baseline, expected64)
    scale = expected64.detach().abs().max().item() if expected64.numel() else 0.0
    bound = factor * e_base + floor * max(scale, 1.0)
    assert e_act <= bound, f"{name}: max error {e_act:.3e} > bound {bound:.3e} (plain PyTorch error {e_base:.3e}, scale {scale:.3e})"


@dataclass
class PolicyInputs:
    """A [B, T] batch for erpd.policy_loss: `logprobs` (and `entropy`) are leaves requiring grad."""

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None

    def kwargs(self) -> dict:
        return dict(ref_logprobs=self.ref_logprobs, entropy=self.entropy, is_weights=self.is_weights)

    def cast(self, dtype: torch.dtype) -> "PolicyInputs":
        """Fresh leaves of the differentiable inputs in `dtype` (the others keep their dtype)."""
        d = lambda t: None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)  # noqa: E731
        return PolicyInputs(d(self.logprobs), self.old_logprobs, self.advantages, self.mask, self.ref_logprobs,
                            d(self.entropy), self.is_weights)

    def rows(self, sl: slice) -> "PolicyInputs":
        """Fresh leaves of a row slice (a gradient-accumulation micro-batch)."""
        r = lambda t: None if t is None else t[sl].detach().clone().requires_grad_(t.requires_grad)  # noqa: E731
        c = lambda t: None if t is None else t[sl]  # noqa: E731
        return PolicyInputs(r(self.logprobs), c(self.old_logprobs), c(self.advantages), c(self.mask),
                            c(self.ref_logprobs), r(self.entropy), c(self.is_weights))


def make_policy_inputs(
    b: int,
    t: int,
    *,
    seed: int = 0,
    drift: float = 0.3,
    per_token_advantages: bool = False,
    ref: bool = False,
    entropy: bool = False,
    is_weights: bool = False,
    pad_frac: float = 0.25,
    device: str | torch.device = "cpu",
) -> PolicyInputs:
    """Random policy-loss inputs: log-probs of sampled tokens, an old policy `drift` away in
    log-ratio (so ratios spread over and beyond a 0.2 clip), GRPO-like advantages, right-padded
    sequences of random lengths (one fully padded row when b > 2) whose padding holds NaN, as
    real padding may."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g) * 4.0 - 0.05
    old = lp + torch.randn(b, t, generator=g) * drift
    adv = torch.randn(b, t, generator=g) if per_token_advantages else torch.randn(b, generator=g)
    lengths = (torch.rand(b, generator=g) * t * (1.0 - pad_frac) + t * pad_frac).long().clamp(1, t)
    if b > 2:
        lengths[1] = 0
    mask = torch.arange(t)[None, :] < lengths[:, None]
    pad = ~mask
    lp, old = lp.masked_fill(pad, float("nan")), old.masked_fill(pad, float("nan"))
    out = PolicyInputs(lp, old, adv, mask)
    if ref:
        out.ref_logprobs = (lp + torch.randn(b, t, generator=g) * drift).masked_fill(pad, float("nan"))
    if entropy:
        out.entropy = torch.rand(b, t, generator=g) * 3.0
    if is_weights:
        out.is_weights = torch.rand(b, t, generator=g) * 1.5 + 0.25
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    out = PolicyInputs(*(dev(getattr(out, f)) for f in ("logprobs", "old_logprobs", "advantages", "mask", "ref_logprobs", "entropy", "is_weights")))
    out.logprobs.requires_grad_()
    if out.entropy is not None:
        out.entropy.requires_grad_()
    return out


@dataclass
class LinearPolicyInputs:
    """A [B, T] batch for erpd.linear_policy_loss: LM-head inputs (hidden [B, T, H]) plus the
    policy-loss side inputs, with old / ref log-probs drawn around the true log-probs."""

    linear: LinearInputs
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None

    def clone(self) -> "LinearPolicyInputs":
        return LinearPolicyInputs(self.linear.clone(), self.old_logprobs, self.advantages, self.mask,
                                  self.ref_logprobs, self.is_weights)

    def to64(self) -> "LinearPolicyInputs":
        d = lambda t: None if t is None else t.double()  # noqa: E731
        return LinearPolicyInputs(self.linear.to64(), d(self.old_logprobs), d(self.advantages), self.mask,
                                  d(self.ref_logprobs), d(self.is_weights))

    def rows(self, sl: slice) -> "LinearPolicyInputs":
        """A micro-batch of sequences; the LM head is shared (the same leaf), hidden is fresh."""
        x = self.linear
        h = x.hidden[sl].detach().clone().requires_grad_(x.hidden.requires_grad)
        c = lambda t: None if t is None else t[sl]  # noqa: E731
        return LinearPolicyInputs(LinearInputs(h, x.weight, x.targets[sl], x.bias), c(self.old_logprobs),
                                  c(self.advantages), c(self.mask), c(self.ref_logprobs), c(self.is_weights))


def make_linear_policy_inputs(
    b: int,
    t: int,
    h: int,
    v: int,
    *,
    seed: int = 0,
    drift: float = 0.3,
    temperature: float = 1.0,
    bias: bool = False,
    ignore_frac: float = 0.0,
    per_token_advantages: bool = False,
    ref: bool = False,
    is_weights: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LinearPolicyInputs:
    x = make_linear_inputs((b, t), h, v, dtype=dtype, device=device, bias=bias, ignore_frac=ignore_frac, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        lp, _ = reference.linear_logprobs(
            x.hidden.double(), x.weight.double(), x.targets, bias=None if x.bias is None else x.bias.double(),
            temperature=temperature,
        )
    lp = lp.float().cpu()
    old = lp + torch.randn(b, t, generator=g) * drift
    adv = torch.randn(b, t, generator=g) if per_token_advantages else torch.randn(b, generator=g)
    lengths = (torch.rand(b, generator=g) * t * 0.7 + t * 0.3).long().clamp(1, t)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    out = LinearPolicyInputs(x, old, adv, mask)
    if ref:
        out.ref_logprobs = lp + torch.randn(b, t, generator=g) * drift
    if is_weights:
        out.is_weights = torch.rand(b, t, generator=g) * 1.5 + 0.25
    for f in ("old_logprobs", "advantages", "mask", "ref_logprobs", "is_weights"):
        if getattr(out, f) is not None:
            setattr(out, f, getattr(out, f).to(device))
    return out
