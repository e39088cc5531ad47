// The CUDA epilogues of the chunked linear_logprobs driver (csrc/linear_logprobs/driver.h): thin
// wrappers that launch the kernels of csrc/linear_logprobs/kernels.cu on the current stream. Used by
// csrc/linear_logprobs/cuda.cpp and by the fused policy loss (csrc/linear_policy_loss/cuda.cpp),
// as csrc/linear_logprobs/cpu_epilogue.h is on the CPU.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "linear_logprobs/kernels.h"

namespace erpd {
namespace cuda {

struct CudaEpilogue {
  // For the entry points (linear_logprobs/host.h): row chunks, on the tensors' device.
  static constexpr bool kBlocked = false;
  using Guard = c10::cuda::CUDAGuard;

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

}  // namespace cuda
}  // namespace erpd
