"""`policy_loss`: clipped / gated / capped importance-ratio losses on per-token log-probs.

Every backend implements one kernel on float32 contiguous [B, T] inputs (float64 on `torch`):

    fwd(logprobs, old_logprobs, advantages [B] | [B, T], mask (bool), ref_logprobs | None,
        entropy | None, is_weights | None, num_items (0-dim f32) | None, method, agg, ratio_lo,
        ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef, kl_estimator, entropy_coef,
        num_items_value, norm_scale, kl_ratio_weighted, need_grad_entropy)
        -> (loss [], stats [NUM_STATS = 12], grad_logprobs [B, T], grad_entropy [B, T] | empty)

computing the loss, the metrics and dL/dlogprobs (and dL/dentropy) in one call; the gradients
leave out the batch normaliser 1/D (stats[0]), which the backward folds into its one scale:
grad = saved * (grad_output * stats[0]). Nothing reads a tensor value on the host.

Where the op lives:

    api.py            the public function: checks, options, backend
    function.py       the autograd Function (the backward scales the saved gradients)
    library.py        torch.library: the contract's fake, the Triton launcher as a custom op
    torch_kernels.py  the `torch` backend's kernel: the reference with autograd
    kernels/policy_loss.py   the Triton kernel
    csrc/policy_loss/        the C++ and CUDA kernels (per-token math, host files, CUDA kernels)
    erpd/ops/policy_spec.py  the codes of the options and the order of `stats`
    erpd/ops/options.py      PolicyOptions, the options
    erpd/reference.py (policy_loss)  the definition, float64 ground truth of the tests
"""

from erpd.ops.policy_loss.api import policy_loss
from erpd.ops.policy_loss.function import STAT_NAMES, metrics_from_stats

__all__ = ["STAT_NAMES", "metrics_from_stats", "policy_loss"]
