"""`linear_policy_loss`: the policy losses of `erpd.policy_loss` fused with the log-prob computation.

A token-level policy loss is a function of each token's log-prob (and entropy) with weights that
depend on the mask only, so its gradient w.r.t. the log-prob is known as soon as the log-prob
is. The fused backends therefore compute dhidden, dweight (and dbias) *in the forward* and save
them; the autograd backward only multiplies them by grad_output, with no pass over the
vocabulary (Liger's chunked losses do the same with autograd per chunk).

Backends:
  cpu     one C++ call (csrc/linear_policy_loss/cpu.cpp) on the chunked driver's
          forward_with_grads: per row chunk, the logits GEMM, the log-prob/entropy epilogue, the
          policy-loss gradient of the chunk's tokens (csrc/policy_loss/math.h), dz in place, and
          the dh, dW GEMMs: 6·N·H·V FLOPs. gspo needs each sequence's mean log-ratio before any
          of its gradients, so it runs a log-prob pass first, then the gradient pass (8·N·H·V).
  triton  the Triton kernels composed inside the forward: linear_logprobs forward, the policy
          loss kernel, linear_logprobs backward (8·N·H·V; the backward is still a scale). A
          single-pass Triton kernel would need the policy math in the logits tile loop.
  cuda    the cpu backend's structure on CUDA tensors (csrc/linear_policy_loss/cuda.cpp): cuBLAS
          GEMMs with fp32 logits, the linear_logprobs CUDA epilogues and the policy-loss kernels
          of csrc/policy_loss/kernels.cu; 1/D comes from the mask on the device, so nothing syncs.
  torch   the triton backend's composition on the torch backend's kernels (chunked PyTorch);
          under create_graph=True its backward differentiates the definition instead.

Where the op lives:

    api.py       the public function: checks, options, backend
    function.py  the runs: one C++/CUDA kernel, or the other ops' kernels composed
    tp.py        the vocabulary-parallel form (tp_group=...)
    library.py   torch.library: the C++/CUDA kernel's fake
    csrc/linear_policy_loss/  the C++ and CUDA host files (the math: csrc/policy_loss/,
                              the log-prob epilogues: csrc/linear_logprobs/)
"""

from erpd.ops.linear_policy_loss.api import linear_policy_loss

__all__ = ["linear_policy_loss"]
