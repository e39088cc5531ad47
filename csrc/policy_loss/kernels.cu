// CUDA kernels of the policy losses: the per-token math of csrc/policy_loss/math.h (shared with
// the CPU ops, which define what these compute), one thread block per row (sequence).
//
// Math (math.h has it in full): per valid token, a loss l_t and dl/dx_t from the
// log-ratio x - x_old; the loss is sum_t m_t f_b / D [rho_t l_t + kl_coef k_t - entropy_coef H_t]
// with f_b = 1 / max(L_b, 1) for seq-mean-token-mean (L_b = the row's valid-token count), else 1,
// and D the batch normaliser. gspo's tokens share the row's ratio s_b = exp(mean_t m (x - x_old)),
// so a row needs a pass for L_b and s_b, a pass for the losses, and a pass that adds
//   dL/dx_t += m_t f_b (sum_t' m rho dl_t'/dlog s) / L_b   (times 1/D, applied by the caller).
//
// Layout. A row's tokens are spread over the block (thread j takes t = j, j + 256, ...); each
// thread accumulates a policy::Acc (float64 sums, ratio min/max) and the block merges them with
// warp shuffles and shared memory (block_reduce.cuh) into the row's partials. D can need the whole
// batch's token count, which no row block has, so a one-block finalize kernel reduces the rows'
// partials and writes the loss, 1/D and the metrics on the device: the host never reads a value.
// The fused op (csrc/linear_policy_loss/cuda.cpp) instead gets 1/D from the mask before its
// single pass (policy_loss_norm) and runs the per-token pass chunk by chunk (policy_loss_segments).
// No torch headers here (see kernels.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/block_reduce.cuh"
#include "policy_loss/kernels.h"

