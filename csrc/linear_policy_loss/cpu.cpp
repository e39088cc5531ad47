// linear_policy_loss on CPU: the policy loss of csrc/policy_loss_math.h fused with the chunked
// log-prob computation of csrc/linear_logprobs_driver.h, gradients included.
//
// Token-level methods (ppo, sapo, cispo, reinforce): a token's gradient w.r.t. its log-prob and
// entropy is known as soon as they are (the aggregation weights depend on the mask only, so the
// normaliser is known up front), so one pass does everything: per row chunk, logits GEMM ->
// log-prob/entropy epilogue -> policy-loss gradient of the chunk's tokens -> dz in place -> dh,
// dW GEMMs (driver's forward_with_grads; 6·N·H·V FLOPs). gspo's sequence ratio needs every
// log-prob of a row first: one log-prob pass, the policy loss over whole rows, then the
// driver's gradient pass (8·N·H·V). Either way the autograd backward only scales the returned
// gradients by grad_output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "linear_logprobs/cpu_epilogue.h"
#include "linear_logprobs/driver.h"
#include "policy_loss/host.h"

namespace erpd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_temperature, double softcap_scale, int64_t ignore_index,
    const c10::optional<at::Tensor>& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const c10::optional<at::Tensor>& ref_logprobs, const c10::optional<at::Tensor>& is_weights,
    const c10::optional<at::Tensor>& num_items, int64_t method, int64_t agg, double ratio_lo, double ratio_hi,
    double dual_clip, double tau_pos, double tau_neg, double kl_coef, int64_t kl_estimator, double entropy_coef,
    double num_items_value, double norm_scale, bool kl_ratio_weighted, bool need_grad_hidden, bool need_grad_weight) {
  const policy::Params p = policy_cpu::fused_params(hidden, targets, old_logprobs, advantages, mask, ref_logprobs,
                                                    is_weights, method, agg, ratio_lo, ratio_hi, dual_clip, tau_pos,
                                                    tau_neg, kl_coef, kl_estimator, entropy_coef, kl_ratio_weighted);
  const int64_t B = mask.size(0), T = mask.size(1), n = hidden.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const float items = policy_cpu::num_items(num_items, num_items_value);

  // Row lengths and the normaliser come from the mask alone.
  const bool* mk = mask.data_ptr<bool>();
  std::vector<float> row_f(B);
  double n_valid = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    float len = 0.f;
    for (int64_t t = 0; t < T; ++t) len += mk[b * T + t];
    row_f[b] = policy::row_factor(p, len);
    n_valid += len;
  }
  const float inv = float(policy::inv_norm(p, n_valid, B, items, float(norm_scale)));

  at::Tensor grad_lp = at::empty({B, T}, f32);
  c10::optional<at::Tensor> grad_ent;
  if (entropy_coef != 0.0) grad_ent = at::empty({B, T}, f32);
  const at::Tensor* old = old_logprobs ? &*old_logprobs : nullptr;
  at::Tensor* g_ent_ptr = grad_ent ? &*grad_ent : nullptr;
  const cpu::CpuEpilogue ep;
  policy::Acc total;
  at::Tensor gh, gw, gb, logprobs;

  if (method == policy::kGSPO) {
    auto [logp, ent, lse, unused] = linear_logprobs::forward_blocked(
        hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, /*with_stats=*/false, ep);
    logprobs = logp;
    const at::Tensor lp2 = logp.view({B, T});
    const c10::optional<at::Tensor> ent2 = ent.view({B, T});
    const policy::Batch in = policy_cpu::batch(lp2, old, advantages, mask, ref_logprobs, ent2, is_weights, grad_lp,
                                               g_ent_ptr);
    std::vector<policy::Acc> rows(B);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(T, 1));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) policy::process_row(p, in, b, rows[b]);
    });
    for (const auto& r : rows) total.merge(r);
    grad_lp.mul_(inv);
    if (grad_ent) grad_ent->mul_(inv);
    std::tie(gh, gw, gb) = linear_logprobs::backward_blocked(
        hidden, weight, bias, targets, lse, ent, grad_lp.view({n}),
        grad_ent ? c10::optional<at::Tensor>(grad_ent->view({n})) : c10::nullopt, inv_temperature, softcap_scale,
        ignore_index, need_grad_hidden, need_grad_weight, ep);
  } else {
    float* glp = grad_lp.data_ptr<float>();
    float* gen = grad_ent ? grad_ent->data_ptr<float>() : nullptr;
    auto step = [&](int64_t r0, int64_t r, const at::Tensor& logp, const at::Tensor& ent) {
      const at::Tensor lp2 = logp.view({B, T});
      const c10::optional<at::Tensor> ent2 = ent.view({B, T});
      const policy::Batch in = policy_cpu::batch(lp2, old, advantages, mask, ref_logprobs, ent2, is_weights, grad_lp,
                                                 g_ent_ptr);
      // The chunk's rows are tokens [r0, r0 + r) of the flattened batch; walk them sequence by sequence.
      for (int64_t i = r0; i < r0 + r;) {
        const int64_t b = i / T, t0 = i % T, t1 = std::min(T, t0 + (r0 + r - i));
        policy::process_segment(p, in, b, t0, t1, row_f[b], total);
        i += t1 - t0;
      }
      // These gradients feed the chunk's GEMMs right away: apply the normaliser now.
      for (int64_t i = r0; i < r0 + r; ++i) {
        glp[i] *= inv;
        if (gen) gen[i] *= inv;
      }
    };
    at::Tensor logp, ent;
    std::tie(logp, ent, gh, gw, gb) = linear_logprobs::forward_with_grads(
        hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, grad_lp.view({n}),
        grad_ent ? c10::optional<at::Tensor>(grad_ent->view({n})) : c10::nullopt, need_grad_hidden, need_grad_weight,
        ep, step);
    logprobs = logp;
  }
  at::Tensor loss = at::empty({}, f32), stats = at::empty({policy::kNumStats}, f32);
  policy::finalize(p, total, B, items, float(norm_scale), loss.data_ptr<float>(), stats.data_ptr<float>());
  return {loss, stats, gh, gw, gb, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CPU, m) { m.impl("linear_policy_loss_fwd", &fwd); }

}  // namespace erpd
