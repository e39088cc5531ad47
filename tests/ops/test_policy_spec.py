"""The policy losses' one table of codes and statistic names (erpd/ops/policy_spec.py): the generated
C++ header matches it, every Python reader uses it, and the kernels write `stats` in its order."""

import importlib
import pathlib

import pytest
import torch

import erpd
from erpd import reference
from erpd.ops import _library, _validate, policy_spec
from erpd.testing import make_policy_inputs

REPO = pathlib.Path(__file__).resolve().parents[2]
# The module (erpd.ops.policy_loss is the function of that name).
policy_loss_mod = importlib.import_module("erpd.ops.policy_loss")


def test_committed_header_is_generated_from_the_table():
    header = REPO / "csrc" / "policy_loss" / "codes.h"
    assert policy_spec.HEADER == header
    assert header.read_text() == policy_spec.render_header(), (
        "csrc/policy_loss/codes.h differs from erpd/ops/policy_spec.py: run `python -m erpd.ops.policy_spec --write-header`"
    )


def test_codes_and_names_are_unchanged():
    # The kernels' ABI: these numbers are part of the compiled ops' contract.
    assert policy_spec.METHOD_CODES == {"ppo": 0, "sapo": 1, "cispo": 2, "gspo": 3, "reinforce": 4}
    assert policy_spec.AGG_CODES == {
        "token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3,
    }
    assert policy_spec.KL_ESTIMATOR_CODES == {"k1": 0, "k2": 1, "k3": 2}
    assert policy_spec.STAT_NAMES == (
        "inv_norm", "pg_loss", "clipfrac_low", "clipfrac_high", "clipfrac", "ratio_mean", "ratio_min",
        "ratio_max", "approx_kl", "kl_ref", "entropy", "num_valid",
    )
    for table in (policy_spec.METHODS, policy_spec.AGGS, policy_spec.KL_ESTIMATORS, policy_spec.STATS):
        idents = [entry[1] for entry in table]
        assert len(set(idents)) == len(idents) and all(i.startswith("k") for i in idents)


def test_python_readers_use_the_table():
    assert _validate.POLICY_METHODS is policy_spec.METHOD_CODES
    assert _validate.POLICY_AGGS is policy_spec.AGG_CODES
    assert _validate.KL_ESTIMATORS is policy_spec.KL_ESTIMATOR_CODES
    assert reference.POLICY_METHODS == tuple(policy_spec.METHOD_CODES)
    assert reference.POLICY_AGGS == tuple(policy_spec.AGG_CODES)
    assert reference.KL_ESTIMATORS == tuple(policy_spec.KL_ESTIMATOR_CODES)
    assert policy_loss_mod.STAT_NAMES == policy_spec.STAT_NAMES
    assert _library.NUM_POLICY_STATS == policy_spec.NUM_STATS


def test_triton_kernel_uses_the_table():
    pytest.importorskip("triton")
    from erpd.kernels import policy_loss as K

    assert (K.PPO, K.SAPO, K.CISPO, K.GSPO, K.REINFORCE) == tuple(policy_spec.METHOD_CODES.values())
    assert (K.TOKEN_MEAN, K.SEQ_MEAN_TOKEN_MEAN, K.SEQ_MEAN_TOKEN_SUM, K.SEQ_MEAN_TOKEN_SUM_NORM) == tuple(
        policy_spec.AGG_CODES.values())
    assert (K.K1, K.K2, K.K3) == tuple(policy_spec.KL_ESTIMATOR_CODES.values())
    assert K.NUM_STATS == policy_spec.NUM_STATS


def _raw_stats(backend, x, method, agg):
    """The `stats` vector of one fused backend's raw op, with the arguments the public op passes."""
    opts = _validate.policy_options(
        method=method, agg=agg, clip_low=0.2, clip_high=None, dual_clip=None, tau_pos=1.0, tau_neg=1.05,
        cispo_cap=5.0, cispo_floor=None, reinforce_cap=None, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
        norm_length=None, kl_ratio_weighted=False, has_ref=True, has_entropy=True,
    )
    _loss, stats, _g, _ge = _library.impl(backend, "policy_loss_fwd")(
        x.logprobs, x.old_logprobs, x.advantages, x.mask, x.ref_logprobs, x.entropy, None, None,
        *opts.kernel_args(x.logprobs.shape[1], 0.0), False,
    )
    ref_loss, ref_metrics = reference.policy_loss(
        x.logprobs.double(), x.old_logprobs.double(), x.advantages.double(), x.mask,
        ref_logprobs=x.ref_logprobs.double(), entropy=x.entropy.double(), **opts.reference_kwargs(),
    )
    return stats, ref_metrics


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("method", ["ppo", "gspo"])
def test_stats_come_in_table_order(backend, method):
    if backend not in erpd.available("cpu", "policy_loss"):
        pytest.skip(f"backend {backend!r} unavailable")
    x = make_policy_inputs(4, 9, seed=3, ref=True, entropy=True, drift=0.5)
    stats, ref = _raw_stats(backend, x, method, "token-mean")
    assert stats.shape == (policy_spec.NUM_STATS,)
    # Every entry the reference names sits at its index in the table (the values differ enough
    # from one another that a swap would show).
    for name, i in policy_spec.STAT_INDEX.items():
        if name == "inv_norm":  # token-mean: 1 / (number of valid tokens)
            want = 1.0 / x.mask.sum().double()
        else:
            want = ref[name]
        torch.testing.assert_close(stats[i].double(), want.double(), rtol=1e-4, atol=1e-5, msg=f"stats[{i}] ({name})")


def test_cpu_op_rejects_codes_past_the_table():
    if "cpu" not in erpd.available("cpu", "policy_loss"):
        pytest.skip("erpd._C not built")
    x = make_policy_inputs(2, 5, seed=0)
    opts = _validate.policy_options(
        method="ppo", agg="token-mean", clip_low=0.2, clip_high=None, dual_clip=None, tau_pos=1.0, tau_neg=1.05,
        cispo_cap=5.0, cispo_floor=None, reinforce_cap=None, kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0,
        norm_length=None, kl_ratio_weighted=False, has_ref=False, has_entropy=False,
    )
    args = list(opts.kernel_args(x.logprobs.shape[1], 0.0))
    fwd = _library.impl("cpu", "policy_loss_fwd")
    for pos, count, what in ((0, len(policy_spec.METHODS), "method"), (1, len(policy_spec.AGGS), "aggregation"),
                             (8, len(policy_spec.KL_ESTIMATORS), "KL estimator")):
        bad = list(args)
        bad[pos] = count
        with pytest.raises(RuntimeError, match=f"unknown {what}|unknown policy-loss {what}"):
            fwd(x.logprobs, x.old_logprobs, x.advantages, x.mask, None, None, None, None, *bad, False)
