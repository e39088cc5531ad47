"""erpd behind verl 0.9.1's fused-kernel entry points, tested with verl's own model code.

verl is installed without its dependencies (``pip install --no-deps verl==0.9.1``: ray, vLLM,
Megatron... are not needed here). Its package ``__init__`` imports those, so the parent packages
of the three modules used here are registered as bare namespaces (their ``__init__`` files are
the only thing stubbed); the modules themselves are verl's: ``dense_common`` (the HF models'
fused forwards), ``torch_functional`` (``FusedLinearForPPO``, verl's torch backend, the baseline)
and ``linear_cross_entropy`` (the kernel entry point of the Triton backend and of Megatron).
"""

import importlib
import importlib.util
import os
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import erpd
from _tiny_models import causal_lm

if importlib.util.find_spec("verl") is None:
    pytest.skip("verl is installed by the README's test command (pip install --no-deps verl==0.9.1)",
                allow_module_level=True)

PARENTS = ("verl", "verl.utils", "verl.utils.kernel", "verl.utils.experimental", "verl.models",
           "verl.models.transformers", "verl.models.mcore")


@pytest.fixture
def verl(monkeypatch):
    """verl's modules, loaded fresh under namespace parents; sys.modules is restored afterwards."""
    root = importlib.util.find_spec("verl").submodule_search_locations[0]
    for name in list(sys.modules):
        if name == "verl" or name.startswith("verl."):
            monkeypatch.delitem(sys.modules, name)
    for name in PARENTS:
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
        monkeypatch.setitem(sys.modules, name, pkg)
    mods = types.SimpleNamespace(
        dense_common=importlib.import_module("verl.models.transformers.dense_common"),
        torch_functional=importlib.import_module("verl.utils.experimental.torch_functional"),
        kernel=importlib.import_module("verl.utils.kernel.linear_cross_entropy"),
    )
    mods.verl_fused_linear = mods.torch_functional.FusedLinearForPPO  # verl's own, before any install
    yield mods
    for name in list(sys.modules):
        if name == "verl" or name.startswith("verl."):
            sys.modules.pop(name, None)


def _forward(model, fn, ids, temperature):
    """verl's fused forward of `model` (log_probs, entropy, parameter gradients)."""
    model.zero_grad()
    out = fn(model, input_ids=ids, attention_mask=torch.ones_like(ids), return_dict=True, temperature=temperature)
    lp, ent = out.log_probs, out.entropy
    (lp.float().sum() + 0.1 * ent.float().sum()).backward()
    return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", [b for b in erpd.available("cpu") if b != "torch"])
def test_hf_forwards_run_erpd(verl, backend, monkeypatch):
    """Both fused forwards of verl's HF models (torch backend: FusedLinearForPPO; triton backend:
    linear_cross_entropy) give verl's torch-backend values and gradients once erpd is installed."""
    from erpd.adapters import verl as adapter

    model = causal_lm(seed=2)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=g)
    model._verl_fused_kernels_backend = "torch"
    ref_lp, ref_ent, ref_grads = _forward(model, verl.dense_common.forward_with_torch_backend, ids, 0.7)

    monkeypatch.setattr(adapter, "FusedLinearForPPO", _with_backend(adapter.FusedLinearForPPO, backend))
    patched = adapter.install()
    assert patched == ["verl.utils.experimental.torch_functional.FusedLinearForPPO",
                       "verl.utils.kernel.linear_cross_entropy.linear_cross_entropy"]
    calls = _count_kernel_calls(monkeypatch)
    for impl, fn in (("torch", verl.dense_common.forward_with_torch_backend),
                     ("liger", verl.dense_common.forward_with_torch_backend),
                     ("triton", verl.dense_common.forward_with_triton_backend)):
        model._verl_fused_kernels_backend = impl
        lp, ent, grads = _forward(model, fn, ids, 0.7)
        if impl == "triton":
            assert lp.shape == ent.shape == (ids.numel(),)  # verl's kernel flattens
            lp, ent = lp.view_as(ref_lp), ent.view_as(ref_ent)
        torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent.float(), ref_ent.float(), rtol=1e-5, atol=1e-5)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{impl} d{name}: {m}")
    assert calls == {"linear_logprobs_fwd": 3, "linear_logprobs_bwd": 3}


def _with_backend(cls, backend):
    class Pinned(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, backend=backend, **kwargs)

    return Pinned


def _count_kernel_calls(monkeypatch):
    calls = {}
    real = erpd.ops._library.impl

    def counting(backend, name):
        op = real(backend, name)

        def run(*args):
            calls[name] = calls.get(name, 0) + 1
            return op(*args)

        return run

    monkeypatch.setattr(erpd.ops._library, "impl", counting)
    return calls


