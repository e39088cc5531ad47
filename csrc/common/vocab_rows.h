// The vocabulary-length loops of the CPU epilogues (csrc/linear_logprobs/cpu_epilogue.h,
// csrc/linear_kl/cpu.cpp): one row of fp32 logits at a time, SIMD-vectorized. Torch-free; the
// definitions (csrc/common/vocab_rows.cpp) are compiled once per x86 ISA level (SSE2 baseline, AVX2,
// AVX-512) and the best one the CPU runs is picked on first use; ERPD_CPU_ISA=default|avx2|avx512
// forces a level, and the tests run every level this machine has.
//
// Why: with scalar std::exp and double accumulators the epilogues took as much time as the GEMMs
// at H = 512; vectorized, an exp-sum pass is several times cheaper (per-logit costs at each ISA
// level: benchmarks/results/README.md, CPU section). The exp and log are polynomials within
// ~1 ulp (vocab_rows_impl.h); the row sums are float per SIMD lane over blocks of 256 logits, then
// double across blocks (relative error ~1e-8 on a 65k-logit row, like the double sums they
// replace).
//
// The forward statistics are online: each 256-logit block's maximum (from L1) moves the row's
// reference up when it exceeds it, rescaling what was summed so far, so a forward epilogue
// reads each row of the logits chunk once instead of once for the max and once for the sums.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "linear_kl/math.h"  // linear_kl::Mode, linear_kl::JsdWeights

namespace erpd {
namespace cpu {

// The row loops' sum block: float lane sums within a block, double across blocks.
constexpr int64_t kBlock = 256;
inline int64_t num_blocks(int64_t v) { return (v + kBlock - 1) / kBlock; }

// Rows per parallel task of an epilogue: about 64k logits, so a tiny batch stays on one thread
// instead of paying the pool's start-up and join on every call.
inline int64_t row_grain(int64_t v) { return (int64_t(1) << 16) / (v > 1 ? v : 1) + 1; }

// Softmax statistics of one row of logits t z: m = max_k t z_k and, with d_k = t z_k - m,
struct ExpSums {
  float m = -__builtin_inff();
  double s = 0.0;  // sum_k e^{d_k}
  double u = 0.0;  // sum_k e^{d_k} d_k
};

// Both rows' statistics for linear_kl (d^S, d^T about their own maxima).
struct KlSums {
  float ms = -__builtin_inff(), mt = -__builtin_inff();
  double ss = 0.0, st = 0.0;  // the two sums of e^{d}, student and teacher
  double cross = 0.0;         // forward: sum e^{d^T} (d^T - d^S); reverse: sum e^{d^S} (d^S - d^T); jsd: 0
};

// Merging the statistics of two column ranges of a row (the CPU drivers' vocabulary blocks):
// each part moves to the larger reference as the row loops rebase their blocks, in double:
// s' = c s with c = e^{m - M}, u' = c (u + s (m - M)); a part without a reference (m = -inf,
// nothing but -inf or NaN logits) is summed about 0 and stays as it is.
struct Shift {
  double c, d;  // e^{m - M} and m - M
};
inline Shift shift_to(float m, float big) {
  if (m == -__builtin_inff()) return {1.0, 0.0};
  const double d = double(m) - double(big);
  return {std::exp(d), d};
}
inline float larger(float a, float b) { return b > a ? b : a; }

inline void merge(ExpSums& a, const ExpSums& b) {
  const float m = larger(a.m, b.m);
  const Shift x = shift_to(a.m, m), y = shift_to(b.m, m);
  a = {m, x.c * a.s + y.c * b.s, x.c * (a.u + a.s * x.d) + y.c * (b.u + b.s * y.d)};
}

// cross is weighted by the teacher's (forward) or the student's (reverse) exponentials, and each
// of its terms d^T - d^S gains shift^T - shift^S.
inline void merge(KlSums& a, const KlSums& b, int mode) {
  const float ms = larger(a.ms, b.ms), mt = larger(a.mt, b.mt);
  const Shift as = shift_to(a.ms, ms), bs = shift_to(b.ms, ms), at = shift_to(a.mt, mt), bt = shift_to(b.mt, mt);
  double cross = 0.0;
  if (mode == linear_kl::kForward)
    cross = at.c * (a.cross + a.st * (at.d - as.d)) + bt.c * (b.cross + b.st * (bt.d - bs.d));
  else if (mode == linear_kl::kReverse)
    cross = as.c * (a.cross + a.ss * (as.d - at.d)) + bs.c * (b.cross + b.ss * (bs.d - bt.d));
  a = {ms, mt, as.c * a.ss + bs.c * b.ss, at.c * a.st + bt.c * b.st, cross};
}

// The two halves of the jsd: sum p^T (b - log m) and sum p^S (a - log m), M the mixture.
struct JsdSums {
  double kl_t, kl_s;
};

struct VocabRows {
  // The row's statistics in one read. NaN logits are skipped by the maximum and reach the sums.
  ExpSums (*exp_sums)(const float* z, int64_t v, float t);
  // z_k <- -p_k (g + g_H (log p_k + H)), log p_k = t z_k - lse: the log-prob/entropy gradient
  // of a row without its one-hot term.
  void (*logprob_grad)(float* z, int64_t v, float t, float lse, float g, float g_H, float H);
  // Both rows' statistics in one read of each; mode as linear_kl::Mode.
  KlSums (*kl_sums)(const float* zs, const float* zt, int64_t v, float t, int mode);
  // With a_k = t zs_k - lse_s, b_k = t zt_k - lse_t (jsd's second pass, once both lse are known).
  JsdSums (*jsd_sums)(const float* zs, const float* zt, int64_t v, float t, float lse_s, float lse_t,
                      linear_kl::JsdWeights w);
  // zs_k <- g * d(divergence)/dz^S_k (csrc/linear_kl/math.h), a_k and b_k as above; aux: the KL
  // for reverse, KL(S||M) for jsd, unused for forward.
  void (*kl_grad)(float* zs, const float* zt, int64_t v, float t, float lse_s, float lse_t, float aux, float g,
                  int mode, linear_kl::JsdWeights w);
  // The reduced loss's rows (forward and reverse KL): kl_sums, leaving what kl_grad_kept needs in
  // zs (instead of the student's logits) and in kept [v] (a row of the caller's scratch, which
  // stays in cache; the teacher's row is only read), about per-block references ref_s, ref_t
  // [num_blocks(v)]; then zs_k <- g * dKL/dz^S_k from them, with no exp per element.
  KlSums (*kl_sums_keep)(float* zs, const float* zt, float* kept, int64_t v, float t, int mode, float* ref_s,
                         float* ref_t);
  void (*kl_grad_kept)(float* zs, const float* kept, int64_t v, const float* ref_s, const float* ref_t, float lse_s,
                       float lse_t, float aux, float g, int mode);
  const char* isa;
};

// The level in use: ERPD_CPU_ISA at first use, else the best the CPU supports; until switched
// by set_vocab_rows_isa (tests and benchmarks compare the levels in one process).
const VocabRows& vocab_rows();
void set_vocab_rows_isa(const std::string& isa);  // throws on an unknown or unsupported level
std::vector<std::string> supported_isas();

}  // namespace cpu
}  // namespace erpd
