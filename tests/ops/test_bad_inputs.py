"""Bad-input suite: every op, every CPU backend, property-based over shapes and values.

Each *kind* of bad input below (a row of `CASES`) either raises a clear error (ValueError /
TypeError / erpd.BackendUnavailableError whose message names the argument) or has a documented
result that the row checks: never a crash inside a kernel, a hang or silent garbage. Hypothesis
draws, per kind and backend, the problem sizes (N, H, V, B, T) and the values (seed); the
examples are derandomized (reproducible) and not shrunk (a failure prints its example as is).
Runtime: about a minute here. `test_counts` prints how many kinds and
examples each op gets.

The fixed-table error tests in test_*_errors.py stay as they are (exact messages); this suite
adds the property-based sweep and the documented-result kinds (non-contiguous, zero-size, empty
and all-ignored batches, NaN/inf, ...), so the two overlap only in the kind of input, not in
what is asserted.

Documented results (README "Bad input and NaN"):
* NaN/inf in a row of hidden: that row's log-prob / entropy / KL is NaN, the other rows equal
  the clean run; in a policy loss, NaN at a valid token makes the loss NaN (never a finite lie);
  at a masked token it has no effect.
* NaN in weight: every non-ignored row is NaN, ignored rows stay 0.
* NaN/inf in a row of teacher_logits: that row's KL is NaN.
* ±inf old/ref log-probs at valid tokens: finite (the log-ratio is clamped to ±20).
* NaN in advantages / old / ref log-probs / is_weights, inf in advantages / is_weights at a valid
  token: ValueError (eager CPU checks, or validate=True).
* zero-size batches (N = 0, B = 0 or T = 0): empty outputs / zero loss, zero gradients.
* all targets ignored or all mask = 0: zero outputs, zero loss, zero gradients.
* non-contiguous inputs: equal to the contiguous run.
"""

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import erpd  # noqa: E402

BACKENDS = ["torch", *[b for b in erpd.available("cpu") if b != "torch"]]
EXAMPLES = 3  # per kind; the cases are cheap but the Triton interpreter is not free
ERRORS = (ValueError, TypeError, erpd.BackendUnavailableError)
NAN, INF = float("nan"), float("inf")
IGNORE = -100


@dataclass
class Case:
    name: str
    # mutate(inputs dict, generator) -> inputs dict (a fresh dict; base tensors are not modified)
    mutate: Callable
    # ("raise", words that the message must contain) or ("check", fn(result, clean_result, inputs))
    expect: tuple


def raises(*words):
    return ("raise", words)


def check(fn):
    return ("check", fn)


# --------------------------------------------------------------------------------------------
# base inputs per op and how to call it
# --------------------------------------------------------------------------------------------


def base_linear(g, n, h, v, backend, bias=True):
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / math.sqrt(h)
    targets = torch.randint(0, v, (n,), generator=g)
    return dict(hidden=hidden, weight=weight, targets=targets, bias=torch.randn(v, generator=g) if bias else None,
                backend=backend)


def _leaf(x):
    """A leaf that requires grad where it can (a real CPU float tensor); anything else as is."""
    if isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.device.type == "cpu":
        return x.detach().requires_grad_()
    return x


def _grad(x):
    return x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None


def run_linear_logprobs(kw):
    kw = dict(kw)
    h, w, t = kw.pop("hidden"), kw.pop("weight"), kw.pop("targets")
    hl = _leaf(h)
    lp, ent = erpd.linear_logprobs(hl, w, t, with_entropy=True, **kw)
    grad = None
    if _grad(hl) is not None or (isinstance(hl, torch.Tensor) and hl.requires_grad):
        torch.nan_to_num(lp + ent, nan=0.0).sum().backward()
        grad = hl.grad
    return dict(out=torch.stack([lp, ent]).detach(), grad_hidden=grad)


def base_linear_kl(g, n, h, v, backend):
    b = base_linear(g, n, h, v, backend)
    b["teacher_logits"] = torch.randn(n, v, generator=g) * 2
    return b


def run_linear_kl(kw):
    kw = dict(kw)
    h, w, t = kw.pop("hidden"), kw.pop("weight"), kw.pop("targets")
    hl = _leaf(h)
    kl = erpd.linear_kl(hl, w, t, **kw)
    grad = None
    if _grad(hl) is not None or (isinstance(hl, torch.Tensor) and hl.requires_grad):
        torch.nan_to_num(kl, nan=0.0).sum().backward()
        grad = hl.grad
    return dict(out=kl.detach(), grad_hidden=grad)


