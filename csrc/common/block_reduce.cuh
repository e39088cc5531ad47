// Block-wide reductions for the one-block-per-row CUDA epilogues (csrc/<op>/kernels.cu): warp
// shuffles, then one value per warp through shared memory. Torch-free, like the .cu files that
// use it.
#pragma once

#include <cuda_runtime.h>

namespace erpd {
namespace cuda {

constexpr int kThreads = 256;  // threads per row block in every epilogue
constexpr int kWarps = kThreads / 32;

// Every thread gets the reduction of x over the block; smem holds kWarps values of type T
// (float for the epilogues, double for the policy losses' per-row sums).
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T x, Op op, T* smem) {
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  x = smem[0];
  for (int w = 1; w < kWarps; ++w) x = op(x, smem[w]);
  return x;
}

struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Sum {
  template <class T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

}  // namespace cuda
}  // namespace erpd
