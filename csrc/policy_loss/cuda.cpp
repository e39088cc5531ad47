// policy_loss on CUDA: the kernels of csrc/policy_loss.cu on the current stream, two launches per
// call: the per-row pass (loss terms, metrics' partial sums, gradients without 1/D) and the
// one-block finalize that writes the loss, 1/D and the metrics. The arguments and outputs are
// those of the CPU op (csrc/cpu/policy_loss.cpp); no value is read on the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "policy_loss/host.h"
#include "policy_loss/kernels.h"

namespace erpd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const c10::optional<at::Tensor>& ref_logprobs, const c10::optional<at::Tensor>& entropy,
    const c10::optional<at::Tensor>& is_weights, const c10::optional<at::Tensor>& num_items, int64_t method,
    int64_t agg, double ratio_lo, double ratio_hi, double dual_clip, double tau_pos, double tau_neg, double kl_coef,
    int64_t kl_estimator, double entropy_coef, double num_items_value, double norm_scale, bool kl_ratio_weighted,
    bool need_grad_entropy) {
  policy_cpu::check_batch(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights);
  const at::Device dev = logprobs.device();
  TORCH_CHECK(dev.is_cuda(), "logprobs must be a CUDA tensor");
  policy_cpu::check_devices(dev,
                            {{"old_logprobs", old_logprobs}, {"advantages", advantages}, {"mask", mask},
                             {"ref_logprobs", ref_logprobs}, {"entropy", entropy}, {"is_weights", is_weights}},
                            num_items);
  const c10::cuda::CUDAGuard guard(dev);
  const policy::Params p = policy_cpu::make_params(method, agg, ratio_lo, ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef,
                                                   kl_estimator, entropy_coef, kl_ratio_weighted, ref_logprobs.has_value(),
                                                   entropy.has_value());
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const auto f32 = logprobs.options();
  at::Tensor grad_lp = at::empty({B, T}, f32);
  at::Tensor grad_ent = need_grad_entropy ? at::empty({B, T}, f32) : at::empty({0}, f32);
  const policy::Batch in = policy_cpu::batch(logprobs, &old_logprobs, advantages, mask, ref_logprobs, entropy,
                                             is_weights, grad_lp, need_grad_entropy ? &grad_ent : nullptr);
  // The one-element tensor stays on the device; the finalize kernel reads it.
  const at::Tensor items = num_items ? num_items->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor partials = at::empty({B, policy::kNumParts}, f32.dtype(at::kDouble));
  at::Tensor loss = at::empty({}, f32), stats = at::empty({policy::kNumStats}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cuda::policy_loss_rows(p, in, B, partials.data_ptr<double>(), stream));
  C10_CUDA_CHECK(cuda::policy_loss_finalize(p, partials.data_ptr<double>(), B,
                                            items.defined() ? items.data_ptr<float>() : nullptr, float(num_items_value),
                                            float(norm_scale), loss.data_ptr<float>(), stats.data_ptr<float>(), stream));
  return {loss, stats, grad_lp, grad_ent};
}

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CUDA, m) { m.impl("policy_loss_fwd", &fwd); }

}  // namespace erpd
