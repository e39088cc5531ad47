// linear_kl on CUDA: the entry points of csrc/linear_kl/host.h in the driver's row chunks
// (csrc/linear_kl/driver.h; cuBLAS GEMMs with fp32 output) with the epilogue kernels of
// csrc/linear_kl/kernels.cu, on the current stream. No host syncs. The reduced form
// (forward_with_grads) is compile-checked only (.ci/check_cuda_compile.sh): not yet run on a GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "linear_kl/host.h"
#include "linear_kl/kernels.h"

namespace erpd {
namespace {

struct CudaEpilogue {
  // For the entry points (linear_kl/host.h): row chunks, on the tensors' device.
  static constexpr bool kBlocked = false;
  using Guard = c10::cuda::CUDAGuard;

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

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CUDA, m) {
  m.impl("linear_kl_fwd", &linear_kl::fwd<CudaEpilogue>);
  m.impl("linear_kl_bwd", &linear_kl::bwd<CudaEpilogue>);
  m.impl("linear_kl_fwd_with_grads", &linear_kl::fwd_with_grads<CudaEpilogue>);
}

}  // namespace erpd
