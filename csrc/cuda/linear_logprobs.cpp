// linear_logprobs on CUDA: the chunked driver (csrc/linear_logprobs_driver.h; cuBLAS GEMMs with
// fp32 output) with the epilogue kernels of csrc/linear_logprobs.cu, on the current stream.
// Nothing here synchronizes with the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "linear_logprobs_cuda.h"
#include "linear_logprobs_driver.h"

namespace erpd {
namespace {

struct CudaEpilogue {
  void forward(const at::Tensor& z, int64_t r0, double inv_t, int64_t ignore_index,
               const at::Tensor& targets, at::Tensor& logp, at::Tensor& ent, at::Tensor& lse) const {
    C10_CUDA_CHECK(cuda::linear_logprobs_fwd_epilogue(
        z.data_ptr<float>(), z.size(0), z.size(1), float(inv_t), targets.data_ptr<int64_t>() + r0,
        ignore_index, logp.data_ptr<float>() + r0, ent.data_ptr<float>() + r0, lse.data_ptr<float>() + r0,
        c10::cuda::getCurrentCUDAStream()));
  }

  void backward(at::Tensor& z, int64_t r0, double inv_t, int64_t ignore_index,
                const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& ent,
                const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent) const {
    C10_CUDA_CHECK(cuda::linear_logprobs_bwd_epilogue(
        z.data_ptr<float>(), z.size(0), z.size(1), float(inv_t), targets.data_ptr<int64_t>() + r0,
        ignore_index, lse.data_ptr<float>() + r0, ent.data_ptr<float>() + r0, g_lp.data_ptr<float>() + r0,
        g_ent.has_value() ? g_ent->data_ptr<float>() + r0 : nullptr, c10::cuda::getCurrentCUDAStream()));
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_temperature, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_logprobs::forward(hidden, weight, bias, targets, inv_temperature, ignore_index, CudaEpilogue{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
    const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
    double inv_temperature, int64_t ignore_index, bool need_grad_hidden, bool need_grad_weight) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_logprobs::backward(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                                   inv_temperature, ignore_index, need_grad_hidden, need_grad_weight, CudaEpilogue{});
}

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CUDA, m) {
  m.impl("linear_logprobs_fwd", &fwd);
  m.impl("linear_logprobs_bwd", &bwd);
}

}  // namespace erpd
