// The entry points of linear_kl (schemas in csrc/bindings.cpp), shared by cpu.cpp and cuda.cpp,
// which register them with their epilogue. Each builds the Teacher from the optional teacher
// arguments and runs the driver (driver.h). Besides the driver's epilogue interface, the
// epilogue type names
//   Guard     held for the call (CUDA: the tensors' device made current);
//   kBlocked  which schedule of the driver the forward and backward run: the CPU's vocabulary
//             blocks (forward_blocked, backward_blocked) or row chunks of whole rows.
// The reduced form (forward_with_grads) takes whole rows on either device.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "linear_kl/driver.h"

namespace erpd {
namespace linear_kl {

template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& teacher_hidden, const c10::optional<at::Tensor>& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& teacher_logits,
    const at::Tensor& targets, double inv_temperature, int64_t ignore_index, int64_t mode, double beta) {
  const typename Epilogue::Guard guard(hidden.device());
  const Teacher teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits);
  if constexpr (Epilogue::kBlocked)
    return linear_kl::forward_blocked(hidden, weight, bias, teacher, targets, inv_temperature, ignore_index, mode,
                                      beta, Epilogue{});
  else
    return linear_kl::forward(hidden, weight, bias, teacher, targets, inv_temperature, ignore_index, mode, beta,
                              Epilogue{});
}

template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& teacher_hidden, const c10::optional<at::Tensor>& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& teacher_logits,
    const at::Tensor& targets, const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& aux,
    const at::Tensor& grad_kl, double inv_temperature, int64_t ignore_index, int64_t mode, double beta,
    bool need_grad_hidden, bool need_grad_weight) {
  const typename Epilogue::Guard guard(hidden.device());
  const Teacher teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits);
  if constexpr (Epilogue::kBlocked)
    return linear_kl::backward_blocked(hidden, weight, bias, teacher, targets, lse_s, lse_t, aux, grad_kl,
                                       inv_temperature, ignore_index, mode, beta, need_grad_hidden,
                                       need_grad_weight, Epilogue{});
  else
    return linear_kl::backward(hidden, weight, bias, teacher, targets, lse_s, lse_t, aux, grad_kl, inv_temperature,
                               ignore_index, mode, beta, need_grad_hidden, need_grad_weight, Epilogue{});
}

// The reduced loss (erpd.linear_kl with a reduction): grad_kl holds each row's weight, computed
// before the call (on CUDA, on the device from the targets and num_items, so nothing syncs).
template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_with_grads(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& teacher_hidden, const c10::optional<at::Tensor>& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& teacher_logits,
    const at::Tensor& targets, const at::Tensor& grad_kl, double inv_temperature, int64_t ignore_index, int64_t mode,
    double beta, bool need_grad_hidden, bool need_grad_weight) {
  const typename Epilogue::Guard guard(hidden.device());
  const Teacher teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits);
  return linear_kl::forward_with_grads(hidden, weight, bias, teacher, targets, grad_kl, inv_temperature, ignore_index,
                                       mode, beta, need_grad_hidden, need_grad_weight, Epilogue{});
}

}  // namespace linear_kl
}  // namespace erpd
