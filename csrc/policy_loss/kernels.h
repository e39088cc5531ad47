// Launchers of the policy-loss CUDA kernels (csrc/policy_loss/kernels.cu). Torch-free on purpose,
// like csrc/linear_logprobs/kernels.h: the .cu file compiles with plain nvcc. Pointers are device
// pointers; `partials` is [rows, policy::kNumParts] float64 (one policy::Acc per row). Each
// launcher returns the launch status and never synchronizes with the host.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "policy_loss/math.h"

namespace erpd {
namespace cuda {

// policy_loss's per-row pass over a [rows, in.T] batch: one block per row computes what
// policy::process_row does on the CPU (gspo's three passes included): the row's partial sums
// into partials[row] and every token's gradients, without 1/D.
cudaError_t policy_loss_rows(const policy::Params& p, const policy::Batch& in, int64_t rows, double* partials,
                             cudaStream_t stream);

// Reduces partials over the rows and writes the loss (0-dim) and stats[policy::kNumStats], as
// policy::finalize. num_items: a device scalar (through policy::tensor_items), or null to use
// num_items_value (0: not given).
cudaError_t policy_loss_finalize(const policy::Params& p, const double* partials, int64_t rows,
                                 const float* num_items, float num_items_value, float norm_scale, float* loss,
                                 float* stats, cudaStream_t stream);

// For the fused op's single pass: the aggregation factor of each row (row_f[rows]) and 1/D
// (*inv), from the [rows, T] mask alone; also resets partials to empty accumulators.
// lengths[rows] is scratch.
cudaError_t policy_loss_norm(const policy::Params& p, const bool* mask, int64_t rows, int64_t T,
                             const float* num_items, float num_items_value, float norm_scale, float* row_f,
                             float* lengths, float* inv, double* partials, cudaStream_t stream);

// The fused op's per-chunk step for token-level methods (not gspo): tokens [r0, r0 + r) of the
// flattened batch, whose log-probs and entropies in.logprobs / in.entropy now hold. Writes their
// gradients *with* 1/D (*inv), since the chunk's GEMMs consume them right away, and merges their
// partial sums into partials[row] (reset by policy_loss_norm). Chunks must run in order on one
// stream (a row split over two chunks is updated by both).
cudaError_t policy_loss_segments(const policy::Params& p, const policy::Batch& in, int64_t r0, int64_t r,
                                 const float* row_f, const float* inv, double* partials, cudaStream_t stream);

}  // namespace cuda
}  // namespace erpd
