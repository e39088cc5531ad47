// linear_logprobs on CUDA: the chunked driver (csrc/linear_logprobs_driver.h; cuBLAS GEMMs with
// fp32 output) with the epilogue kernels of csrc/linear_logprobs.cu, on the current stream.
// Nothing here synchronizes with the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "linear_logprobs/cuda_epilogue.h"
#include "linear_logprobs/driver.h"

namespace erpd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_temperature, double softcap_scale, int64_t ignore_index, bool with_stats) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_logprobs::forward(hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index,
                                  with_stats, cuda::CudaEpilogue{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
    const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
    double inv_temperature, double softcap_scale, int64_t ignore_index, bool need_grad_hidden, bool need_grad_weight) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_logprobs::backward(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                                   inv_temperature, softcap_scale, ignore_index, need_grad_hidden, need_grad_weight,
                                   cuda::CudaEpilogue{});
}

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CUDA, m) {
  m.impl("linear_logprobs_fwd", &fwd);
  m.impl("linear_logprobs_bwd", &bwd);
}

}  // namespace erpd
