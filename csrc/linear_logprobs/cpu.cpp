// linear_logprobs on CPU: the driver's vocabulary-blocked schedule (csrc/linear_logprobs_driver.h,
// MKL GEMMs) with the fused epilogues of csrc/cpu/linear_logprobs_cpu.h. The math is in the
// driver header.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "linear_logprobs/cpu_epilogue.h"
#include "linear_logprobs/driver.h"

namespace erpd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_temperature, double softcap_scale, int64_t ignore_index, bool with_stats) {
  return linear_logprobs::forward_blocked(hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index,
                                          with_stats, cpu::CpuEpilogue{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
    const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
    double inv_temperature, double softcap_scale, int64_t ignore_index, bool need_grad_hidden, bool need_grad_weight) {
  return linear_logprobs::backward_blocked(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                                           inv_temperature, softcap_scale, ignore_index, need_grad_hidden,
                                           need_grad_weight, cpu::CpuEpilogue{});
}

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CPU, m) {
  m.impl("linear_logprobs_fwd", &fwd);
  m.impl("linear_logprobs_bwd", &bwd);
}

}  // namespace erpd
