"""Adapters: the TRL/Liger GRPO drop-in against Liger's own LigerFusedLinearGRPOLoss (run on CPU:
its chunked loss is plain PyTorch), use_bias_correction_kl included, the verl log-prob/entropy
contract, and the examples."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import erpd
from erpd.adapters.trl import FusedLinearGRPOLoss
from erpd.testing import make_linear_policy_inputs

ROOT = Path(__file__).resolve().parents[1]
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")


@pytest.fixture(params=["torch", *[b for b in erpd.available("cpu", "linear_policy_loss") if b != "torch"]])
def backend(request):
    return request.param


CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="bnpo"),
    dict(loss_type="dr_grpo", max_completion_length=16),
    dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="dapo", delta=2.0),
    dict(loss_type="dapo", num_items_in_batch=50),
    dict(loss_type="dapo", num_items_in_batch=0),  # a step without tokens: Liger clamps the count at 1
    dict(loss_type="cispo", epsilon_high=1.2),
    dict(loss_type="sapo", sapo_temperature_neg=2.0),
    dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.05, epsilon_high=0.05),
    dict(loss_type="bnpo", importance_sampling_level="sequence", delta=1.5),
    dict(loss_type="dapo", beta=0.0),
    dict(loss_type="grpo", on_policy=True),
    dict(loss_type="dapo", vllm_is_ratio="BT"),
    dict(loss_type="grpo", vllm_is_ratio="B"),
    dict(loss_type="dapo", ref_input=True),
    # TRL 1.12's default: the KL term times the importance ratio (DeepSeek-V3.2)
    dict(loss_type="dapo", use_bias_correction_kl=True),
    dict(loss_type="grpo", importance_sampling_level="sequence", use_bias_correction_kl=True),
    dict(loss_type="cispo", epsilon_high=1.2, use_bias_correction_kl=True, vllm_is_ratio="BT"),
    dict(loss_type="sapo", use_bias_correction_kl=True, on_policy=True),
    dict(loss_type="dapo", beta=0.0, use_bias_correction_kl=True),
]


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


@needs_liger
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_drop_in_matches_liger(backend, case):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    case = dict(case)
    on_policy = case.pop("on_policy", False)
    num_items = case.pop("num_items_in_batch", None)
    vllm = case.pop("vllm_is_ratio", None)
    use_ref_input = case.pop("ref_input", False)
    B, T, H, V = 3, 12, 32, 101
    x = make_linear_policy_inputs(B, T, H, V, seed=5, bias=True, temperature=0.8, ref=True, drift=0.4)
    init = {"beta": 0.04, "temperature": 0.8, **case}
    g = torch.Generator().manual_seed(9)
    call = dict(
        old_per_token_logps=None if on_policy else x.old_logprobs,
        ref_per_token_logps=None if use_ref_input else x.ref_logprobs,
        num_items_in_batch=num_items,
    )
    if use_ref_input:
        call.update(ref_input=torch.randn(B, T, H, generator=g), ref_weight=x.linear.weight.detach() * 0.9,
                    ref_bias=None)
    if vllm == "BT":
        call["vllm_is_ratio"] = torch.rand(B, T, generator=g) + 0.5
    elif vllm == "B":
        call["vllm_is_ratio"] = torch.rand(B, generator=g) + 0.5
    mask = x.mask.long()  # TRL passes an integer completion mask

    results = []
    for module in (LigerFusedLinearGRPOLoss(compiled=False, **init), FusedLinearGRPOLoss(backend=backend, **init)):
        lin = x.clone().linear
        loss, metrics = module(lin.hidden, lin.weight, lin.targets, mask, x.advantages, bias=lin.bias, **call)
        grads = torch.autograd.grad(loss * 1.3, [lin.hidden, lin.weight, lin.bias])
        results.append((loss.detach(), [m.detach() for m in metrics], grads))
    (l_liger, m_liger, g_liger), (l_erpd, m_erpd, g_erpd) = results
    torch.testing.assert_close(l_erpd, l_liger, rtol=2e-5, atol=2e-6)
    assert len(m_erpd) == len(m_liger) == (2 if init["beta"] != 0 else 1)
    for a, b in zip(m_erpd, m_liger):
        torch.testing.assert_close(a, b.float(), rtol=2e-5, atol=2e-6)
    for name, a, b in zip(("hidden", "weight", "bias"), g_erpd, g_liger):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-6, msg=lambda m: f"d{name}: {m}")
    # The inputs exercise the clip (except where the method has none, or is on-policy).
    if case["loss_type"] != "sapo" and not on_policy:
        assert m_erpd[-1] > 0


def test_drop_in_rejects_what_it_cannot_match():
    with pytest.raises(NotImplementedError, match="luspo"):
        FusedLinearGRPOLoss(loss_type="luspo")
    with pytest.raises(NotImplementedError, match="vespo"):
        FusedLinearGRPOLoss(loss_type="vespo")
    with pytest.raises(ValueError, match="max_completion_length"):
        FusedLinearGRPOLoss(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="delta"):
        FusedLinearGRPOLoss(delta=1.1, epsilon_high=0.2)
    with pytest.raises(ValueError, match="sequence"):
        FusedLinearGRPOLoss(loss_type="cispo", importance_sampling_level="sequence")


def test_verl_contract(backend):
    from erpd.adapters.verl import FusedLinearForPPO, logprobs_and_entropy

    x = make_linear_policy_inputs(1, 20, 32, 101, seed=3, temperature=0.7).linear  # [1, total_nnz, H] as verl
    lp, ent = logprobs_and_entropy(x.hidden, x.weight, x.targets, 0.7, backend=backend)
    ref_lp, ref_ent = erpd.reference.linear_logprobs(x.hidden, x.weight, x.targets, temperature=0.7, with_entropy=True)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    assert lp.shape == ent.shape == (1, 20)
    # Both outputs are differentiable (verl backpropagates an entropy bonus).
    (lp.sum() - 0.01 * ent.sum()).backward()
    assert x.hidden.grad is not None and x.weight.grad is not None
    lp2, ent2 = FusedLinearForPPO(backend=backend)(x.hidden, x.weight, x.targets.int(), temperature=0.7)
    torch.testing.assert_close(lp2, lp.detach())


@pytest.mark.slow  # each example in its own interpreter
@pytest.mark.parametrize("script", ["trl_grpo_dropin.py", "custom_loop.py", "distill_loop.py"])
def test_examples_run(script):
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers not installed")
    env = {**os.environ, "ERPD_EXAMPLE_STEPS": "2"}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "loss" in res.stdout
