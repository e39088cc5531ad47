// The entry points of linear_logprobs (schemas in csrc/bindings.cpp), shared by cpu.cpp and
// cuda.cpp, which register them with their epilogue (cpu_epilogue.h, cuda_epilogue.h). Besides
// the driver's epilogue interface (driver.h), the epilogue type names
//   Guard     held for the call (CUDA: the tensors' device made current);
//   kBlocked  which schedule of the driver runs: the CPU's vocabulary blocks (forward_blocked,
//             backward_blocked) or row chunks of whole rows (forward, backward).
// The math is in driver.h.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "linear_logprobs/driver.h"

namespace erpd {
namespace linear_logprobs {

// The driver's forward in the epilogue's schedule (also the fused policy loss's log-prob pass).
template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scheduled_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_t, double cap_scale, int64_t ignore_index, bool with_stats,
    const Epilogue& ep) {
  if constexpr (Epilogue::kBlocked)
    return linear_logprobs::forward_blocked(hidden, weight, bias, targets, inv_t, cap_scale, ignore_index, with_stats,
                                            ep);
  else
    return linear_logprobs::forward(hidden, weight, bias, targets, inv_t, cap_scale, ignore_index, with_stats, ep);
}

// The driver's backward in the epilogue's schedule.
template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> scheduled_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& ent, const at::Tensor& g_lp,
    const c10::optional<at::Tensor>& g_ent, double inv_t, double cap_scale, int64_t ignore_index,
    bool need_grad_hidden, bool need_grad_weight, const Epilogue& ep) {
  if constexpr (Epilogue::kBlocked)
    return linear_logprobs::backward_blocked(hidden, weight, bias, targets, lse, ent, g_lp, g_ent, inv_t, cap_scale,
                                             ignore_index, need_grad_hidden, need_grad_weight, ep);
  else
    return linear_logprobs::backward(hidden, weight, bias, targets, lse, ent, g_lp, g_ent, inv_t, cap_scale,
                                     ignore_index, need_grad_hidden, need_grad_weight, ep);
}

template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_temperature, double softcap_scale, int64_t ignore_index, bool with_stats) {
  const typename Epilogue::Guard guard(hidden.device());
  return scheduled_forward(hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, with_stats,
                           Epilogue{});
}

template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
    const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
    double inv_temperature, double softcap_scale, int64_t ignore_index, bool need_grad_hidden, bool need_grad_weight) {
  const typename Epilogue::Guard guard(hidden.device());
  return scheduled_backward(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy, inv_temperature,
                            softcap_scale, ignore_index, need_grad_hidden, need_grad_weight, Epilogue{});
}

}  // namespace linear_logprobs
}  // namespace erpd
