// Host code of the policy-loss ops shared by their CPU and CUDA files: the argument checks, the
// parameters, the raw-pointer view of a batch that csrc/policy_loss/math.h works on, and the
// entry point of policy_loss_fwd (fwd, below), a template over what cpu.cpp and cuda.cpp supply.
// The fused op (csrc/linear_policy_loss/host.h) builds on the same pieces. Nothing here needs a
// device's headers; num_items() serves the CPU files only, CudaDeviceChecks the CUDA ones. The
// Python wrappers (erpd/ops/) validate user input with clear messages; these checks only guard
// the raw-pointer code against a direct call.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <tuple>

#include "policy_loss/math.h"

namespace erpd {
namespace policy_host {

inline void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// The per-token inputs of a [B, T] batch `bt`.
inline void check_per_token(at::IntArrayRef bt, const c10::optional<at::Tensor>& old_logprobs,
                            const at::Tensor& advantages, const at::Tensor& mask,
                            const c10::optional<at::Tensor>& ref_logprobs, const c10::optional<at::Tensor>& entropy,
                            const c10::optional<at::Tensor>& is_weights) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.sizes() == bt,
              "mask must be a contiguous bool tensor of shape ", bt);
  if (old_logprobs) check_f32(*old_logprobs, "old_logprobs", bt);
  if (advantages.dim() == 1) check_f32(advantages, "advantages", {bt[0]});
  else check_f32(advantages, "advantages", bt);
  if (ref_logprobs) check_f32(*ref_logprobs, "ref_logprobs", bt);
  if (entropy) check_f32(*entropy, "entropy", bt);
  if (is_weights) check_f32(*is_weights, "is_weights", bt);
}

inline void check_batch(const at::Tensor& logprobs, const c10::optional<at::Tensor>& old_logprobs,
                        const at::Tensor& advantages, const at::Tensor& mask,
                        const c10::optional<at::Tensor>& ref_logprobs, const c10::optional<at::Tensor>& entropy,
                        const c10::optional<at::Tensor>& is_weights) {
  TORCH_CHECK(logprobs.dim() == 2, "logprobs must be [B, T]");
  check_f32(logprobs, "logprobs", logprobs.sizes());
  check_per_token(logprobs.sizes(), old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights);
}

inline policy::Params make_params(int64_t method, int64_t agg, double lo, double hi, double dual_clip, double tau_pos,
                                  double tau_neg, double kl_coef, int64_t kl_estimator, double entropy_coef,
                                  bool kl_ratio_weighted, bool has_ref, bool has_entropy) {
  TORCH_CHECK(method >= 0 && method < policy::kNumMethods, "unknown policy-loss method code ", method);
  TORCH_CHECK(agg >= 0 && agg < policy::kNumAggs, "unknown aggregation code ", agg);
  TORCH_CHECK(kl_estimator >= 0 && kl_estimator < policy::kNumKLEstimators, "unknown KL estimator code ", kl_estimator);
  policy::Params p;
  p.method = method;
  p.agg = agg;
  p.kl_estimator = kl_estimator;
  p.lo = float(lo);
  p.hi = float(hi);
  p.dual_clip = float(dual_clip);
  p.tau_pos = float(tau_pos);
  p.tau_neg = float(tau_neg);
  p.kl_coef = float(kl_coef);
  p.entropy_coef = float(entropy_coef);
  p.has_ref = has_ref;
  p.has_entropy = has_entropy;
  p.kl_ratio = kl_ratio_weighted;
  return p;
}

