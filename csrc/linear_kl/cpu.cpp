// linear_kl on CPU: the entry points of csrc/linear_kl/host.h in the driver's vocabulary-blocked
// schedule (csrc/linear_kl/driver.h, MKL GEMMs; the reduced loss takes whole rows) with epilogues
// parallel over rows (ATen's OpenMP pool), each row the vectorized loops of
// csrc/common/vocab_rows.h. Math: csrc/linear_kl/math.h.
//
// Forward, per row, with m = max z and d = z - m for each distribution:
//   one read of both rows' blocks: m^S, m^T (online, merged across blocks), s^S = sum e^{d^S},
//   s^T = sum e^{d^T} and, for the KLs,
//   forward: KL = sum e^{d^T} (d^T - d^S) / s^T - log s^T + log s^S
//   reverse: KL = sum e^{d^S} (d^S - d^T) / s^S - log s^S + log s^T
//   (the maxima cancel, so no term of size |lse| is subtracted);
//   jsd: a second read, once both log-sum-exps are known, sums p^T (b - log m) and p^S (a - log m).
// The reduced form (forward_backward) then overwrites the student's row with t * g * dz while
// both rows are still in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/host.h"
#include "common/vocab_rows.h"
#include "linear_kl/host.h"
#include "linear_kl/math.h"

namespace erpd {
namespace {

using linear_kl::Mode;

struct RowKl {
  float lse_s, lse_t;
  double div;  // the divergence, before the clamp at 0
  float aux;   // what the gradient needs (csrc/linear_kl/math.h)
};

// A row's log-sum-exps and, for the two KLs, its divergence from the sums (jsd: filled by row_kl).
RowKl kl_stats(const cpu::KlSums& k, int64_t mode) {
  const double log_ss = std::log(k.ss), log_st = std::log(k.st);
  RowKl r{float(k.ms + log_ss), float(k.mt + log_st), 0.0, 0.f};
  if (mode == Mode::kForward) r.div = k.cross / k.st - log_st + log_ss;
  if (mode == Mode::kReverse) r.div = k.cross / k.ss - log_ss + log_st;
  r.aux = float(r.div);
  return r;
}

RowKl row_kl(const cpu::VocabRows& rows, const float* zs, const float* zt, int64_t v, float t, int mode,
             const linear_kl::JsdWeights& w) {
  RowKl r = kl_stats(rows.kl_sums(zs, zt, v, t, mode), mode);
  if (mode == Mode::kJsd) {
    const cpu::JsdSums j = rows.jsd_sums(zs, zt, v, t, r.lse_s, r.lse_t, w);
    r.div = w.b * j.kl_t + w.one_mb * j.kl_s;
    r.aux = float(j.kl_s);
  }
  return r;
}

// A divergence is >= 0; rounding can leave -1e-7 when the distributions coincide. NaN passes
// through (std::max returns its first argument when the comparison is false).
float clamp_div(double div) { return std::max(float(div), 0.f); }

struct CpuEpilogue {
  // For the entry points (linear_kl/host.h): the vocabulary-blocked schedule, no device guard.
  static constexpr bool kBlocked = true;
  using Guard = host::NoGuard;

  // A row's statistics so far, over the vocabulary blocks seen (csrc/linear_kl/driver.h,
  // forward_blocked); jsd's two sums, which whole rows give at once.
  struct State {
    cpu::KlSums k;
    double kl_t = 0.0, kl_s = 0.0;
  };

  // Rows [r0, r0 + r) at vocabulary columns [c0, c0 + c): zs [r, c]; zt with rows of stride
  // zt.stride(0). jsd: whole rows only (c = V).
  void forward_block(const at::Tensor& zs, const at::Tensor& zt, int64_t /*r0*/, int64_t /*c0*/, double inv_t,
                     int64_t /*ignore_index*/, const at::Tensor& /*targets*/, int64_t mode, double beta,
                     State* st) const {
    const int64_t r = zs.size(0), c = zs.size(1), ldt = zt.stride(0);
    const float t = float(inv_t);
    const linear_kl::JsdWeights w = linear_kl::jsd_weights(float(beta));
    const float *zsp = zs.data_ptr<float>(), *ztp = zt.data_ptr<float>();
    const cpu::VocabRows& rows = cpu::vocab_rows();
    at::parallel_for(0, r, cpu::row_grain(c), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float *zsi = zsp + i * c, *zti = ztp + i * ldt;
        if (mode == Mode::kJsd) {
          st[i].k = rows.kl_sums(zsi, zti, c, t, int(mode));
          const RowKl k = kl_stats(st[i].k, mode);
          const cpu::JsdSums j = rows.jsd_sums(zsi, zti, c, t, k.lse_s, k.lse_t, w);
          st[i].kl_t = j.kl_t;
          st[i].kl_s = j.kl_s;
        } else {
          cpu::merge(st[i].k, rows.kl_sums(zsi, zti, c, t, int(mode)), int(mode));
        }
      }
    });
  }