def base_policy(g, b, t, backend):
    lp = -torch.rand(b, t, generator=g) * 4
    return dict(logprobs=lp, old_logprobs=lp + 0.3 * torch.randn(b, t, generator=g), advantages=torch.randn(b, generator=g),
                mask=torch.rand(b, t, generator=g) > 0.2, backend=backend)


def run_policy_loss(kw):
    kw = dict(kw)
    lp = kw.pop("logprobs")
    lpl = _leaf(lp)
    loss, metrics = erpd.policy_loss(lpl, kw.pop("old_logprobs"), kw.pop("advantages"), kw.pop("mask"), **kw)
    grad = None
    if isinstance(lpl, torch.Tensor) and lpl.requires_grad and torch.isfinite(loss):
        loss.backward()
        grad = lpl.grad
    return dict(out=loss.detach().reshape(1), grad_hidden=grad, metrics=metrics)


def base_linear_policy(g, b, t, h, v, backend):
    lin = base_linear(g, b * t, h, v, backend)
    pol = base_policy(g, b, t, backend)
    return dict(hidden=lin["hidden"].view(b, t, h), weight=lin["weight"], targets=lin["targets"].view(b, t),
                old_logprobs=pol["old_logprobs"], advantages=pol["advantages"], mask=pol["mask"], bias=lin["bias"],
                backend=backend)


def run_linear_policy_loss(kw):
    kw = dict(kw)
    h = kw.pop("hidden")
    hl = _leaf(h)
    loss, metrics = erpd.linear_policy_loss(hl, kw.pop("weight"), kw.pop("targets"), kw.pop("old_logprobs"),
                                            kw.pop("advantages"), kw.pop("mask"), **kw)
    grad = None
    if isinstance(hl, torch.Tensor) and hl.requires_grad and torch.isfinite(loss):
        loss.backward()
        grad = hl.grad
    return dict(out=loss.detach().reshape(1), grad_hidden=grad, metrics=metrics)


# --------------------------------------------------------------------------------------------
# mutations shared by the ops on a linear head
# --------------------------------------------------------------------------------------------


def put(**changes):
    return lambda kw, g: {**kw, **changes}


def edit(fn):
    """A mutation computed from the inputs: fn(kw, g) -> changes."""
    return lambda kw, g: {**kw, **fn(kw, g)}


def nan_row(key, value):
    def fn(kw, g):
        x = kw[key].clone()
        flat = x.view(-1, x.shape[-1])
        flat[0, int(torch.randint(0, flat.shape[1], (1,), generator=g))] = value
        return {key: x}

    return edit(fn)


def transposed(t):
    """Same values, non-contiguous (a transposed copy viewed back)."""
    return t.t().contiguous().t() if t.dim() == 2 else t.transpose(-1, -2).contiguous().transpose(-1, -2)


def row0_bad_rest_clean(res, clean, kw):
    out, ref = res["out"], clean["out"]
    row0 = out[..., 0] if out.dim() > 1 else out[0]
    assert torch.isnan(row0).all(), f"the NaN/inf row must give NaN, got {out}"
    rest, ref_rest = (out[..., 1:], ref[..., 1:]) if out.dim() > 1 else (out[1:], ref[1:])
    torch.testing.assert_close(rest, ref_rest, rtol=1e-5, atol=1e-6)


def all_valid_rows_nan(res, clean, kw):
    valid = kw["targets"] != IGNORE
    out = res["out"]
    assert torch.isnan(out[..., valid]).all() and (out[..., ~valid] == 0).all(), out


def matches_torch(res, clean, kw):
    """inf is not NaN: a +inf logit makes its row NaN, a -inf one is a zero-probability token
    (log-prob -inf when it is the target). Whatever the math gives, every backend must give it
    as the reference does, NaN for NaN and inf for inf."""
    if kw["backend"] == "torch":
        return
    inputs = {k: v for k, v in kw.items() if k != "op"}
    ref = RUNNERS[kw["op"]]({**inputs, "backend": "torch"})
    # Where the reference is non-finite the fused value must be too (the reference may say NaN
    # where a fused kernel says +inf, e.g. a forward KL against a zero-probability student token).
    out, want = res["out"], ref["out"]
    assert torch.equal(torch.isfinite(out), torch.isfinite(want)), (out, want)
    ok = torch.isfinite(want)
    torch.testing.assert_close(out[ok], want[ok], rtol=1e-4, atol=1e-5)


