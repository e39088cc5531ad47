"""policy_loss and linear_policy_loss reject bad input with a clear error that names the argument."""

import pytest
import torch

import erpd
from erpd.testing import make_linear_policy_inputs, make_policy_inputs

B, T = 3, 6


@pytest.fixture
def x():
    """Finite everywhere (make_policy_inputs puts NaN in the padding), so that the value tests
    below can make any position valid."""
    x = make_policy_inputs(B, T, seed=0, ref=True, entropy=True, is_weights=True)
    x.logprobs = x.logprobs.detach().nan_to_num(-1.0).requires_grad_()
    x.old_logprobs, x.ref_logprobs = x.old_logprobs.nan_to_num(-1.0), x.ref_logprobs.nan_to_num(-1.0)
    return x


def call(x, **change):
    args = dict(logprobs=x.logprobs, old_logprobs=x.old_logprobs, advantages=x.advantages, mask=x.mask)
    args.update({k: change.pop(k) for k in list(change) if k in args})
    return erpd.policy_loss(args["logprobs"], args["old_logprobs"], args["advantages"], args["mask"], **change)


NAN_ADV = torch.tensor([0.5, float("nan"), 1.0])  # row 1 has a valid token in `_mask()`


def _mask(bad=None):
    m = torch.ones(B, T)
    if bad is not None:
        m[0, 2] = bad
    return m


