"""`linear_kl`: per-token KL (or generalized JSD) between a teacher and the student, straight from
hidden states and LM heads.


Teacher forms:
  * fused ``(teacher_hidden, teacher_weight[, teacher_bias])`` and dense ``teacher_logits``: every
    backend implements one pair of kernels on flattened, contiguous inputs
        fwd(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, inv_t, ignore_index,
            mode, beta) -> (kl[N], lse_s[N], lse_t[N], aux[N])             (all f32)
        bwd(..., lse_s, lse_t, aux, grad_kl[N], inv_t, ignore_index, mode, beta,
            need_grad_hidden, need_grad_weight) -> (grad_hidden, grad_weight, grad_bias)
    with mode 0 = KL(T||S), 1 = KL(S||T), 2 = JSD(beta). The backward recomputes both logits
    blocks; only O(N) statistics are kept.
    Reduced losses (``reduction="mean"|"sum"``): the gradient of sum_i g_i kl_i w.r.t. each row's
    divergence is the weight g_i, known before the forward (the targets' mask, optional
    ``token_weights``, 1/count or 1/num_items), so the gradients are computed during the forward,
    as `linear_policy_loss` does, and the autograd backward only scales them
    (`erpd/ops/_autograd.py` GradsInForward):
        cpu, cuda, torch  fwd_with_grads(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits,
                   targets, g[N], inv_t, ignore_index, mode, beta, need_grad_hidden,
                   need_grad_weight) -> (kl[N], grad_hidden, grad_weight, grad_bias): per row chunk
                   the student and teacher GEMMs, the divergence and dz of each row while it is in
                   cache, the dh and dW GEMMs (csrc/linear_kl/driver.h): 8·N·H·V FLOPs with a
                   fused teacher of the student's size, nothing recomputed.
        triton     the fwd and bwd kernels above, both inside the forward (12·N·H·V: the Triton
                   forward tiles do not keep the logits for the gradient); torch likewise.
    The per-token form (reduction None / "none") is unchanged.
  * sparse ``teacher_topk``: needs only the student's log-sum-exp and its logits at the k ids, so
    it reuses the `linear_logprobs` kernels of the chosen backend for the dense part and gathers
    the k rows of the head for the sparse part (``TopkFunction``).

Where the op lives:

    api.py            the public function: checks, backend, flattening, reductions
    function.py       the autograd Functions (per token, top-k) and the reduced loss's run
    tp.py             the vocabulary-parallel form (tp_group=...)
    library.py        torch.library: the contracts' fakes, the Triton launchers as custom ops
    torch_kernels.py  the `torch` backend's kernels, chunked PyTorch
    kernels/linear_kl.py           the Triton kernels
    csrc/linear_kl/                the C++ and CUDA kernels (math, driver, epilogues, host files)
    erpd/reference.py (linear_kl)  the definition, float64 ground truth of the tests
"""

from erpd.ops.linear_kl.api import REDUCTIONS, linear_kl

__all__ = ["REDUCTIONS", "linear_kl"]