def equals_clean(res, clean, kw):
    torch.testing.assert_close(res["out"], clean["out"], rtol=1e-5, atol=1e-6)
    if clean["grad_hidden"] is not None:
        torch.testing.assert_close(res["grad_hidden"], clean["grad_hidden"], rtol=1e-5, atol=1e-6)


def all_zero(res, clean, kw):
    assert (res["out"] == 0).all(), res["out"]
    if res["grad_hidden"] is not None:
        assert (res["grad_hidden"] == 0).all()


def empty_out(res, clean, kw):
    assert res["out"].numel() == 0 or (res["out"] == 0).all()
    if res["grad_hidden"] is not None:
        assert res["grad_hidden"].numel() == 0 or (res["grad_hidden"] == 0).all()


def loss_nan(res, clean, kw):
    assert torch.isnan(res["out"]).all(), f"expected NaN loss, got {res['out']}"


def finite(res, clean, kw):
    assert torch.isfinite(res["out"]).all() and all(torch.isfinite(v) for v in res["metrics"].values())


def head_cases():
    """Bad inputs of hidden / weight / bias / targets / temperature / ignore_index / backend."""
    v_of = lambda kw: kw["weight"].shape[0]  # noqa: E731
    return [
        Case("hidden-rank0", put(hidden=torch.tensor(1.0)), raises("hidden")),
        Case("weight-rank1", edit(lambda kw, g: dict(weight=kw["weight"].reshape(-1))), raises("weight")),
        Case("weight-rank3", edit(lambda kw, g: dict(weight=kw["weight"].unsqueeze(0))), raises("weight")),
        Case("hidden-size-mismatch", edit(lambda kw, g: dict(hidden=torch.randn(*kw["hidden"].shape[:-1], kw["hidden"].shape[-1] + 1))), raises("hidden size")),
        Case("hidden-size-0", edit(lambda kw, g: dict(hidden=kw["hidden"][..., :0], weight=kw["weight"][:, :0])), raises("hidden size 0")),
        Case("empty-vocab", edit(lambda kw, g: dict(weight=kw["weight"][:0], bias=None)), raises("weight", "empty vocabulary")),
        Case("bias-shape", edit(lambda kw, g: dict(bias=torch.randn(v_of(kw) + 1))), raises("bias")),
        Case("targets-shape", edit(lambda kw, g: dict(targets=kw["targets"].reshape(-1)[:-1] if kw["targets"].numel() else torch.zeros(1, dtype=torch.long))), raises("targets")),
        Case("weight-dtype-f64", edit(lambda kw, g: dict(weight=kw["weight"].double())), raises("weight dtype")),
        Case("weight-dtype-bf16", edit(lambda kw, g: dict(weight=kw["weight"].bfloat16())), raises("weight dtype")),
        Case("bias-dtype", edit(lambda kw, g: dict(bias=torch.randn(v_of(kw), dtype=torch.float16))), raises("bias dtype")),
        Case("hidden-int", edit(lambda kw, g: dict(hidden=kw["hidden"].long(), weight=kw["weight"].long(), bias=None)), raises("hidden must be a floating")),
        Case("targets-float", edit(lambda kw, g: dict(targets=kw["targets"].float())), raises("targets must be an integer")),
        Case("targets-bool", edit(lambda kw, g: dict(targets=kw["targets"] > 0)), raises("targets must be an integer")),
        Case("hidden-list", edit(lambda kw, g: dict(hidden=kw["hidden"].tolist())), raises("hidden must be a torch.Tensor")),
        Case("weight-meta", edit(lambda kw, g: dict(weight=kw["weight"].to("meta"))), raises("weight is on meta")),
        Case("hidden-meta", edit(lambda kw, g: dict(hidden=kw["hidden"].to("meta"))), raises("weight is on cpu but hidden is on meta")),
        Case("targets-meta", edit(lambda kw, g: dict(targets=kw["targets"].to("meta"))), raises("targets is on meta")),
        Case("bias-meta", edit(lambda kw, g: dict(bias=torch.randn(v_of(kw), device="meta"))), raises("bias is on meta")),
        Case("target-too-large", edit(lambda kw, g: dict(targets=kw["targets"].clone().view(-1).index_fill_(0, torch.tensor([0]), v_of(kw)).view(kw["targets"].shape))), raises("targets must be in")),
        Case("target-negative", edit(lambda kw, g: dict(targets=kw["targets"].clone().view(-1).index_fill_(0, torch.tensor([0]), -1).view(kw["targets"].shape))), raises("targets must be in")),
        Case("temperature-0", put(temperature=0.0), raises("temperature")),
        Case("temperature-negative", put(temperature=-0.5), raises("temperature")),
        Case("temperature-nan", put(temperature=NAN), raises("temperature")),
        Case("temperature-inf", put(temperature=INF), raises("temperature")),
        Case("temperature-str", put(temperature="1.0"), raises("temperature")),
        Case("ignore_index-float", put(ignore_index=-100.0), raises("ignore_index")),
        Case("backend-name", put(backend="gpu"), raises("backend must be one of")),
        Case("backend-cuda-on-cpu", put(backend="cuda"), raises("cuda")),
        Case("f64-on-fused", edit(lambda kw, g: dict(hidden=kw["hidden"].double(), weight=kw["weight"].double(),
                                                     bias=None if kw["bias"] is None else kw["bias"].double())),
             check(lambda res, clean, kw: None)),  # torch runs it; the fused ones raise (see fused_only)
        Case("non-contiguous", edit(lambda kw, g: dict(hidden=transposed(kw["hidden"]), weight=transposed(kw["weight"]))),
             check(equals_clean)),
    ]


