// Launchers of the linear_kl CUDA epilogues (csrc/linear_kl/kernels.cu). Torch-free on purpose (see
// csrc/linear_logprobs/kernels.h). Each returns the launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace erpd {
namespace cuda {

// zs, zt: [rows, v] fp32 student/teacher logits before the temperature (row stride v). Writes
// kl/lse_s/lse_t/aux[rows] (already offset). mode: 0 KL(T||S), 1 KL(S||T), 2 JSD(beta).
cudaError_t linear_kl_fwd_epilogue(const float* zs, const float* zt, int64_t rows, int64_t v, float inv_t,
                                   const int64_t* targets, int64_t ignore_index, int mode, float beta,
                                   float* kl, float* lse_s, float* lse_t, float* aux, cudaStream_t stream);

// Overwrites zs with inv_t * grad_kl * d(divergence)/dz^S.
cudaError_t linear_kl_bwd_epilogue(float* zs, const float* zt, int64_t rows, int64_t v, float inv_t,
                                   const int64_t* targets, int64_t ignore_index, int mode, float beta,
                                   const float* lse_s, const float* lse_t, const float* aux,
                                   const float* grad_kl, cudaStream_t stream);

}  // namespace cuda
}  // namespace erpd
