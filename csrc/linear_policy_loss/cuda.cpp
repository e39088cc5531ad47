// linear_policy_loss on CUDA: the CPU op's structure (csrc/cpu/linear_policy_loss.cpp) with the
// CUDA pieces: cuBLAS GEMMs with fp32 output (csrc/chunked.h), the linear_logprobs epilogues
// (csrc/linear_logprobs.cu) and the policy-loss kernels (csrc/policy_loss.cu), all on the current
// stream, with no value read on the host.
//
// Token-level methods (ppo, sapo, cispo, reinforce): the aggregation weights and 1/D depend on the
// mask only, so two small kernels compute them first (policy_loss_norm), then one pass does
// everything: per row chunk, logits GEMM -> log-prob/entropy epilogue -> the chunk's per-token
// dL/dlogp and dL/dH (policy_loss_segments) -> dz = t [g_lp (onehot - p) - g_H p (log p + H)] in
// place -> dh, dW GEMMs (the driver's forward_with_grads; 6·N·H·V FLOPs). gspo's sequence ratio
// needs every log-prob of a row first: one log-prob pass, the per-row policy kernel over whole
// rows, then the driver's gradient pass (8·N·H·V). Either way the autograd backward only scales
// the returned gradients by grad_output.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "linear_logprobs/cuda_epilogue.h"
#include "linear_logprobs/driver.h"
#include "policy_loss/host.h"
#include "policy_loss/kernels.h"

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
  const at::Device dev = hidden.device();
  TORCH_CHECK(dev.is_cuda(), "hidden must be a CUDA tensor");
  policy_cpu::check_devices(dev,
                            {{"weight", weight}, {"bias", bias}, {"targets", targets}, {"old_logprobs", old_logprobs},
                             {"advantages", advantages}, {"mask", mask}, {"ref_logprobs", ref_logprobs},
                             {"is_weights", is_weights}},
                            num_items);
  const c10::cuda::CUDAGuard guard(dev);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const at::Tensor items = num_items ? num_items->to(at::kFloat).contiguous() : at::Tensor();
  const float* items_ptr = items.defined() ? items.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor grad_lp = at::empty({B, T}, f32);
  c10::optional<at::Tensor> grad_ent;
  if (entropy_coef != 0.0) grad_ent = at::empty({B, T}, f32);
  const at::Tensor* old = old_logprobs ? &*old_logprobs : nullptr;
  at::Tensor* g_ent_ptr = grad_ent ? &*grad_ent : nullptr;
  const cuda::CudaEpilogue ep;
  at::Tensor partials = at::empty({B, policy::kNumParts}, f32.dtype(at::kDouble));
  at::Tensor loss = at::empty({}, f32), stats = at::empty({policy::kNumStats}, f32);
  at::Tensor gh, gw, gb, logprobs;

  if (method == policy::kGSPO) {
    auto [logp, ent, lse, unused] = linear_logprobs::forward(hidden, weight, bias, targets, inv_temperature,
                                                             softcap_scale, ignore_index, /*with_stats=*/false, ep);
    logprobs = logp;
    const at::Tensor lp2 = logp.view({B, T});
    const c10::optional<at::Tensor> ent2 = ent.view({B, T});
    const policy::Batch in = policy_cpu::batch(lp2, old, advantages, mask, ref_logprobs, ent2, is_weights, grad_lp,
                                               g_ent_ptr);
    C10_CUDA_CHECK(cuda::policy_loss_rows(p, in, B, partials.data_ptr<double>(), stream));
    C10_CUDA_CHECK(cuda::policy_loss_finalize(p, partials.data_ptr<double>(), B, items_ptr, float(num_items_value),
                                              float(norm_scale), loss.data_ptr<float>(), stats.data_ptr<float>(),
                                              stream));
    // The gradient GEMMs need the true gradients: 1/D (stats[0], on the device) goes in now.
    const at::Tensor inv = stats.narrow(0, policy::kInvNorm, 1);
    grad_lp.mul_(inv);
    if (grad_ent) grad_ent->mul_(inv);
    std::tie(gh, gw, gb) = linear_logprobs::backward(
        hidden, weight, bias, targets, lse, ent, grad_lp.view({n}),
        grad_ent ? c10::optional<at::Tensor>(grad_ent->view({n})) : c10::nullopt, inv_temperature, softcap_scale,
        ignore_index, need_grad_hidden, need_grad_weight, ep);
  } else {
    // Row factors and 1/D from the mask, before any gradient is written.
    at::Tensor row_f = at::empty({B}, f32), lengths = at::empty({B}, f32), inv = at::empty({}, f32);
    C10_CUDA_CHECK(cuda::policy_loss_norm(p, mask.data_ptr<bool>(), B, T, items_ptr, float(num_items_value),
                                          float(norm_scale), row_f.data_ptr<float>(), lengths.data_ptr<float>(),
                                          inv.data_ptr<float>(), partials.data_ptr<double>(), stream));
    auto step = [&](int64_t r0, int64_t r, const at::Tensor& logp, const at::Tensor& ent) {
      const at::Tensor lp2 = logp.view({B, T});
      const c10::optional<at::Tensor> ent2 = ent.view({B, T});
      const policy::Batch in = policy_cpu::batch(lp2, old, advantages, mask, ref_logprobs, ent2, is_weights, grad_lp,
                                                 g_ent_ptr);
      C10_CUDA_CHECK(cuda::policy_loss_segments(p, in, r0, r, row_f.data_ptr<float>(), inv.data_ptr<float>(),
                                                partials.data_ptr<double>(), stream));
    };
    at::Tensor logp, ent;
    std::tie(logp, ent, gh, gw, gb) = linear_logprobs::forward_with_grads(
        hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, grad_lp.view({n}),
        grad_ent ? c10::optional<at::Tensor>(grad_ent->view({n})) : c10::nullopt, need_grad_hidden, need_grad_weight,
        ep, step);
    logprobs = logp;
    C10_CUDA_CHECK(cuda::policy_loss_finalize(p, partials.data_ptr<double>(), B, items_ptr, float(num_items_value),
                                              float(norm_scale), loss.data_ptr<float>(), stats.data_ptr<float>(),
                                              stream));
  }
  return {loss, stats, gh, gw, gb, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CUDA, m) { m.impl("linear_policy_loss_fwd", &fwd); }

}  // namespace erpd