def zero_rows(kw, g):
    h = kw["hidden"]
    lead = (0,) if h.dim() == 2 else (h.shape[0], 0)
    extra = {"teacher_logits": torch.zeros(*lead, kw["weight"].shape[0])} if "teacher_logits" in kw else {}
    return {**kw, "hidden": torch.zeros(*lead, h.shape[-1]), "targets": torch.zeros(lead, dtype=torch.long), **extra}


def row_cases():
    """linear_logprobs and linear_kl: per-row outputs."""
    return [
        Case("zero-rows", zero_rows, check(empty_out)),
        Case("all-ignored", edit(lambda kw, g: dict(targets=torch.full_like(kw["targets"], IGNORE))), check(all_zero)),
        Case("nan-hidden-row", nan_row("hidden", NAN), check(row0_bad_rest_clean)),
        Case("inf-hidden-row", nan_row("hidden", INF), check(matches_torch)),
        Case("nan-weight", nan_row("weight", NAN), check(all_valid_rows_nan)),
        Case("inf-weight", nan_row("weight", INF), check(matches_torch)),
        Case("ignored-nan-row", edit(lambda kw, g: dict(
            targets=kw["targets"].clone().index_fill_(0, torch.tensor([0]), IGNORE),
            hidden=kw["hidden"].clone().index_fill_(0, torch.tensor([0]), NAN))),
            check(lambda res, clean, kw: (all_zero({"out": res["out"][..., :1], "grad_hidden": None}, None, kw)))),
    ]


