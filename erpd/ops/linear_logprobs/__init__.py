"""`linear_logprobs`: per-token log-probs (and entropy) straight from hidden states and the LM head.

Every backend implements the same pair of kernels on flattened, contiguous inputs:

    fwd(hidden[N,H], weight[V,H], bias[V]|None, targets[N] int64, inv_temperature, softcap_scale,
        ignore_index, with_stats)
        -> (logprobs[N] f32, entropy[N] f32, lse[N] f32, stats[3,N] f32 | empty)
    bwd(hidden, weight, bias, targets, lse, entropy, grad_logprobs[N] f32, grad_entropy[N] f32|None,
        inv_temperature, softcap_scale, ignore_index, need_grad_hidden, need_grad_weight)
        -> (grad_hidden[N,H] hidden.dtype | empty, grad_weight[V,H] weight.dtype | empty,
            grad_bias[V] f32 | empty)

with the logits ``y * inv_temperature``, or ``tanh(softcap_scale * y) * inv_temperature`` when
softcap_scale > 0 (``_validate.logit_transform`` maps temperature, logit scale and softcap onto
the two), y = hidden @ weight.T + bias; `stats` (log sum p^2, the mean logit, is_top1 as 0/1)
only with `with_stats`. The forward keeps only O(N) statistics (lse, entropy); the backward
recomputes the logits block by block, so no backend ever holds the [N, V] logits. (The `torch`
backend accumulates and returns float64 for float64 inputs.)

Where the op lives:

    api.py            the public functions: checks, backend, flattening
    function.py       the autograd Function over the backend's (fwd, bwd)
    tp.py             the vocabulary-parallel form (tp_group=...)
    library.py        torch.library: the contract's fakes, the Triton launchers as custom ops
    torch_kernels.py  the `torch` backend's (fwd, bwd), chunked PyTorch
    kernels/linear_logprobs.py           the Triton kernels
    csrc/linear_logprobs/                the C++ and CUDA kernels (driver, epilogues, host files)
    erpd/reference.py (linear_logprobs)  the definition, float64 ground truth of the tests
"""

from erpd.ops.linear_logprobs.api import TokenStats, linear_logprobs, linear_token_stats

__all__ = ["TokenStats", "linear_logprobs", "linear_token_stats"]