namespace erpd {
namespace cuda {
namespace {

using policy::Acc;
using policy::Batch;
using policy::kNumParts;
using policy::Params;

// policy::Acc::merge's rules per part (min / max of the ratio, sums otherwise); NaN propagates as
// it does on the CPU.
struct MinD {
  __device__ double operator()(double a, double b) const { return policy::mind(a, b); }
};
struct MaxD {
  __device__ double operator()(double a, double b) const { return policy::maxd(a, b); }
};

// Every thread gets the merge of the block's accumulators. Unrolled, so that acc.v stays in
// registers.
__device__ __forceinline__ void block_merge(Acc& acc, double* smem) {
#pragma unroll
  for (int k = 0; k < kNumParts; ++k) {
    if (k == policy::kPartRatioMin) acc.v[k] = block_reduce(acc.v[k], MinD{}, smem);
    else if (k == policy::kPartRatioMax) acc.v[k] = block_reduce(acc.v[k], MaxD{}, smem);
    else acc.v[k] = block_reduce(acc.v[k], Sum{}, smem);
  }
}

__device__ __forceinline__ void store(const Acc& acc, double* dst) {
#pragma unroll
  for (int k = 0; k < kNumParts; ++k) dst[k] = acc.v[k];
}

__device__ __forceinline__ Acc load(const double* src) {
  Acc acc;
#pragma unroll
  for (int k = 0; k < kNumParts; ++k) acc.v[k] = src[k];
  return acc;
}

// policy::process_row, one block per row.
__global__ void __launch_bounds__(kThreads) rows_kernel(Params p, Batch in, double* __restrict__ partials) {
  __shared__ double smem[kWarps];
  const int64_t b = blockIdx.x, base = b * in.T;
  const bool gspo = p.method == policy::kGSPO;
  double length = 0.0, sum_delta = 0.0;
  if (p.agg == policy::kSeqMeanTokenMean || gspo) {
    for (int64_t t = threadIdx.x; t < in.T; t += kThreads) {
      const int64_t i = base + t;
      if (!in.mask[i]) continue;
      length += 1.0;
      if (gspo && in.old_logprobs) sum_delta += double(in.logprobs[i]) - in.old_logprobs[i];
    }
    length = block_reduce(length, Sum{}, smem);
    if (gspo) sum_delta = block_reduce(sum_delta, Sum{}, smem);
  }
  const float f = policy::row_factor(p, float(length));
  const float seq_log_ratio = gspo ? float(sum_delta / policy::maxd(length, 1.0)) : 0.f;
  const float adv_row = in.adv_per_row ? in.advantages[b] : 0.f;
  Acc acc;
  double g_seq = 0.0;  // gspo: sum_t m rho dl/dlog s
  for (int64_t t = threadIdx.x; t < in.T; t += kThreads) {
    policy::token_step(p, in, base + t, adv_row, f, seq_log_ratio, acc, g_seq);
  }
  block_merge(acc, smem);
  if (threadIdx.x == 0) store(acc, partials + b * kNumParts);
  if (!gspo) return;
  // Each thread revisits the tokens it wrote above, so no other thread's writes are involved.
  const float g_pol = policy::gspo_token_grad(f, block_reduce(g_seq, Sum{}, smem), length);
  for (int64_t t = threadIdx.x; t < in.T; t += kThreads) {
    const int64_t i = base + t;
    if (in.mask[i]) in.grad_logprobs[i] += g_pol;
  }
}

// One block: the rows' partials -> loss and stats (policy::finalize).
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(Params p, const double* __restrict__ partials, int64_t rows, const float* __restrict__ num_items,
                    float num_items_value, float norm_scale, float* __restrict__ loss, float* __restrict__ stats) {
  __shared__ double smem[kWarps];
  Acc acc;
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) acc.merge(load(partials + r * kNumParts));
  block_merge(acc, smem);
  if (threadIdx.x == 0) {
    policy::finalize(p, acc, rows, num_items ? policy::tensor_items(*num_items) : num_items_value, norm_scale, loss, stats);
  }
}

// One block per row: its valid-token count and aggregation factor; resets its partials.
__global__ void __launch_bounds__(kThreads)
    lengths_kernel(Params p, const bool* __restrict__ mask, int64_t T, float* __restrict__ row_f,
                   float* __restrict__ lengths, double* __restrict__ partials) {
  __shared__ double smem[kWarps];
  const int64_t b = blockIdx.x;
  double len = 0.0;
  for (int64_t t = threadIdx.x; t < T; t += kThreads) len += mask[b * T + t];
  len = block_reduce(len, Sum{}, smem);
  if (threadIdx.x == 0) {
    lengths[b] = float(len);
    row_f[b] = policy::row_factor(p, float(len));
    store(Acc(), partials + b * kNumParts);
  }
}

// One block: 1/D from the row lengths (policy::inv_norm).
__global__ void __launch_bounds__(kThreads)
    inv_norm_kernel(Params p, const float* __restrict__ lengths, int64_t rows, const float* __restrict__ num_items,
                    float num_items_value, float norm_scale, float* __restrict__ inv) {
  __shared__ double smem[kWarps];
  double n = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) n += lengths[r];
  n = block_reduce(n, Sum{}, smem);
  if (threadIdx.x == 0) {
    *inv = float(policy::inv_norm(p, n, rows, num_items ? policy::tensor_items(*num_items) : num_items_value, norm_scale));
  }
}

// One block per row that tokens [r0, r0 + r) touch: policy::process_segment on the row's part of
// the chunk, gradients scaled by 1/D, partial sums merged into the row's.
__global__ void __launch_bounds__(kThreads)
    segments_kernel(Params p, Batch in, int64_t r0, int64_t r, const float* __restrict__ row_f,
                    const float* __restrict__ inv_norm, double* __restrict__ partials) {
  __shared__ double smem[kWarps];
  const int64_t b = r0 / in.T + blockIdx.x, base = b * in.T;
  const int64_t t0 = r0 > base ? r0 - base : 0, t1 = r0 + r - base < in.T ? r0 + r - base : in.T;
  const float f = row_f[b], inv = *inv_norm;
  const float adv_row = in.adv_per_row ? in.advantages[b] : 0.f;
  Acc acc;
  double unused = 0.0;
  for (int64_t t = t0 + threadIdx.x; t < t1; t += kThreads) {
    const int64_t i = base + t;
    policy::token_step(p, in, i, adv_row, f, 0.f, acc, unused);
    in.grad_logprobs[i] *= inv;
    if (in.grad_entropy) in.grad_entropy[i] *= inv;
  }
  block_merge(acc, smem);
  if (threadIdx.x == 0) {
    // A row split over chunks gets its blocks in chunk order (one stream), never concurrently.
    Acc row = load(partials + b * kNumParts);
    row.merge(acc);
    store(row, partials + b * kNumParts);
  }
}

}  // namespace

cudaError_t policy_loss_rows(const Params& p, const Batch& in, int64_t rows, double* partials, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  rows_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(p, in, partials);
  return cudaGetLastError();
}

cudaError_t policy_loss_finalize(const Params& p, const double* partials, int64_t rows, const float* num_items,
                                 float num_items_value, float norm_scale, float* loss, float* stats,
                                 cudaStream_t stream) {
  finalize_kernel<<<1, kThreads, 0, stream>>>(p, partials, rows, num_items, num_items_value, norm_scale, loss, stats);
  return cudaGetLastError();
}

cudaError_t policy_loss_norm(const Params& p, const bool* mask, int64_t rows, int64_t T, const float* num_items,
                             float num_items_value, float norm_scale, float* row_f, float* lengths, float* inv,
                             double* partials, cudaStream_t stream) {
  if (rows > 0) {
    lengths_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(p, mask, T, row_f, lengths, partials);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  inv_norm_kernel<<<1, kThreads, 0, stream>>>(p, lengths, rows, num_items, num_items_value, norm_scale, inv);
  return cudaGetLastError();
}

cudaError_t policy_loss_segments(const Params& p, const Batch& in, int64_t r0, int64_t r, const float* row_f,
                                 const float* inv, double* partials, cudaStream_t stream) {
  if (r == 0) return cudaSuccess;
  const int64_t blocks = (r0 + r - 1) / in.T - r0 / in.T + 1;
  segments_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, in, r0, r, row_f, inv, partials);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace erpd