def kl_cases():
    v_of = lambda kw: kw["weight"].shape[0]  # noqa: E731
    topk = lambda kw, ids_fn, lp_fn: dict(teacher_logits=None, teacher_topk=(lp_fn(kw), ids_fn(kw)))  # noqa: E731
    k_ids = lambda kw: torch.arange(min(2, v_of(kw))).expand(kw["hidden"].shape[0], -1).contiguous()  # noqa: E731
    k_lp = lambda kw: torch.full(k_ids(kw).shape, -3.0)  # noqa: E731
    return [
        Case("no-teacher", put(teacher_logits=None), raises("exactly one teacher")),
        Case("two-teachers", edit(lambda kw, g: dict(teacher_topk=(k_lp(kw), k_ids(kw)))), raises("exactly one teacher")),
        Case("teacher_logits-vocab", edit(lambda kw, g: dict(teacher_logits=torch.randn(kw["hidden"].shape[0], v_of(kw) + 1))), raises("teacher_logits")),
        Case("teacher_logits-rows", edit(lambda kw, g: dict(teacher_logits=torch.randn(kw["hidden"].shape[0] + 1, v_of(kw)))), raises("teacher_logits")),
        Case("teacher_logits-int", edit(lambda kw, g: dict(teacher_logits=kw["teacher_logits"].long())), raises("teacher_logits must be a floating")),
        Case("teacher_logits-meta", edit(lambda kw, g: dict(teacher_logits=kw["teacher_logits"].to("meta"))), raises("teacher_logits is on meta")),
        Case("teacher_hidden-alone", edit(lambda kw, g: dict(teacher_logits=None, teacher_hidden=kw["hidden"])), raises("teacher_weight")),
        Case("teacher_weight-vocab", edit(lambda kw, g: dict(teacher_logits=None, teacher_hidden=kw["hidden"], teacher_weight=torch.randn(v_of(kw) + 1, kw["hidden"].shape[-1]))), raises("teacher_weight has vocabulary")),
        Case("teacher-dtype", edit(lambda kw, g: dict(teacher_logits=None, teacher_hidden=kw["hidden"].double(), teacher_weight=kw["weight"].double())), raises("teacher_hidden dtype")),
        Case("teacher_bias-with-logits", edit(lambda kw, g: dict(teacher_bias=torch.randn(v_of(kw)))), raises("teacher_bias")),
        Case("topk-ids-out-of-range", edit(lambda kw, g: topk(kw, lambda kw: k_ids(kw) + v_of(kw), k_lp)), raises("teacher_topk ids must be in")),
        Case("topk-ids-repeated", edit(lambda kw, g: topk(kw, lambda kw: torch.zeros_like(k_ids(kw)), k_lp) if v_of(kw) > 1 else topk(kw, lambda kw: k_ids(kw) + 5, k_lp)), raises("teacher_topk ids")),
        Case("topk-positive-logprobs", edit(lambda kw, g: topk(kw, k_ids, lambda kw: -k_lp(kw))), raises("teacher_topk logprobs")),
        Case("topk-nan-logprobs", edit(lambda kw, g: topk(kw, k_ids, lambda kw: k_lp(kw).fill_(NAN))), raises("teacher_topk logprobs")),
        Case("topk-k0", edit(lambda kw, g: topk(kw, lambda kw: k_ids(kw)[:, :0], lambda kw: k_lp(kw)[:, :0])), raises("teacher_topk needs 1 <= k")),
        Case("topk-reverse", edit(lambda kw, g: {**topk(kw, k_ids, k_lp), "direction": "reverse"}), raises("direction='forward' only")),
        Case("direction-name", put(direction="backward"), raises("direction must be one of")),
        Case("beta-out-of-range", put(direction="jsd", beta=1.5), raises("beta must be in [0, 1]")),
        Case("beta-nan", put(direction="jsd", beta=NAN), raises("beta")),
        Case("nan-teacher-row", nan_row("teacher_logits", NAN), check(row0_bad_rest_clean)),
        Case("inf-teacher-row", nan_row("teacher_logits", INF), check(matches_torch)),
    ]