def test_constructor_and_signature_are_verls(verl):
    from erpd.adapters.verl import FusedLinearForPPO, linear_cross_entropy

    ours, theirs = FusedLinearForPPO(impl_backend="liger"), verl.verl_fused_linear(impl_backend="liger")
    assert (ours.chunk_size, ours.impl_backend) == (theirs.chunk_size, theirs.impl_backend)
    with pytest.raises(ValueError, match="Unsupported FusedLinearForPPO backend"):
        FusedLinearForPPO(impl_backend="triton")
    import inspect

    want = list(inspect.signature(verl.kernel.LinearCrossEntropy.forward).parameters)[1:]  # without ctx
    assert list(inspect.signature(linear_cross_entropy).parameters)[: len(want)] == want


def test_linear_cross_entropy_reductions():
    from erpd.adapters.verl import linear_cross_entropy

    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(2, 5, 16, generator=g), torch.randn(40, 16, generator=g)
    y = torch.randint(0, 40, (2, 5), generator=g)
    lp, ent = linear_cross_entropy(h, w, y, 0.9, "none")
    assert lp.shape == ent.shape == (10,)
    torch.testing.assert_close(linear_cross_entropy(h, w, y, 0.9, "sum")[0], lp.sum())
    torch.testing.assert_close(linear_cross_entropy(h, w, y, 0.9, "mean")[0], lp.mean())
    with pytest.raises(ValueError, match="Invalid reduction"):
        linear_cross_entropy(h, w, y, 0.9, "max")
    with pytest.raises(TypeError, match="temperature must be a float"):
        linear_cross_entropy(h, w, y, 1, "none")


def test_megatron_binding(verl, monkeypatch):
    """Megatron's forward modules bind linear_cross_entropy at import: a loaded one is patched in
    place, and one loaded after install() imports erpd's from the patched kernel module. (Those
    modules import Megatron, which is not installed here: a stand-in holding verl's function by the
    module's name is what gets patched.)"""
    from erpd.adapters import verl as adapter

    loaded = types.ModuleType("verl.models.mcore.model_forward_fused")
    loaded.linear_cross_entropy = verl.kernel.linear_cross_entropy
    monkeypatch.setitem(sys.modules, loaded.__name__, loaded)
    assert "verl.models.mcore.model_forward_fused.linear_cross_entropy" in adapter.install()
    assert loaded.linear_cross_entropy is adapter.linear_cross_entropy
    later = {}
    exec("from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy", later)
    assert later["linear_cross_entropy"] is adapter.linear_cross_entropy


def test_plugin_module_installs(verl):
    sys.modules.pop("erpd.adapters.verl_plugin", None)
    plugin = importlib.import_module("erpd.adapters.verl_plugin")
    assert verl.torch_functional.FusedLinearForPPO is erpd.adapters.verl.FusedLinearForPPO
    assert len(plugin.PATCHED) == 2


# --------------------------------------------------------------------------------------------
# tensor parallelism: verl's dist_process_group contract
# --------------------------------------------------------------------------------------------

N, H, V = 10, 16, 64  # two even shards of 32, as Megatron partitions the vocabulary


def _tp_worker(rank, world, init_file):
    from erpd.testing.dist import gloo_rank

    with gloo_rank(init_file, rank, world):
        _tp_check(rank, world)


def _tp_check(rank, world):
    """(A function of its own: its autograd graphs, which hold the group, are gone when it returns.)"""
    from erpd.adapters.verl import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(2, N, generator=g)

    h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = linear_cross_entropy(h_full, w_full, labels, 0.8)
    (lp * up[0] + ent * up[1]).sum().backward()

    v_r = V // world
    h_tp = hidden.clone().requires_grad_()
    w_tp = weight[rank * v_r:(rank + 1) * v_r].clone().requires_grad_()
    lp_tp, ent_tp = linear_cross_entropy(h_tp, w_tp, labels, 0.8, "none", dist.group.WORLD)
    (lp_tp * up[0] + ent_tp * up[1]).sum().backward()

    torch.testing.assert_close(lp_tp, lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_tp, ent.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_tp.grad, w_full.grad[rank * v_r:(rank + 1) * v_r], rtol=1e-4, atol=1e-5)
    # The hidden gradient is this rank's partial sum: the caller reduces it.
    partial = h_tp.grad.clone()
    assert (partial - h_full.grad).abs().max() > 1e-3
    dist.all_reduce(partial)
    torch.testing.assert_close(partial, h_full.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("cpu" not in erpd.available("cpu"), reason="needs the compiled cpu backend")
def test_dist_process_group_leaves_the_hidden_gradient_to_the_caller(tmp_path):
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
