// CUDA epilogues of linear_logprobs: they turn one chunk of fp32 logits, written by a cuBLAS
// GEMM, into per-row statistics (forward) or into the logits' gradient in place (backward).
//
// Math, for a row with raw logits x, temperature factor t, z = t x and target y:
//   m = max z,  s = sum e^{z - m},  u = sum e^{z - m} (z - m)
//   lse = m + log s,  log p_y = z_y - lse,  H = log s - u / s
// Backward, p = e^{z - lse}:
//   t dz_k = t [g_lp (delta_ky - p_k) - g_H p_k (log p_k + H)]
// One thread block per row: the chunk has few rows (a byte budget bounds it) but V is large,
// so a row's reductions are spread over the block, with warp shuffles then shared memory.
// No torch headers here (see kernels.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/block_reduce.cuh"
#include "linear_kl/math.h"  // p_times
#include "linear_logprobs/kernels.h"

namespace erpd {
namespace cuda {
namespace {

__global__ void __launch_bounds__(kThreads)
    fwd_epilogue_kernel(const float* __restrict__ z, int64_t v, float t, const int64_t* __restrict__ targets,
                        int64_t ignore_index, float* __restrict__ logp, float* __restrict__ ent,
                        float* __restrict__ lse) {
  __shared__ float smem[kWarps];
  const int64_t row = blockIdx.x;
  const float* zr = z + row * v;
  float m = -INFINITY;
  for (int64_t k = threadIdx.x; k < v; k += kThreads) m = fmaxf(m, zr[k]);
  m = block_reduce(m, Max{}, smem) * t;  // t > 0, so max(t x) = t max(x)
  // A NaN logit is skipped by fmaxf but reaches s through exp(NaN) below.
  float s = 0.f, u = 0.f;
  for (int64_t k = threadIdx.x; k < v; k += kThreads) {
    const float d = fmaf(zr[k], t, -m), e = __expf(d);
    s += e;
    u += p_times(e, d);  // a -inf logit: e = 0, d = -inf, adds 0
  }
  s = block_reduce(s, Sum{}, smem);
  u = block_reduce(u, Sum{}, smem);
  if (threadIdx.x == 0) {
    const float log_s = logf(s), l = m + log_s;
    const int64_t y = targets[row];
    const bool valid = y != ignore_index;
    lse[row] = l;
    logp[row] = valid ? zr[y] * t - l : 0.f;
    ent[row] = valid ? log_s - u / s : 0.f;
  }
}

__global__ void __launch_bounds__(kThreads)
    bwd_epilogue_kernel(float* __restrict__ z, int64_t v, float t, const int64_t* __restrict__ targets,
                        int64_t ignore_index, const float* __restrict__ lse, const float* __restrict__ ent,
                        const float* __restrict__ g_lp, const float* __restrict__ g_ent) {
  const int64_t row = blockIdx.x;
  float* zr = z + row * v;
  const int64_t y = targets[row];
  if (y == ignore_index) {
    for (int64_t k = threadIdx.x; k < v; k += kThreads) zr[k] = 0.f;
    return;
  }
  // The chain-rule factor t is folded into both upstream gradients once.
  const float l = lse[row], H = ent[row], g = g_lp[row] * t, gH = g_ent ? g_ent[row] * t : 0.f;
  for (int64_t k = threadIdx.x; k < v; k += kThreads) {
    const float lp = fmaf(zr[k], t, -l), p = __expf(lp);
    zr[k] = -p_times(p, fmaf(gH, lp + H, g)) + (k == y ? g : 0.f);
  }
}

}  // namespace

cudaError_t linear_logprobs_fwd_epilogue(const float* z, int64_t rows, int64_t v, float inv_t,
                                  const int64_t* targets, int64_t ignore_index, float* logp,
                                  float* ent, float* lse, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  fwd_epilogue_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(z, v, inv_t, targets, ignore_index, logp, ent, lse);
  return cudaGetLastError();
}

cudaError_t linear_logprobs_bwd_epilogue(float* z, int64_t rows, int64_t v, float inv_t,
                                  const int64_t* targets, int64_t ignore_index, const float* lse,
                                  const float* ent, const float* g_lp, const float* g_ent,
                                  cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  bwd_epilogue_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(z, v, inv_t, targets, ignore_index, lse, ent, g_lp, g_ent);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace erpd