def policy_side_cases(b_t):
    """Bad side inputs shared by policy_loss and linear_policy_loss ([B, T] tensors, options)."""
    B, T = b_t

    def at_valid(key, value):
        def fn(kw, g):
            x = kw[key].clone().float()
            m = kw["mask"].clone()
            m.view(-1)[0] = True
            x.view(-1)[0] = value
            return {key: x, "mask": m}

        return edit(fn)

    return [
        Case("old-shape", put(old_logprobs=torch.randn(B, T + 1)), raises("old_logprobs must have shape")),
        Case("adv-shape", put(advantages=torch.randn(B + 1)), raises("advantages must have shape")),
        Case("adv-rank3", put(advantages=torch.randn(B, T, 1)), raises("advantages must have shape")),
        Case("mask-shape", put(mask=torch.ones(B, T + 1, dtype=torch.bool)), raises("mask must have shape")),
        Case("adv-int", put(advantages=torch.ones(B, dtype=torch.long)), raises("advantages must be a floating")),
        Case("mask-complex", put(mask=torch.ones(B, T, dtype=torch.complex64)), raises("mask must be bool")),
        Case("mask-value-2", put(mask=torch.full((B, T), 2)), raises("mask must hold only 0 and 1")),
        Case("mask-nan", put(mask=torch.full((B, T), NAN)), raises("mask must hold only 0 and 1")),
        Case("adv-meta", put(advantages=torch.randn(B, device="meta")), raises("advantages is on meta")),
        Case("old-list", put(old_logprobs=[[0.0] * T] * B), raises("old_logprobs must be a torch.Tensor")),
        Case("nan-advantages", at_valid("advantages", NAN), raises("advantages has NaN")),
        Case("inf-advantages", at_valid("advantages", INF), raises("advantages has inf")),
        Case("nan-old", at_valid("old_logprobs", NAN), raises("old_logprobs has NaN")),
        Case("neg-inf-old", at_valid("old_logprobs", -INF), check(finite)),
        Case("pos-inf-old", at_valid("old_logprobs", INF), check(finite)),
        Case("nan-ref", edit(lambda kw, g: dict(ref_logprobs=torch.full((B, T), NAN), mask=torch.ones(B, T, dtype=torch.bool))), raises("ref_logprobs has NaN")),
        Case("inf-is_weights", edit(lambda kw, g: dict(is_weights=torch.full((B, T), INF), mask=torch.ones(B, T, dtype=torch.bool))), raises("is_weights has inf")),
        Case("negative-is_weights", edit(lambda kw, g: dict(is_weights=-torch.ones(B, T), mask=torch.ones(B, T, dtype=torch.bool))), raises("is_weights must be >= 0")),
        Case("nan-at-padding", edit(lambda kw, g: dict(old_logprobs=torch.where(kw["mask"], kw["old_logprobs"], NAN))), check(finite)),
        Case("all-masked", put(mask=torch.zeros(B, T, dtype=torch.bool)), check(all_zero)),
        Case("method-name", put(method="grpo"), raises("method must be one of")),
        Case("agg-name", put(agg="mean"), raises("agg must be one of")),
        Case("kl_estimator-name", put(kl_estimator="k4"), raises("kl_estimator must be one of")),
        Case("method-not-str", put(method=0), raises("method must be one of")),
        Case("clip_low-above-1", put(clip_low=1.5), raises("clip_low")),
        Case("clip_high-nan", put(clip_high=NAN), raises("clip_high")),
        Case("dual_clip-le-1", put(dual_clip=0.5), raises("dual_clip")),
        Case("tau_pos-0", put(method="sapo", tau_pos=0.0), raises("tau_pos")),
        Case("kl_coef-without-ref", put(kl_coef=0.1), raises("needs ref_logprobs")),
        Case("num_items-0", put(num_items=0), raises("num_items")),
        Case("num_items-2-elements", put(num_items=torch.ones(2)), raises("num_items")),
        Case("norm_length-wrong-agg", put(norm_length=4), raises("norm_length")),
        Case("backend-name", put(backend="gpu"), raises("backend must be one of")),
    ]


def policy_loss_cases(b_t):
    B, T = b_t
    return policy_side_cases(b_t) + [
        Case("logprobs-rank1", edit(lambda kw, g: dict(logprobs=kw["logprobs"].reshape(-1))), raises("logprobs must have shape [B, T]")),
        Case("logprobs-int", edit(lambda kw, g: dict(logprobs=kw["logprobs"].long())), raises("logprobs must be a floating")),
        Case("logprobs-meta", edit(lambda kw, g: dict(logprobs=kw["logprobs"].to("meta"))), raises("is on meta")),
        Case("entropy-shape", put(entropy=torch.rand(B)), raises("entropy must have shape")),
        Case("entropy_coef-without-entropy", put(entropy_coef=0.1), raises("needs entropy")),
        Case("nan-logprobs-valid", edit(lambda kw, g: dict(logprobs=kw["logprobs"].clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(NAN)),
                                                            mask=kw["mask"].clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(True)))), check(loss_nan)),
        Case("non-contiguous", edit(lambda kw, g: dict(logprobs=transposed(kw["logprobs"]), old_logprobs=transposed(kw["old_logprobs"]), mask=transposed(kw["mask"]))), check(equals_clean)),
        Case("zero-batch", put(logprobs=torch.zeros(0, T), old_logprobs=torch.zeros(0, T), advantages=torch.zeros(0), mask=torch.ones(0, T, dtype=torch.bool)), check(all_zero)),
        Case("zero-length", put(logprobs=torch.zeros(B, 0), old_logprobs=torch.zeros(B, 0), mask=torch.ones(B, 0, dtype=torch.bool)), check(all_zero)),
    ]


