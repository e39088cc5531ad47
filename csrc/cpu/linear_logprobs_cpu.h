// The CPU epilogues of the chunked linear_logprobs driver (csrc/linear_logprobs_driver.h): fused
// per-row loops over one chunk of fp32 logits, parallel over rows (ATen's OpenMP pool), each row
// a vectorized loop of csrc/cpu/vocab_rows.h. Used by csrc/cpu/linear_logprobs.cpp and by the
// fused policy loss (csrc/cpu/linear_policy_loss.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu/vocab_rows.h"

namespace erpd {
namespace cpu {

struct CpuEpilogue {
  // One read of each row: its maximum and sums online (csrc/cpu/vocab_rows.h).
  void forward(const at::Tensor& z, int64_t r0, double inv_t, int64_t ignore_index,
               const at::Tensor& targets, at::Tensor& logp, at::Tensor& ent, at::Tensor& lse) const {
    const int64_t r = z.size(0), v = z.size(1);
    const float t = float(inv_t);
    const float* zp = z.data_ptr<float>();
    const int64_t* tgt = targets.data_ptr<int64_t>() + r0;
    float *lp = logp.data_ptr<float>() + r0, *en = ent.data_ptr<float>() + r0, *ls = lse.data_ptr<float>() + r0;
    const VocabRows& rows = vocab_rows();
    at::parallel_for(0, r, row_grain(v), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float* zi = zp + i * v;
        const ExpSums su = rows.exp_sums(zi, v, t);
        const double log_s = std::log(su.s), row_lse = double(su.m) + log_s;
        const int64_t y = tgt[i];
        const bool valid = y != ignore_index;
        ls[i] = float(row_lse);
        lp[i] = valid ? float(double(zi[y] * t) - row_lse) : 0.f;
        en[i] = valid ? float(log_s - su.u / su.s) : 0.f;
      }
    });
  }

  void backward(at::Tensor& z, int64_t r0, double inv_t, int64_t ignore_index,
                const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& ent,
                const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent) const {
    const int64_t r = z.size(0), v = z.size(1);
    const float t = float(inv_t);
    float* zp = z.data_ptr<float>();
    const int64_t* tgt = targets.data_ptr<int64_t>() + r0;
    const float *ls = lse.data_ptr<float>() + r0, *en = ent.data_ptr<float>() + r0, *glp = g_lp.data_ptr<float>() + r0;
    const float* gen = g_ent.has_value() ? g_ent->data_ptr<float>() + r0 : nullptr;
    const VocabRows& rows = vocab_rows();
    at::parallel_for(0, r, row_grain(v), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        float* zi = zp + i * v;
        const int64_t y = tgt[i];
        if (y == ignore_index) {
          std::fill(zi, zi + v, 0.f);
          continue;
        }
        // The temperature's chain-rule factor t is folded into both upstream gradients.
        const float g = glp[i] * t;
        rows.logprob_grad(zi, v, t, ls[i], g, gen ? gen[i] * t : 0.f, en[i]);
        zi[y] += g;
      }
    });
  }
};

}  // namespace cpu
}  // namespace erpd