@pytest.mark.parametrize(
    "change, exc, words",
    [
        # shapes, ranks, dtypes, devices
        (dict(logprobs=torch.randn(B * T)), ValueError, "logprobs must have shape [B, T]"),
        (dict(logprobs=torch.zeros(B, T, dtype=torch.long)), TypeError, "logprobs must be a floating"),
        (dict(logprobs=[[0.0] * T] * B), TypeError, "logprobs must be a torch.Tensor"),
        (dict(old_logprobs=torch.randn(B, T + 1)), ValueError, "old_logprobs must have shape [3, 6]"),
        (dict(old_logprobs=None), TypeError, "old_logprobs must be a torch.Tensor"),
        (dict(advantages=torch.randn(B + 1)), ValueError, "advantages must have shape [3] or [3, 6]"),
        (dict(advantages=torch.randn(B, T, 1)), ValueError, "advantages must have shape"),
        (dict(advantages=torch.ones(B, dtype=torch.long)), TypeError, "advantages must be a floating"),
        (dict(mask=torch.ones(B, T + 2, dtype=torch.bool)), ValueError, "mask must have shape [3, 6]"),
        (dict(mask=torch.ones(B, T, dtype=torch.complex64)), TypeError, "mask must be bool"),
        (dict(ref_logprobs=torch.randn(T, B)), ValueError, "ref_logprobs must have shape"),
        (dict(entropy=torch.randn(B)), ValueError, "entropy must have shape"),
        (dict(is_weights=torch.randn(B, 1)), ValueError, "is_weights must have shape"),
        (dict(old_logprobs=torch.randn(B, T, device="meta")), ValueError, "old_logprobs is on meta"),
        (dict(mask=torch.ones(B, T, dtype=torch.bool, device="meta")), ValueError, "mask is on meta"),
        # values (checked eagerly on CPU)
        (dict(mask=_mask(2.0)), ValueError, "mask must hold only 0 and 1"),
        (dict(mask=_mask(0.5)), ValueError, "found 0.5"),
        (dict(advantages=NAN_ADV, mask=_mask()), ValueError, "advantages has NaN at 1 valid"),
        (dict(old_logprobs=torch.full((B, T), float("nan")), mask=_mask()), ValueError, "old_logprobs has NaN"),
        (dict(ref_logprobs=torch.full((B, T), float("nan")), mask=_mask()), ValueError, "ref_logprobs has NaN"),
        (dict(is_weights=-torch.ones(B, T), mask=_mask()), ValueError, "is_weights must be >= 0"),
        # options
        (dict(method="grpo"), ValueError, "method must be one of ('ppo', 'sapo', 'cispo', 'gspo', 'reinforce')"),
        (dict(agg="seq-mean"), ValueError, "agg must be one of"),
        (dict(kl_estimator="k4"), ValueError, "kl_estimator must be one of"),
        (dict(clip_low=1.5), ValueError, "clip_low must be <= 1.0"),
        (dict(clip_low=-0.1), ValueError, "clip_low must be >= 0.0"),
        (dict(clip_high=float("nan")), ValueError, "clip_high must be finite"),
        (dict(clip_high=-float("inf")), ValueError, "clip_high must be finite"),
        (dict(clip_low="0.2"), TypeError, "clip_low must be a real number"),
        (dict(clip_low=[0.2]), TypeError, "clip_low must be a real number"),
        (dict(dual_clip=1.0), ValueError, "dual_clip must be > 1.0"),
        (dict(method="sapo", dual_clip=3.0), ValueError, "dual_clip applies to method='ppo' or 'gspo'"),
        (dict(tau_neg=0.0), ValueError, "tau_neg must be > 0.0"),
        (dict(method="cispo", cispo_cap=0.0), ValueError, "cispo_cap must be > 0.0"),
        (dict(method="cispo", cispo_floor=6.0), ValueError, "cispo_floor must be < 5.0"),
        (dict(method="reinforce", reinforce_cap=-1.0), ValueError, "reinforce_cap must be > 0.0"),
        (dict(kl_coef=0.1, ref_logprobs=None), ValueError, "kl_coef=0.1 needs ref_logprobs"),
        (dict(kl_coef=float("nan")), ValueError, "kl_coef must be finite"),
        (dict(entropy_coef=0.1, entropy=None), ValueError, "entropy_coef=0.1 needs entropy"),
        (dict(num_items=0), ValueError, "num_items must be > 0.0"),
        (dict(num_items=float("nan")), ValueError, "num_items must be finite, got nan"),
        (dict(num_items=float("inf")), ValueError, "num_items must be finite, got inf"),
        (dict(num_items=torch.tensor(0)), ValueError, "num_items must be finite and > 0"),
        (dict(num_items=torch.tensor(-2.0)), ValueError, "num_items must be finite and > 0"),
        (dict(num_items=torch.tensor(float("nan"))), ValueError, "got tensor(nan)"),
        (dict(num_items=torch.ones(2)), ValueError, "num_items must be a number or a one-element tensor"),
        (dict(num_items=torch.ones((), dtype=torch.bool)), TypeError, "num_items must be a real tensor"),
        (dict(norm_length=10), ValueError, "norm_length applies to agg='seq-mean-token-sum-norm' only"),
        (dict(agg="seq-mean-token-sum-norm", norm_length=0), ValueError, "norm_length must be a positive int"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input(x, change, exc, words):
    kw = dict(ref_logprobs=x.ref_logprobs, entropy=x.entropy, is_weights=x.is_weights)
    kw.update(change)
    with pytest.raises(exc) as info:
        call(x, **kw)
    assert words in str(info.value)


def test_nan_at_padding_is_fine():
    """NaN where mask == 0 is padding, not an error (make_policy_inputs puts NaN there)."""
    x = make_policy_inputs(B, T, seed=0, ref=True)
    assert torch.isnan(x.logprobs[~x.mask]).all() and torch.isnan(x.old_logprobs[~x.mask]).all()
    loss, _ = call(x, ref_logprobs=x.ref_logprobs, kl_coef=0.1)
    assert torch.isfinite(loss)


def test_value_checks_can_be_skipped(x):
    loss, _ = call(x, mask=_mask(2.0), validate=False, backend="torch")
    assert torch.isfinite(loss)


def test_float64_needs_the_torch_backend(x):
    if "cpu" not in erpd.available("cpu", "policy_loss"):
        pytest.skip("erpd._C not built")
    y = x.cast(torch.float64)
    with pytest.raises(TypeError, match="float64 runs only on backend='torch'"):
        erpd.policy_loss(y.logprobs, x.old_logprobs, x.advantages, x.mask, backend="cpu")


def test_cuda_backend_reports_why():
    with pytest.raises(erpd.BackendUnavailableError, match="backend='cuda' needs CUDA tensors"):
        erpd.policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), backend="cuda")


@pytest.fixture
def lx():
    return make_linear_policy_inputs(2, 5, 8, 11, seed=0)


def lcall(lx, **change):
    lin = lx.linear
    args = dict(hidden=lin.hidden, weight=lin.weight, targets=lin.targets, old_logprobs=lx.old_logprobs,
                advantages=lx.advantages, mask=lx.mask)
    args.update({k: change.pop(k) for k in list(change) if k in args})
    return erpd.linear_policy_loss(*args.values(), **change)


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (dict(hidden=torch.randn(10, 8)), ValueError, "hidden must have shape [B, T, H]"),
        (dict(hidden=torch.randn(2, 5, 9)), ValueError, "hidden size 9"),
        (dict(targets=torch.zeros(2, 4, dtype=torch.long)), ValueError, "targets shape"),
        (dict(targets=torch.full((2, 5), 11)), ValueError, "found 11"),
        (dict(old_logprobs=torch.randn(2, 4)), ValueError, "old_logprobs must have shape [2, 5]"),
        (dict(advantages=torch.randn(3)), ValueError, "advantages must have shape [2] or [2, 5]"),
        (dict(mask=torch.full((2, 5), 3)), ValueError, "mask must hold only 0 and 1"),
        (dict(advantages=torch.tensor([float("nan"), 0.0])), ValueError, "advantages has NaN"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(method="gspo", agg="sum"), ValueError, "agg must be one of"),
        (dict(kl_coef=0.5), ValueError, "kl_coef=0.5 needs ref_logprobs"),
        (dict(backend="cuda"), erpd.BackendUnavailableError, "backend='cuda' needs CUDA tensors"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_fused_bad_input(lx, change, exc, words):
    with pytest.raises(exc) as info:
        lcall(lx, **change)
    assert words in str(info.value)