def linear_policy_cases(b_t):
    B, T = b_t

    def nan_hidden(masked):
        def fn(kw, g):
            h, m = kw["hidden"].clone(), kw["mask"].clone()
            h[0, 0, 0] = NAN
            m[0, 0] = not masked
            return dict(hidden=h, mask=m)

        return edit(fn)

    return [c for c in head_cases() if c.name not in ("hidden-rank0", "f64-on-fused")] + policy_side_cases(b_t) + [
        Case("hidden-rank2", edit(lambda kw, g: dict(hidden=kw["hidden"].reshape(B * T, -1))), raises("hidden must have shape [B, T, H]")),
        Case("nan-hidden-valid", nan_hidden(masked=False), check(loss_nan)),
        Case("nan-hidden-masked", nan_hidden(masked=True), check(finite)),
        Case("nan-weight", nan_row("weight", NAN), check(loss_nan)),
        Case("all-ignored", edit(lambda kw, g: dict(targets=torch.full_like(kw["targets"], IGNORE))), check(all_zero)),
        Case("zero-batch", edit(lambda kw, g: dict(hidden=kw["hidden"][:0], targets=kw["targets"][:0], old_logprobs=kw["old_logprobs"][:0],
                                                   advantages=kw["advantages"][:0], mask=kw["mask"][:0])), check(all_zero)),
        Case("zero-length", edit(lambda kw, g: dict(hidden=kw["hidden"][:, :0], targets=kw["targets"][:, :0], old_logprobs=kw["old_logprobs"][:, :0],
                                                    mask=kw["mask"][:, :0])), check(all_zero)),
    ]


# --------------------------------------------------------------------------------------------
# the op table
# --------------------------------------------------------------------------------------------

SIZES = dict(n=st.integers(1, 7), h=st.integers(1, 9), v=st.integers(1, 19), b=st.integers(1, 3), t=st.integers(1, 5))


def _linear_logprobs_cases():
    return head_cases() + row_cases()


def _linear_kl_cases():
    return [c for c in head_cases()] + row_cases() + kl_cases()


OPS = {
    # op: (cases(b_t), make(g, sizes, backend), run)
    "linear_logprobs": (lambda bt: _linear_logprobs_cases(), lambda g, s, be: base_linear(g, s["n"], s["h"], s["v"], be), run_linear_logprobs),
    "linear_kl": (lambda bt: _linear_kl_cases(), lambda g, s, be: base_linear_kl(g, s["n"], s["h"], s["v"], be), run_linear_kl),
    "policy_loss": (policy_loss_cases, lambda g, s, be: base_policy(g, s["b"], s["t"], be), run_policy_loss),
    "linear_policy_loss": (linear_policy_cases, lambda g, s, be: base_linear_policy(g, s["b"], s["t"], s["h"], s["v"], be), run_linear_policy_loss),
}
RUNNERS = {op: run for op, (_, _, run) in OPS.items()}
CASE_NAMES = {op: [c.name for c in cases((1, 1))] for op, (cases, _, _) in OPS.items()}


def _params():
    return [pytest.param(op, name, id=f"{op}-{name}") for op, names in CASE_NAMES.items() for name in names]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, case_name", _params())
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sizes=st.fixed_dictionaries(SIZES), seed=st.integers(0, 2**16))
def test_bad_input(op, case_name, backend, sizes, seed):
    cases, make, run = OPS[op]
    case = next(c for c in cases((sizes["b"], sizes["t"])) if c.name == case_name)
    g = torch.Generator().manual_seed(seed)
    kw = make(g, sizes, backend)
    bad = case.mutate(kw, g)
    kind, what = case.expect
    fused_f64 = case_name == "f64-on-fused" and backend != "torch"
    if kind == "raise" or fused_f64:
        words = ("float64 runs only on backend='torch'",) if fused_f64 else what
        with pytest.raises(ERRORS) as info:
            run(bad)
        msg = str(info.value)
        assert all(w in msg for w in words), f"{case_name}: message {msg!r} lacks {words}"
        return
    clean = run(kw)
    what(run(bad), clean, {**bad, "op": op})  # noqa: the op name only serves matches_torch


def test_counts(capsys):
    """How many kinds of bad input each op gets, and how many examples the suite tries."""
    with capsys.disabled():
        for op, names in CASE_NAMES.items():
            n = len(names) * EXAMPLES * len(BACKENDS)
            print(f"\n{op}: {len(names)} kinds x {len(BACKENDS)} backends x {EXAMPLES} examples = {n} bad inputs")
    assert all(len(n) >= 30 for n in CASE_NAMES.values())
