// The CPU epilogues of the linear_logprobs drivers (csrc/linear_logprobs/driver.h): fused per-row
// loops over one block of fp32 logits (vocabulary blocks, or whole rows for the fused policy
// loss), parallel over rows (ATen's OpenMP pool), each row a vectorized loop of
// csrc/common/vocab_rows.h. Used by csrc/linear_logprobs/cpu.cpp and by the fused policy loss
// (csrc/linear_policy_loss/cpu.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/host.h"
#include "common/vocab_rows.h"

namespace erpd {
namespace cpu {

struct CpuEpilogue {
  // For the entry points (linear_logprobs/host.h): the vocabulary-blocked schedule, no device guard.
  static constexpr bool kBlocked = true;
  using Guard = host::NoGuard;

  // A row's statistics so far, over the vocabulary blocks seen (csrc/linear_logprobs/driver.h,
  // forward_blocked): softmax sums and the target's logit.
  struct State {
    ExpSums e;
    float zy = 0.f;
  };

  // Rows [r0, r0 + r) at vocabulary columns [c0, c0 + c) of z [r, c]: one read of each row's
  // block, its maximum and sums online (csrc/common/vocab_rows.h), merged into st[0, r).
  void forward_block(const at::Tensor& z, int64_t r0, int64_t c0, double inv_t, int64_t ignore_index,
                     const at::Tensor& targets, State* st) const {
    const int64_t r = z.size(0), c = z.size(1);
    const float t = float(inv_t);
    const float* zp = z.data_ptr<float>();
    const int64_t* tgt = targets.data_ptr<int64_t>() + r0;
    const VocabRows& rows = vocab_rows();
    at::parallel_for(0, r, row_grain(c), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float* zi = zp + i * c;
        merge(st[i].e, rows.exp_sums(zi, c, t));
        const int64_t y = tgt[i];
        if (y != ignore_index && y >= c0 && y < c0 + c) st[i].zy = zi[y - c0] * t;
      }
    });
  }

  void forward_finish(const State* st, int64_t r0, int64_t r, int64_t ignore_index, const at::Tensor& targets,
                      at::Tensor& logp, at::Tensor& ent, at::Tensor& lse) const {
    const int64_t* tgt = targets.data_ptr<int64_t>() + r0;
    float *lp = logp.data_ptr<float>() + r0, *en = ent.data_ptr<float>() + r0, *ls = lse.data_ptr<float>() + r0;
    for (int64_t i = 0; i < r; ++i) {
      const ExpSums& e = st[i].e;
      const double log_s = std::log(e.s), row_lse = double(e.m) + log_s;
      const bool valid = tgt[i] != ignore_index;
      ls[i] = float(row_lse);
      lp[i] = valid ? float(double(st[i].zy) - row_lse) : 0.f;
      en[i] = valid ? float(log_s - e.u / e.s) : 0.f;
    }
  }

  // Whole rows (the row-chunk drivers: the fused policy loss).
  void forward(const at::Tensor& z, int64_t r0, double inv_t, int64_t ignore_index, const at::Tensor& targets,
               at::Tensor& logp, at::Tensor& ent, at::Tensor& lse) const {
    std::vector<State> st(z.size(0));
    forward_block(z, r0, 0, inv_t, ignore_index, targets, st.data());
    forward_finish(st.data(), r0, z.size(0), ignore_index, targets, logp, ent, lse);
  }

  // Overwrites z (rows [r0, r0 + r), vocabulary columns [c0, c0 + c)) with t * dz.
  void backward(at::Tensor& z, int64_t r0, int64_t c0, double inv_t, int64_t ignore_index,
                const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& ent,
                const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent) const {
    const int64_t r = z.size(0), c = z.size(1);
    const float t = float(inv_t);
    float* zp = z.data_ptr<float>();
    const int64_t* tgt = targets.data_ptr<int64_t>() + r0;
    const float *ls = lse.data_ptr<float>() + r0, *en = ent.data_ptr<float>() + r0, *glp = g_lp.data_ptr<float>() + r0;
    const float* gen = g_ent.has_value() ? g_ent->data_ptr<float>() + r0 : nullptr;
    const VocabRows& rows = vocab_rows();
    at::parallel_for(0, r, row_grain(c), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        float* zi = zp + i * c;
        const int64_t y = tgt[i];
        if (y == ignore_index) {
          std::fill(zi, zi + c, 0.f);
          continue;
        }
        // The temperature's chain-rule factor t is folded into both upstream gradients.
        const float g = glp[i] * t;
        rows.logprob_grad(zi, c, t, ls[i], g, gen ? gen[i] * t : 0.f, en[i]);
        if (y >= c0 && y < c0 + c) zi[y - c0] += g;
      }
    });
  }

  void backward(at::Tensor& z, int64_t r0, double inv_t, int64_t ignore_index, const at::Tensor& targets,
                const at::Tensor& lse, const at::Tensor& ent, const at::Tensor& g_lp,
                const c10::optional<at::Tensor>& g_ent) const {
    backward(z, r0, 0, inv_t, ignore_index, targets, lse, ent, g_lp, g_ent);
  }
};

}  // namespace cpu
}  // namespace erpd
