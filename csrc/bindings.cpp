// The erpd:: torch op schemas and the pybind11 module `erpd._C`.
//
// Each op's kernels register their implementations per dispatch key in their own translation
// unit (csrc/cpu/<op>.cpp for CPU, csrc/cuda/<op>.cpp for CUDA); this file only declares the
// schemas, so the op set is visible in one place.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(erpd, m) {
  // linear_logprobs (DESIGN.md §3): per-row log p(target), entropy and log-sum-exp of
  // softmax((hidden @ weight.T + bias) * inv_temperature), never materializing [N, V].
  m.def(
      "linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "float inv_temperature, int ignore_index) -> (Tensor logprobs, Tensor entropy, Tensor lse)");
  // Recomputes the logits block by block; grad tensors that are not needed come back empty.
  m.def(
      "linear_logprobs_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, "
      "Tensor entropy, Tensor grad_logprobs, Tensor? grad_entropy, float inv_temperature, "
      "int ignore_index, bool need_grad_hidden, bool need_grad_weight) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // linear_kl (csrc/linear_kl_math.h): per-row divergence between the student's softmax and the
  // teacher's, the teacher given as its own hidden states and head (fused) or as dense logits.
  // mode 0 = KL(T||S), 1 = KL(S||T), 2 = generalized JSD with 0 < beta < 1. `aux` is the per-row
  // scalar the backward needs.
  m.def(
      "linear_kl_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor? teacher_hidden, "
      "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_logits, Tensor targets, "
      "float inv_temperature, int ignore_index, int mode, float beta) "
      "-> (Tensor kl, Tensor lse_s, Tensor lse_t, Tensor aux)");
  m.def(
      "linear_kl_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor? teacher_hidden, "
      "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_logits, Tensor targets, "
      "Tensor lse_s, Tensor lse_t, Tensor aux, Tensor grad_kl, float inv_temperature, int ignore_index, "
      "int mode, float beta, bool need_grad_hidden, bool need_grad_weight) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "erpd compiled ops (registered as torch.ops.erpd.*)";
  m.def("built_with_cuda", []() {
#ifdef ERPD_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
