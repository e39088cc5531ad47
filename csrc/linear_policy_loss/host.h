// The entry point of linear_policy_loss (schema in csrc/bindings.cpp), shared by cpu.cpp and
// cuda.cpp: the policy loss of csrc/policy_loss/math.h fused with the chunked log-prob
// computation of csrc/linear_logprobs/driver.h, gradients included.
//
// Token-level methods (ppo, sapo, cispo, reinforce): a token's gradient w.r.t. its log-prob and
// entropy is known as soon as they are (the aggregation weights and 1/D depend on the mask only,
// so the normaliser is known up front), so one pass does everything: per row chunk, logits GEMM
// -> log-prob/entropy epilogue -> policy-loss gradient of the chunk's tokens -> dz in place ->
// dh, dW GEMMs (the driver's forward_with_grads; 6·N·H·V FLOPs). gspo's sequence ratio needs
// every log-prob of a row first: one log-prob pass, the policy loss over whole rows, then the
// driver's gradient pass (8·N·H·V). Either way the autograd backward only scales the returned
// gradients by grad_output.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "linear_logprobs/driver.h"
#include "linear_logprobs/host.h"
#include "policy_loss/host.h"

namespace erpd {
namespace linear_policy_loss {

// The op's own arguments: hidden is [B * T, H] for the [B, T] mask, and the per-token inputs
// are checked as in the pointwise op.
inline policy::Params fused_params(const at::Tensor& hidden, const at::Tensor& targets,
                                   const c10::optional<at::Tensor>& old_logprobs, const at::Tensor& advantages,
                                   const at::Tensor& mask, const c10::optional<at::Tensor>& ref_logprobs,
                                   const c10::optional<at::Tensor>& is_weights, int64_t method, int64_t agg,
                                   double lo, double hi, double dual_clip, double tau_pos, double tau_neg,
                                   double kl_coef, int64_t kl_estimator, double entropy_coef, bool kl_ratio_weighted) {
  TORCH_CHECK(mask.dim() == 2, "mask must be [B, T]");
  const int64_t n = mask.numel();
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == n, "hidden must be [B * T, H] for a [B, T] mask");
  TORCH_CHECK(targets.numel() == n, "targets must have B * T entries");
  policy_host::check_per_token(mask.sizes(), old_logprobs, advantages, mask, ref_logprobs, c10::nullopt, is_weights);
  return policy_host::make_params(method, agg, lo, hi, dual_clip, tau_pos, tau_neg, kl_coef, kl_estimator,
                                  entropy_coef, kl_ratio_weighted, ref_logprobs.has_value(), /*has_entropy=*/true);
}

// linear_policy_loss_fwd on either device. Backend (cpu.cpp, cuda.cpp) supplies
//   Epilogue     the linear_logprobs epilogue; its Guard is held for the call and its kBlocked
//                picks the driver's schedule for gspo's two passes (linear_logprobs/host.h);
//   check_devices  policy_host::NoDeviceChecks or policy_host::CudaDeviceChecks;
//   Pass         the policy-loss side of one call, built from (p, mask, num_items,
//                num_items_value, norm_scale, float32 options) once the guard holds:
//     rows(in, B, loss, stats)   gspo: the loss over whole rows, finalized into loss and stats;
//                                returns 1/D for the gradients (a float, or a one-element tensor
//                                on the device);
//     begin_segments()           token-level: before the first chunk;
//     segments(in, r0, r)        token-level: tokens [r0, r0 + r) of the flattened batch, their
//                                gradients written *with* 1/D (the chunk's GEMMs read them next);
//     finalize(B, loss, stats)   token-level: after the last chunk.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_temperature, double softcap_scale, int64_t ignore_index,
    const c10::optional<at::Tensor>& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const c10::optional<at::Tensor>& ref_logprobs, const c10::optional<at::Tensor>& is_weights,
    const c10::optional<at::Tensor>& num_items, int64_t method, int64_t agg, double ratio_lo, double ratio_hi,
    double dual_clip, double tau_pos, double tau_neg, double kl_coef, int64_t kl_estimator, double entropy_coef,
    double num_items_value, double norm_scale, bool kl_ratio_weighted, bool need_grad_hidden, bool need_grad_weight) {
  using Epilogue = typename Backend::Epilogue;
  const policy::Params p = fused_params(hidden, targets, old_logprobs, advantages, mask, ref_logprobs, is_weights,
                                        method, agg, ratio_lo, ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef,
                                        kl_estimator, entropy_coef, kl_ratio_weighted);
  const at::Device dev = hidden.device();
  Backend::check_devices("hidden", dev,
                         {{"weight", weight}, {"bias", bias}, {"targets", targets}, {"old_logprobs", old_logprobs},
                          {"advantages", advantages}, {"mask", mask}, {"ref_logprobs", ref_logprobs},
                          {"is_weights", is_weights}},
                         num_items);
  const typename Epilogue::Guard guard(dev);
  const int64_t B = mask.size(0), T = mask.size(1), n = hidden.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  typename Backend::Pass pass(p, mask, num_items, num_items_value, norm_scale, f32);

  // The gradients w.r.t. the log-probs and (with an entropy term) the entropies: [B, T] for the
  // policy loss, [N] for the driver.
  at::Tensor grad_lp = at::empty({B, T}, f32);
  c10::optional<at::Tensor> grad_ent;
  if (entropy_coef != 0.0) grad_ent = at::empty({B, T}, f32);
  const c10::optional<at::Tensor> grad_ent_n = grad_ent ? c10::optional<at::Tensor>(grad_ent->view({n})) : c10::nullopt;
  const at::Tensor* old = old_logprobs ? &*old_logprobs : nullptr;
  at::Tensor* g_ent_ptr = grad_ent ? &*grad_ent : nullptr;
  // The batch with the log-probs and entropies [N] of a pass.
  auto batch = [&](const at::Tensor& logp, const at::Tensor& ent) {
    return policy_host::batch(logp.view({B, T}), old, advantages, mask, ref_logprobs, ent.view({B, T}), is_weights,
                              grad_lp, g_ent_ptr);
  };
  const Epilogue ep;
  at::Tensor loss = at::empty({}, f32), stats = at::empty({policy::kNumStats}, f32);
  at::Tensor gh, gw, gb, logprobs;

  if (method == policy::kGSPO) {
    auto [logp, ent, lse, unused] = linear_logprobs::scheduled_forward(
        hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, /*with_stats=*/false, ep);
    logprobs = logp;
    // The gradient GEMMs need the true gradients: 1/D goes in now.
    const auto inv = pass.rows(batch(logp, ent), B, loss, stats);
    grad_lp.mul_(inv);
    if (grad_ent) grad_ent->mul_(inv);
    std::tie(gh, gw, gb) = linear_logprobs::scheduled_backward(
        hidden, weight, bias, targets, lse, ent, grad_lp.view({n}), grad_ent_n, inv_temperature, softcap_scale,
        ignore_index, need_grad_hidden, need_grad_weight, ep);
  } else {
    pass.begin_segments();
    auto step = [&](int64_t r0, int64_t r, const at::Tensor& logp, const at::Tensor& ent) {
      pass.segments(batch(logp, ent), r0, r);
    };
    at::Tensor logp, ent;
    std::tie(logp, ent, gh, gw, gb) = linear_logprobs::forward_with_grads(
        hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, grad_lp.view({n}), grad_ent_n,
        need_grad_hidden, need_grad_weight, ep, step);
    logprobs = logp;
    pass.finalize(B, loss, stats);
  }
  return {loss, stats, gh, gw, gb, logprobs};
}

}  // namespace linear_policy_loss
}  // namespace erpd