inline const float* ptr(const c10::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

// `old_logprobs` / `grad_entropy` may be null (on-policy; no entropy gradient).
inline policy::Batch batch(const at::Tensor& logprobs, const at::Tensor* old_logprobs,
                           const at::Tensor& advantages, const at::Tensor& mask,
                           const c10::optional<at::Tensor>& ref_logprobs, const c10::optional<at::Tensor>& entropy,
                           const c10::optional<at::Tensor>& is_weights, at::Tensor& grad_logprobs,
                           at::Tensor* grad_entropy) {
  policy::Batch in;
  in.logprobs = logprobs.data_ptr<float>();
  in.old_logprobs = old_logprobs ? old_logprobs->data_ptr<float>() : nullptr;
  in.advantages = advantages.data_ptr<float>();
  in.mask = mask.data_ptr<bool>();
  in.ref_logprobs = ptr(ref_logprobs);
  in.entropy = ptr(entropy);
  in.is_weights = ptr(is_weights);
  in.adv_per_row = advantages.dim() == 1;
  in.T = logprobs.size(1);
  in.grad_logprobs = grad_logprobs.data_ptr<float>();
  in.grad_entropy = grad_entropy ? grad_entropy->data_ptr<float>() : nullptr;
  return in;
}

// A tensor argument by name, for the device checks; an absent optional is skipped.
struct Named {
  const char* name;
  const c10::optional<at::Tensor>& tensor;
};

// The device checks of the entry points (fwd below, csrc/linear_policy_loss/host.h), which a
// backend gets by deriving from one of these. `first_name` names the tensor whose device is
// `device`, the one the outputs take.
// CPU: nothing to check; the dispatcher runs the CPU kernel only when every tensor is on the CPU.
struct NoDeviceChecks {
  static void check_devices(const char* /*first_name*/, const at::Device& /*device*/,
                            std::initializer_list<Named> /*tensors*/, const c10::optional<at::Tensor>& /*num_items*/) {}
};
// CUDA: the dispatcher runs the CUDA kernel when any tensor argument is on a CUDA device. The
// first tensor must be one, every other given tensor must be on its device (the raw-pointer code
// would otherwise read another device's memory), and num_items, read by a kernel there, has one
// element.
struct CudaDeviceChecks {
  static void check_devices(const char* first_name, const at::Device& device, std::initializer_list<Named> tensors,
                            const c10::optional<at::Tensor>& num_items) {
    TORCH_CHECK(device.is_cuda(), first_name, " must be a CUDA tensor");
    for (const Named& t : tensors) {
      TORCH_CHECK(!t.tensor || t.tensor->device() == device, t.name, " must be on ", device, ", got ",
                  t.tensor->device());
    }
    TORCH_CHECK(!num_items || num_items->device() == device, "num_items must be on ", device);
    TORCH_CHECK(!num_items || num_items->numel() == 1, "num_items must have one element");
  }
};

// num_items as policy::inv_norm takes it: a tensor's value (a CPU scalar here: this reads it on
// the host) through policy::tensor_items, else the float (0: not given). The CUDA ops pass the
// tensor to their kernels instead.
inline float num_items(const c10::optional<at::Tensor>& t, double value) {
  return t ? policy::tensor_items(t->to(at::kFloat).item<float>()) : float(value);
}

// policy_loss_fwd on either device. Backend (cpu.cpp, cuda.cpp) supplies
//   Guard                                   held for the call (CUDA: logprobs' device made current);
//   check_devices                           NoDeviceChecks or CudaDeviceChecks;
//   reduce(p, in, B, num_items, num_items_value, norm_scale, loss, stats)
//                                           the per-row pass over `in` (the loss terms, the metrics'
//                                           partial sums, the gradients without 1/D) and the
//                                           finalize that writes the loss, 1/D and the metrics.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const c10::optional<at::Tensor>& ref_logprobs, const c10::optional<at::Tensor>& entropy,
    const c10::optional<at::Tensor>& is_weights, const c10::optional<at::Tensor>& num_items, int64_t method,
    int64_t agg, double ratio_lo, double ratio_hi, double dual_clip, double tau_pos, double tau_neg, double kl_coef,
    int64_t kl_estimator, double entropy_coef, double num_items_value, double norm_scale, bool kl_ratio_weighted,
    bool need_grad_entropy) {
  check_batch(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights);
  const at::Device dev = logprobs.device();
  Backend::check_devices("logprobs", dev,
                         {{"old_logprobs", old_logprobs}, {"advantages", advantages}, {"mask", mask},
                          {"ref_logprobs", ref_logprobs}, {"entropy", entropy}, {"is_weights", is_weights}},
                         num_items);
  const typename Backend::Guard guard(dev);
  const policy::Params p = make_params(method, agg, ratio_lo, ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef,
                                       kl_estimator, entropy_coef, kl_ratio_weighted, ref_logprobs.has_value(),
                                       entropy.has_value());
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const auto f32 = logprobs.options();
  at::Tensor grad_lp = at::empty({B, T}, f32);
  at::Tensor grad_ent = need_grad_entropy ? at::empty({B, T}, f32) : at::empty({0}, f32);
  const policy::Batch in = batch(logprobs, &old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, grad_lp,
                                 need_grad_entropy ? &grad_ent : nullptr);
  at::Tensor loss = at::empty({}, f32), stats = at::empty({policy::kNumStats}, f32);
  Backend::reduce(p, in, B, num_items, num_items_value, norm_scale, loss, stats);
  return {loss, stats, grad_lp, grad_ent};
}

}  // namespace policy_host
}  // namespace erpd
