// The vocabulary-length loops of the CPU epilogues (csrc/cpu/linear_logprobs_cpu.h,
// csrc/cpu/linear_kl.cpp): one row of fp32 logits at a time, SIMD-vectorized. Torch-free; the
// definitions (csrc/cpu/vocab_rows.cpp) are compiled once per x86 ISA level (SSE2 baseline, AVX2,
// AVX-512) and the best one the CPU runs is picked on first use; ERPD_CPU_ISA=default|avx2|avx512
// forces a level, and the tests run every level this machine has.
//
// Why: with scalar std::exp and double accumulators the epilogues took as much time as the GEMMs
// at H = 512; vectorized, an exp-sum pass is several times cheaper (per-logit costs at each ISA
// level: benchmarks/results/README.md, CPU section). The exp is a polynomial within ~1 ulp
// (vocab_rows_impl.h); the row sums are float per SIMD lane over blocks of 256 logits, then
// double across blocks (relative error ~1e-8 on a 65k-logit row, like the double sums they
// replace).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace erpd {
namespace cpu {

// Rows per parallel task of an epilogue: about 64k logits, so a tiny batch stays on one thread
// instead of paying the pool's start-up and join on every call.
inline int64_t row_grain(int64_t v) { return (int64_t(1) << 16) / (v > 1 ? v : 1) + 1; }

struct ExpSums {
  double s;  // sum_k e^{d_k}
  double u;  // sum_k e^{d_k} d_k
};

struct KlSums {
  double ss, st;  // the two sums of e^{d}, student and teacher
  double cross;   // forward: sum e^{d^T} (d^T - d^S); reverse: sum e^{d^S} (d^S - d^T); else 0
};

struct VocabRows {
  // max_k z_k; NaN entries are skipped (a NaN logit still reaches the sums below).
  float (*row_max)(const float* z, int64_t v);
  // d_k = t z_k - m.
  ExpSums (*exp_sums)(const float* z, int64_t v, float t, float m);
  // z_k <- -p_k (g + g_H (log p_k + H)), log p_k = t z_k - lse: the log-prob/entropy gradient
  // of a row without its one-hot term.
  void (*logprob_grad)(float* z, int64_t v, float t, float lse, float g, float g_H, float H);
  // d^S_k = t zs_k - ms, d^T_k = t zt_k - mt; mode as linear_kl::Mode (jsd: cross = 0).
  KlSums (*kl_sums)(const float* zs, const float* zt, int64_t v, float t, float ms, float mt, int mode);
  // zs_k <- g * dKL/dz^S_k for forward (p^S - p^T) and reverse (p^S (a - b - kl)) KL, with
  // a_k = t zs_k - lse_s, b_k = t zt_k - lse_t.
  void (*kl_grad)(float* zs, const float* zt, int64_t v, float t, float lse_s, float lse_t, float kl, float g,
                  int mode);
  const char* isa;
};

// The level in use: ERPD_CPU_ISA at first use, else the best the CPU supports; until switched
// by set_vocab_rows_isa (tests and benchmarks compare the levels in one process).
const VocabRows& vocab_rows();
void set_vocab_rows_isa(const std::string& isa);  // throws on an unknown or unsupported level
std::vector<std::string> supported_isas();

}  // namespace cpu
}  // namespace erpd
