// Launchers of the linear_logprobs CUDA epilogues (csrc/linear_logprobs/kernels.cu). Torch-free on
// purpose: the .cu file compiles with plain nvcc, which is how CI checks it without a CUDA torch. Each returns the launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace erpd {
namespace cuda {

// z: [rows, v] fp32 logits before the temperature. Writes logp/ent/lse[rows] (already offset).
cudaError_t linear_logprobs_fwd_epilogue(const float* z, int64_t rows, int64_t v, float inv_t,
                                  const int64_t* targets, int64_t ignore_index, float* logp,
                                  float* ent, float* lse, cudaStream_t stream);

// Overwrites z with inv_t * dz; g_ent may be null (no entropy gradient).
cudaError_t linear_logprobs_bwd_epilogue(float* z, int64_t rows, int64_t v, float inv_t,
                                  const int64_t* targets, int64_t ignore_index, const float* lse,
                                  const float* ent, const float* g_lp, const float* g_ent,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace erpd
