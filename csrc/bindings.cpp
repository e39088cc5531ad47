// The erpd:: torch op schemas and the pybind11 module `erpd._C`.
//
// Each op's kernels register their implementations per dispatch key in their own translation
// unit (csrc/<op>/cpu.cpp for CPU, csrc/<op>/cuda.cpp for CUDA); this file only declares the
// schemas, so the op set is visible in one place.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "common/chunked.h"
#include "common/vocab_rows.h"

TORCH_LIBRARY(erpd, m) {
  // linear_logprobs (docs/design.md §4.2): per-row log p(target), entropy and log-sum-exp of
  // softmax(y * inv_temperature), y = hidden @ weight.T + bias, or tanh(softcap_scale * y) when
  // softcap_scale > 0 (chunked::Softcap), never materializing [N, V]. with_stats: also
  // stats [3, N] = (log sum p^2, mean logit, is_top1), else stats is empty.
  m.def(
      "linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "float inv_temperature, float softcap_scale, int ignore_index, bool with_stats) "
      "-> (Tensor logprobs, Tensor entropy, Tensor lse, Tensor stats)");
  // Recomputes the logits block by block; grad tensors that are not needed come back empty.
  m.def(
      "linear_logprobs_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, "
      "Tensor entropy, Tensor grad_logprobs, Tensor? grad_entropy, float inv_temperature, "
      "float softcap_scale, int ignore_index, bool need_grad_hidden, bool need_grad_weight) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // linear_kl (csrc/linear_kl/math.h): per-row divergence between the student's softmax and the
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
  // The reduced loss sum_i grad_kl[i] * kl[i] with its gradients computed in the forward (the
  // per-row weights grad_kl are known before it): returns the per-row kl and the gradients.
  m.def(
      "linear_kl_fwd_with_grads(Tensor hidden, Tensor weight, Tensor? bias, Tensor? teacher_hidden, "
      "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_logits, Tensor targets, Tensor grad_kl, "
      "float inv_temperature, int ignore_index, int mode, float beta, bool need_grad_hidden, "
      "bool need_grad_weight) -> (Tensor kl, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // ---- policy losses (erpd/ops/policy_loss.py, erpd/ops/linear_policy_loss.py; per-token math in
  // csrc/policy_loss/math.h). Integer codes: method ppo 0, sapo 1, cispo 2, gspo 3, reinforce 4;
  // agg token-mean 0, seq-mean-token-mean 1, seq-mean-token-sum 2, seq-mean-token-sum-norm 3;
  // kl_estimator k1 0, k2 1, k3 2. mask: bool [B, T]. dual_clip <= 0: none; num_items (tensor, else the float if
  // > 0) replaces the local count of the normaliser; kl_ratio_weighted: the KL term times the ratio. Each returns the loss, the stats vector
  // (1/normaliser, then the metrics) and the gradients, so the autograd backward is a scale.
  // Gradients of policy_loss_fwd exclude the 1/normaliser factor; linear_policy_loss_fwd's
  // include it, and it also returns the per-token log-probs [N] it computed on the way.
  m.def(
      "policy_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
      "Tensor? ref_logprobs, Tensor? entropy, Tensor? is_weights, Tensor? num_items, int method, int agg, "
      "float ratio_lo, float ratio_hi, float dual_clip, float tau_pos, float tau_neg, float kl_coef, "
      "int kl_estimator, float entropy_coef, float num_items_value, float norm_scale, bool kl_ratio_weighted, "
      "bool need_grad_entropy) "
      "-> (Tensor loss, Tensor stats, Tensor grad_logprobs, Tensor grad_entropy)");
  m.def(
      "linear_policy_loss_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float inv_temperature, "
      "float softcap_scale, int ignore_index, Tensor? old_logprobs, Tensor advantages, Tensor mask, Tensor? ref_logprobs, "
      "Tensor? is_weights, Tensor? num_items, int method, int agg, float ratio_lo, float ratio_hi, "
      "float dual_clip, float tau_pos, float tau_neg, float kl_coef, int kl_estimator, float entropy_coef, "
      "float num_items_value, float norm_scale, bool kl_ratio_weighted, bool need_grad_hidden, bool need_grad_weight) "
      "-> (Tensor loss, Tensor stats, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias, Tensor logprobs)");
  // ---- end policy losses
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
  // The ISA level of the CPU epilogues' row loops (csrc/common/vocab_rows.h).
  m.def("cpu_isa", []() { return std::string(erpd::cpu::vocab_rows().isa); });
  m.def("cpu_isas", &erpd::cpu::supported_isas, "the levels this CPU and build can run");
  m.def("set_cpu_isa", &erpd::cpu::set_vocab_rows_isa, "switch the level (for tests and benchmarks)");
  // The CPU drivers' logits blocks kept between calls (csrc/common/chunked.h, ScratchPool).
  m.def("release_cpu_scratch", []() { return erpd::chunked::cpu_scratch().release(); });
  m.def("cpu_scratch_bytes", []() { return erpd::chunked::cpu_scratch().bytes(); });
}
