// The CPU epilogues of the chunked linear_logprobs driver (csrc/linear_logprobs_driver.h): fused
// per-row loops over one chunk of fp32 logits, parallel over rows (ATen's OpenMP pool). Used by
// csrc/cpu/linear_logprobs.cpp and by the fused policy loss (csrc/cpu/linear_policy_loss.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace erpd {
namespace cpu {

// Rows per parallel task: about 64k logits, so a tiny batch stays on one thread instead of paying
// the pool's start-up and join on every call.
inline int64_t row_grain(int64_t v) { return (int64_t(1) << 16) / std::max<int64_t>(v, 1) + 1; }

struct CpuEpilogue {
  // One pass for the max, one for the exponentials; both over a row that is still in cache.
  void forward(const at::Tensor& z, int64_t r0, double inv_t, int64_t ignore_index,
               const at::Tensor& targets, at::Tensor& logp, at::Tensor& ent, at::Tensor& lse) const {
    const int64_t r = z.size(0), v = z.size(1);
    const float t = float(inv_t);
    const float* zp = z.data_ptr<float>();
    const int64_t* tgt = targets.data_ptr<int64_t>() + r0;
    float *lp = logp.data_ptr<float>() + r0, *en = ent.data_ptr<float>() + r0, *ls = lse.data_ptr<float>() + r0;
    at::parallel_for(0, r, row_grain(v), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float* zi = zp + i * v;
        // max of t * z is t * max z since t > 0. std::max skips NaN here, but a NaN logit
        // still makes s (and so every output of the row) NaN below.
        float zmax = -std::numeric_limits<float>::infinity();
        for (int64_t k = 0; k < v; ++k) zmax = std::max(zmax, zi[k]);
        const float m = zmax * t;
        // Sequential fp32 sums over ~1e5 terms would lose ~sqrt(V) ulps; double costs little.
        double s = 0.0, u = 0.0;
        for (int64_t k = 0; k < v; ++k) {
          const float d = zi[k] * t - m, e = std::exp(d);
          s += e;
          u += double(e) * d;
        }
        const double log_s = std::log(s), row_lse = double(m) + log_s;
        const int64_t y = tgt[i];
        const bool valid = y != ignore_index;
        ls[i] = float(row_lse);
        lp[i] = valid ? float(double(zi[y] * t) - row_lse) : 0.f;
        en[i] = valid ? float(log_s - u / s) : 0.f;
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
    at::parallel_for(0, r, row_grain(v), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        float* zi = zp + i * v;
        const int64_t y = tgt[i];
        if (y == ignore_index) {
          std::fill(zi, zi + v, 0.f);
          continue;
        }
        // The temperature's chain-rule factor t is folded into both upstream gradients.
        const float l = ls[i], H = en[i], g = glp[i] * t, gH = gen ? gen[i] * t : 0.f;
        for (int64_t k = 0; k < v; ++k) {
          const float logp = zi[k] * t - l, p = std::exp(logp);
          zi[k] = -p * (g + gH * (logp + H));
        }
        zi[y] += g;
      }
    });
  }
};

}  // namespace cpu
}  // namespace erpd
