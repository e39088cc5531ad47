// linear_kl on CUDA: the chunked driver (csrc/linear_kl_driver.h; cuBLAS GEMMs with fp32 output)
// with the epilogue kernels of csrc/linear_kl.cu, on the current stream. No host syncs. The
// reduced form (forward_with_grads) is compile-checked only (.ci/check_cuda_compile.sh): not
// yet run on a GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "linear_kl/driver.h"
#include "linear_kl/kernels.h"

namespace erpd {
namespace {

struct CudaEpilogue {
  void forward(const at::Tensor& zs, const at::Tensor& zt, int64_t r0, double inv_t, int64_t ignore_index,
               const at::Tensor& targets, int64_t mode, double beta, at::Tensor& kl, at::Tensor& lse_s,
               at::Tensor& lse_t, at::Tensor& aux) const {
    C10_CUDA_CHECK(cuda::linear_kl_fwd_epilogue(
        zs.data_ptr<float>(), zt.data_ptr<float>(), zs.size(0), zs.size(1), float(inv_t),
        targets.data_ptr<int64_t>() + r0, ignore_index, int(mode), float(beta), kl.data_ptr<float>() + r0,
        lse_s.data_ptr<float>() + r0, lse_t.data_ptr<float>() + r0, aux.data_ptr<float>() + r0,
        c10::cuda::getCurrentCUDAStream()));
  }

  void backward(at::Tensor& zs, const at::Tensor& zt, int64_t r0, double inv_t, int64_t ignore_index,
                const at::Tensor& targets, int64_t mode, double beta, const at::Tensor& lse_s,
                const at::Tensor& lse_t, const at::Tensor& aux, const at::Tensor& grad_kl) const {
    C10_CUDA_CHECK(cuda::linear_kl_bwd_epilogue(
        zs.data_ptr<float>(), zt.data_ptr<float>(), zs.size(0), zs.size(1), float(inv_t),
        targets.data_ptr<int64_t>() + r0, ignore_index, int(mode), float(beta), lse_s.data_ptr<float>() + r0,
        lse_t.data_ptr<float>() + r0, aux.data_ptr<float>() + r0, grad_kl.data_ptr<float>() + r0,
        c10::cuda::getCurrentCUDAStream()));
  }

  // Two kernels on the same chunk: the forward writes the row statistics the backward reads.
  void forward_backward(at::Tensor& zs, const at::Tensor& zt, int64_t r0, double inv_t, int64_t ignore_index,
                        const at::Tensor& targets, int64_t mode, double beta, const at::Tensor& grad_kl,
                        at::Tensor& kl, at::Tensor& lse_s, at::Tensor& lse_t, at::Tensor& aux) const {
    forward(zs, zt, r0, inv_t, ignore_index, targets, mode, beta, kl, lse_s, lse_t, aux);
    backward(zs, zt, r0, inv_t, ignore_index, targets, mode, beta, lse_s, lse_t, aux, grad_kl);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& teacher_hidden, const c10::optional<at::Tensor>& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& teacher_logits,
    const at::Tensor& targets, double inv_temperature, int64_t ignore_index, int64_t mode, double beta) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const linear_kl::Teacher teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits);
  return linear_kl::forward(hidden, weight, bias, teacher, targets, inv_temperature, ignore_index, mode, beta,
                            CudaEpilogue{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& teacher_hidden, const c10::optional<at::Tensor>& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& teacher_logits,
    const at::Tensor& targets, const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& aux,
    const at::Tensor& grad_kl, double inv_temperature, int64_t ignore_index, int64_t mode, double beta,
    bool need_grad_hidden, bool need_grad_weight) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const linear_kl::Teacher teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits);
  return linear_kl::backward(hidden, weight, bias, teacher, targets, lse_s, lse_t, aux, grad_kl, inv_temperature,
                             ignore_index, mode, beta, need_grad_hidden, need_grad_weight, CudaEpilogue{});
}

// The reduced loss (erpd.linear_kl with a reduction): grad_kl holds each row's weight, computed
// on the device from the targets (and num_items) before the call, so nothing syncs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_with_grads(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& teacher_hidden, const c10::optional<at::Tensor>& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& teacher_logits,
    const at::Tensor& targets, const at::Tensor& grad_kl, double inv_temperature, int64_t ignore_index, int64_t mode,
    double beta, bool need_grad_hidden, bool need_grad_weight) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const linear_kl::Teacher teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits);
  return linear_kl::forward_with_grads(hidden, weight, bias, teacher, targets, grad_kl, inv_temperature,
                                       ignore_index, mode, beta, need_grad_hidden, need_grad_weight, CudaEpilogue{});
}

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CUDA, m) {
  m.impl("linear_kl_fwd", &fwd);
  m.impl("linear_kl_bwd", &bwd);
  m.impl("linear_kl_fwd_with_grads", &fwd_with_grads);
}

}  // namespace erpd