  void forward_finish(const State* st, int64_t r0, int64_t r, int64_t ignore_index, const at::Tensor& targets,
                      int64_t mode, double beta, at::Tensor& kl, at::Tensor& lse_s, at::Tensor& lse_t,
                      at::Tensor& aux) const {
    const int64_t* tgt = targets.data_ptr<int64_t>() + r0;
    float *out = kl.data_ptr<float>() + r0, *ls = lse_s.data_ptr<float>() + r0,
          *lt = lse_t.data_ptr<float>() + r0, *ax = aux.data_ptr<float>() + r0;
    const linear_kl::JsdWeights w = linear_kl::jsd_weights(float(beta));
    for (int64_t i = 0; i < r; ++i) {
      RowKl k = kl_stats(st[i].k, mode);
      if (mode == Mode::kJsd) {
        k.div = w.b * st[i].kl_t + w.one_mb * st[i].kl_s;
        k.aux = float(st[i].kl_s);
      }
      ls[i] = k.lse_s;
      lt[i] = k.lse_t;
      ax[i] = k.aux;
      out[i] = tgt[i] == ignore_index ? 0.f : clamp_div(k.div);
    }
  }

  // Overwrites zs (any block of columns) with t * dz; zt: rows of stride zt.stride(0).
  void backward(at::Tensor& zs, const at::Tensor& zt, int64_t r0, double inv_t, int64_t ignore_index,
                const at::Tensor& targets, int64_t mode, double beta, const at::Tensor& lse_s,
                const at::Tensor& lse_t, const at::Tensor& aux, const at::Tensor& grad_kl) const {
    const int64_t r = zs.size(0), c = zs.size(1), ldt = zt.stride(0);
    const float t = float(inv_t);
    const linear_kl::JsdWeights w = linear_kl::jsd_weights(float(beta));
    float* zsp = zs.data_ptr<float>();
    const float* ztp = zt.data_ptr<float>();
    const int64_t* tgt = targets.data_ptr<int64_t>() + r0;
    const float *ls = lse_s.data_ptr<float>() + r0, *lt = lse_t.data_ptr<float>() + r0,
                *ax = aux.data_ptr<float>() + r0, *g = grad_kl.data_ptr<float>() + r0;
    const cpu::VocabRows& rows = cpu::vocab_rows();
    at::parallel_for(0, r, cpu::row_grain(c), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        float* zsi = zsp + i * c;
        if (tgt[i] == ignore_index)
          std::fill(zsi, zsi + c, 0.f);
        else
          rows.kl_grad(zsi, ztp + i * ldt, c, t, ls[i], lt[i], ax[i], g[i] * t, int(mode), w);
      }
    });
  }

  // The forward's statistics and the backward's dz of each row in one visit (the reduced loss:
  // grad_kl is known before the forward). Forward and reverse KL keep their exponentials for the
  // gradient (vocab_rows.h: kl_sums_keep, in a per-thread row that stays in cache); jsd recomputes
  // them. Ignored rows are skipped: kl 0, dz 0.
  void forward_backward(at::Tensor& zs, const at::Tensor& zt, int64_t r0, double inv_t, int64_t ignore_index,
                        const at::Tensor& targets, int64_t mode, double beta, const at::Tensor& grad_kl,
                        at::Tensor& kl, at::Tensor& /*lse_s*/, at::Tensor& /*lse_t*/, at::Tensor& /*aux*/) const {
    const int64_t r = zs.size(0), v = zs.size(1), nb = cpu::num_blocks(v);
    const float t = float(inv_t);
    const linear_kl::JsdWeights w = linear_kl::jsd_weights(float(beta));
    float* zsp = zs.data_ptr<float>();
    const float* ztp = zt.data_ptr<float>();
    const int64_t* tgt = targets.data_ptr<int64_t>() + r0;
    const float* g = grad_kl.data_ptr<float>() + r0;
    float* out = kl.data_ptr<float>() + r0;
    const bool keep = mode != Mode::kJsd;
    const cpu::VocabRows& rows = cpu::vocab_rows();
    at::parallel_for(0, r, cpu::row_grain(v), [&](int64_t lo, int64_t hi) {
      std::vector<float> kept(keep ? v + 2 * nb : 0);  // the kept row, then the two references per block
      float *ref_s = keep ? kept.data() + v : nullptr, *ref_t = keep ? ref_s + nb : nullptr;
      for (int64_t i = lo; i < hi; ++i) {
        float* zsi = zsp + i * v;
        const float* zti = ztp + i * v;
        if (tgt[i] == ignore_index) {
          out[i] = 0.f;
          std::fill(zsi, zsi + v, 0.f);
        } else if (keep) {
          const RowKl s = kl_stats(rows.kl_sums_keep(zsi, zti, kept.data(), v, t, int(mode), ref_s, ref_t), mode);
          out[i] = clamp_div(s.div);
          rows.kl_grad_kept(zsi, kept.data(), v, ref_s, ref_t, s.lse_s, s.lse_t, s.aux, g[i] * t, int(mode));
        } else {
          const RowKl s = row_kl(rows, zsi, zti, v, t, int(mode), w);
          out[i] = clamp_div(s.div);
          rows.kl_grad(zsi, zti, v, t, s.lse_s, s.lse_t, s.aux, g[i] * t, int(mode), w);
        }
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CPU, m) {
  m.impl("linear_kl_fwd", &linear_kl::fwd<CpuEpilogue>);
  m.impl("linear_kl_bwd", &linear_kl::bwd<CpuEpilogue>);
  m.impl("linear_kl_fwd_with_grads", &linear_kl::fwd_with_grads<CpuEpilogue>);
}

}  // namespace erpd
