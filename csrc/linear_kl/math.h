// Per-element math of linear_kl shared by the CPU epilogue (csrc/linear_kl/cpu.cpp) and the
// CUDA epilogues (csrc/linear_kl/kernels.cu). Torch-free so that nvcc compiles it on its own.
//
// For one row, with student/teacher log-probs a_k = log p^S_k, b_k = log p^T_k (temperature
// applied to both logits), and dz = d(divergence)/d(student logit z^S_k):
//   forward  KL(T||S) = sum p^T (b - a)                      dz_k = p^S_k - p^T_k
//   reverse  KL(S||T) = sum p^S (a - b)                      dz_k = p^S_k (a_k - b_k - KL)
//   jsd      beta KL(T||M) + (1-beta) KL(S||M),  M = (1-beta) S + beta T, 0 < beta < 1,
//            log m_k = logaddexp(log(1-beta) + a_k, log(beta) + b_k)
//                                                            dz_k = (1-beta) p^S_k (a_k - log m_k - KL(S||M))
// (The jsd gradient: d/dp^S_k of the divergence is (1-beta)(a_k - log m_k); the softmax
// Jacobian subtracts its p^S-weighted mean, which is (1-beta) KL(S||M).) `aux` is the per-row
// scalar the backward needs: KL for reverse, KL(S||M) for jsd (kl again for forward, unused).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define ERPD_HD __host__ __device__ __forceinline__
#else
#define ERPD_HD inline
#endif

namespace erpd {

// p * x, except 0 where p = 0: a zero-probability token (a -inf logit) adds nothing to an
// expectation sum_k p_k x_k, even where x_k is ±inf or NaN there (0 * inf is NaN in IEEE).
// A NaN p stays NaN. Used by every epilogue that weights a per-token term by its probability.
ERPD_HD float p_times(float p, float x) { return p == 0.f ? 0.f : p * x; }

namespace linear_kl {

enum Mode : int { kForward = 0, kReverse = 1, kJsd = 2 };

struct JsdWeights {
  float log_1mb, log_b, one_mb, b;
};

ERPD_HD JsdWeights jsd_weights(float beta) {
  return {log1pf(-beta), logf(beta), 1.f - beta, beta};
}

ERPD_HD float log_mixture(float a, float b, const JsdWeights& w) {
  const float x = w.log_1mb + a, y = w.log_b + b;
  const float hi = fmaxf(x, y), lo = fminf(x, y);
  // Both terms are -inf only where p^S_k = p^T_k = 0 (two -inf logits): NaN, which every caller
  // weights by p_times(0, .) = 0.
  return hi + log1pf(expf(lo - hi));
}

// d(divergence)/dz^S_k for one element (before the upstream gradient and the temperature).
ERPD_HD float grad_logit(int mode, float a, float b, float aux, const JsdWeights& w) {
  const float ps = expf(a);
  if (mode == kForward) return ps - expf(b);
  if (mode == kReverse) return p_times(ps, a - b - aux);
  return w.one_mb * p_times(ps, a - log_mixture(a, b, w) - aux);
}

}  // namespace linear_kl
}  // namespace erpd
