// policy_loss on CPU: the per-token math of csrc/policy_loss_math.h over rows in parallel (ATen's
// OpenMP pool), in one call that returns the loss, the metrics and the gradients w.r.t. the
// log-probs (and entropy), so that the backward is a scale. Also the shared argument handling of
// the fused op (csrc/cpu/linear_policy_loss.cpp), in policy_loss_cpu.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "policy_loss/host.h"

namespace erpd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const c10::optional<at::Tensor>& ref_logprobs, const c10::optional<at::Tensor>& entropy,
    const c10::optional<at::Tensor>& is_weights, const c10::optional<at::Tensor>& num_items, int64_t method,
    int64_t agg, double ratio_lo, double ratio_hi, double dual_clip, double tau_pos, double tau_neg, double kl_coef,
    int64_t kl_estimator, double entropy_coef, double num_items_value, double norm_scale, bool kl_ratio_weighted,
    bool need_grad_entropy) {
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  policy_cpu::check_batch(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights);
  const policy::Params p = policy_cpu::make_params(method, agg, ratio_lo, ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef,
                                                   kl_estimator, entropy_coef, kl_ratio_weighted, ref_logprobs.has_value(),
                                                   entropy.has_value());
  const auto f32 = logprobs.options();
  at::Tensor grad_lp = at::empty({B, T}, f32);
  at::Tensor grad_ent = need_grad_entropy ? at::empty({B, T}, f32) : at::empty({0}, f32);
  const policy::Batch in = policy_cpu::batch(logprobs, &old_logprobs, advantages, mask, ref_logprobs, entropy,
                                             is_weights, grad_lp, need_grad_entropy ? &grad_ent : nullptr);
  std::vector<policy::Acc> rows(B);
  // About 16k tokens per task: the common small batch stays on one thread instead of paying the
  // pool's start-up and join for microseconds of work.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(T, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) policy::process_row(p, in, b, rows[b]);
  });
  policy::Acc total;
  for (const auto& r : rows) total.merge(r);
  at::Tensor loss = at::empty({}, f32), stats = at::empty({policy::kNumStats}, f32);
  policy::finalize(p, total, B, policy_cpu::num_items(num_items, num_items_value), float(norm_scale),
                   loss.data_ptr<float>(), stats.data_ptr<float>());
  return {loss, stats, grad_lp, grad_ent};
}

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CPU, m) { m.impl("policy_loss_fwd", &fwd); }

}  // namespace erpd
