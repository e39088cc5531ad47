// CUDA epilogues of linear_kl: they turn one chunk of student and teacher fp32 logits (cuBLAS
// GEMMs, or a slice of dense teacher logits) into per-row divergences (forward) or into the
// student logits' gradient in place (backward). Math: csrc/linear_kl/math.h; the forward's
// passes are those of csrc/linear_kl/cpu.cpp:
//   pass 1: m^S, m^T;  pass 2: s^S, s^T and the cross term of the KLs, with d = z - m,
//     forward  KL = sum e^{d^T}(d^T - d^S) / s^T - log s^T + log s^S
//     reverse  KL = sum e^{d^S}(d^S - d^T) / s^S - log s^S + log s^T
//   pass 3 (jsd only): sum p^T (b - log m), sum p^S (a - log m) once both lse are known.
// One thread block per row (few rows per chunk, large V), reductions by warp shuffles then
// shared memory. No torch headers here.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/block_reduce.cuh"
#include "linear_kl/kernels.h"
#include "linear_kl/math.h"

namespace erpd {
namespace cuda {
namespace {

using linear_kl::JsdWeights;
using linear_kl::Mode;

__global__ void __launch_bounds__(kThreads)
    fwd_epilogue_kernel(const float* __restrict__ zs, const float* __restrict__ zt, int64_t v, float t,
                        const int64_t* __restrict__ targets, int64_t ignore_index, int mode, JsdWeights w,
                        float* __restrict__ kl, float* __restrict__ lse_s, float* __restrict__ lse_t,
                        float* __restrict__ aux) {
  __shared__ float smem[kWarps];
  const int64_t row = blockIdx.x;
  const float *zsr = zs + row * v, *ztr = zt + row * v;
  float ms = -INFINITY, mt = -INFINITY;
  for (int64_t k = threadIdx.x; k < v; k += kThreads) {
    ms = fmaxf(ms, zsr[k]);
    mt = fmaxf(mt, ztr[k]);
  }
  ms = block_reduce(ms, Max{}, smem) * t;  // t > 0
  mt = block_reduce(mt, Max{}, smem) * t;
  float ss = 0.f, st = 0.f, cross = 0.f;
  for (int64_t k = threadIdx.x; k < v; k += kThreads) {
    const float ds = fmaf(zsr[k], t, -ms), dt = fmaf(ztr[k], t, -mt);
    const float es = __expf(ds), et = __expf(dt);
    ss += es;
    st += et;
    if (mode == Mode::kForward) cross += p_times(et, dt - ds);
    else if (mode == Mode::kReverse) cross += p_times(es, ds - dt);
  }
  ss = block_reduce(ss, Sum{}, smem);
  st = block_reduce(st, Sum{}, smem);
  cross = block_reduce(cross, Sum{}, smem);
  const float log_ss = logf(ss), log_st = logf(st);
  float div = 0.f, x = 0.f;
  if (mode == Mode::kForward) {
    div = x = cross / st - log_st + log_ss;
  } else if (mode == Mode::kReverse) {
    div = x = cross / ss - log_ss + log_st;
  } else {
    const float la = ms + log_ss, lb = mt + log_st;
    float kl_t = 0.f, kl_s = 0.f;
    for (int64_t k = threadIdx.x; k < v; k += kThreads) {
      const float a = fmaf(zsr[k], t, -la), b = fmaf(ztr[k], t, -lb);
      const float lm = linear_kl::log_mixture(a, b, w);
      kl_t += p_times(__expf(b), b - lm);
      kl_s += p_times(__expf(a), a - lm);
    }
    kl_t = block_reduce(kl_t, Sum{}, smem);
    kl_s = block_reduce(kl_s, Sum{}, smem);
    div = w.b * kl_t + w.one_mb * kl_s;
    x = kl_s;
  }
  if (threadIdx.x == 0) {
    lse_s[row] = ms + log_ss;
    lse_t[row] = mt + log_st;
    aux[row] = x;
    // Clamp rounding negatives to 0; fmaxf would turn NaN into 0, so compare explicitly.
    kl[row] = targets[row] == ignore_index ? 0.f : (div < 0.f ? 0.f : div);
  }
}

__global__ void __launch_bounds__(kThreads)
    bwd_epilogue_kernel(float* __restrict__ zs, const float* __restrict__ zt, int64_t v, float t,
                        const int64_t* __restrict__ targets, int64_t ignore_index, int mode, JsdWeights w,
                        const float* __restrict__ lse_s, const float* __restrict__ lse_t,
                        const float* __restrict__ aux, const float* __restrict__ grad_kl) {
  const int64_t row = blockIdx.x;
  float* zsr = zs + row * v;
  const float* ztr = zt + row * v;
  if (targets[row] == ignore_index) {
    for (int64_t k = threadIdx.x; k < v; k += kThreads) zsr[k] = 0.f;
    return;
  }
  const float gt = grad_kl[row] * t, la = lse_s[row], lb = lse_t[row], x = aux[row];
  for (int64_t k = threadIdx.x; k < v; k += kThreads)
    zsr[k] = gt * linear_kl::grad_logit(mode, fmaf(zsr[k], t, -la), fmaf(ztr[k], t, -lb), x, w);
}

}  // namespace

cudaError_t linear_kl_fwd_epilogue(const float* zs, const float* zt, int64_t rows, int64_t v, float inv_t,
                                   const int64_t* targets, int64_t ignore_index, int mode, float beta,
                                   float* kl, float* lse_s, float* lse_t, float* aux, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  fwd_epilogue_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      zs, zt, v, inv_t, targets, ignore_index, mode, linear_kl::jsd_weights(beta), kl, lse_s, lse_t, aux);
  return cudaGetLastError();
}

cudaError_t linear_kl_bwd_epilogue(float* zs, const float* zt, int64_t rows, int64_t v, float inv_t,
                                   const int64_t* targets, int64_t ignore_index, int mode, float beta,
                                   const float* lse_s, const float* lse_t, const float* aux,
                                   const float* grad_kl, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  bwd_epilogue_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      zs, zt, v, inv_t, targets, ignore_index, mode, linear_kl::jsd_weights(beta), lse_s, lse_t, aux, grad_kl);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace erpd
