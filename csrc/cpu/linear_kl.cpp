// linear_kl on CPU: the chunked driver (csrc/linear_kl_driver.h, MKL GEMMs) with epilogues
// parallel over rows (ATen's OpenMP pool). Math: csrc/linear_kl_math.h. The forward and reverse
// KL passes are the vectorized row loops of csrc/cpu/vocab_rows.h; jsd's log-mixture passes stay
// scalar (they need log1p as well as exp).
//
// Forward, per row, with m = max z and d = z - m for each distribution:
//   pass 1: the two maxima;  pass 2: s^S = sum e^{d^S}, s^T = sum e^{d^T} and, for the KLs,
//   forward: KL = sum e^{d^T} (d^T - d^S) / s^T - log s^T + log s^S
//   reverse: KL = sum e^{d^S} (d^S - d^T) / s^S - log s^S + log s^T
//   (the maxima cancel, so no term of size |lse| is subtracted);
//   jsd: pass 3, once both log-sum-exps are known, sums p^T (b - log m) and p^S (a - log m).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/vocab_rows.h"
#include "linear_kl_driver.h"
#include "linear_kl_math.h"

namespace erpd {
namespace {

using linear_kl::Mode;

struct CpuEpilogue {
  void forward(const at::Tensor& zs, const at::Tensor& zt, int64_t r0, double inv_t, int64_t ignore_index,
               const at::Tensor& targets, int64_t mode, double beta, at::Tensor& kl, at::Tensor& lse_s,
               at::Tensor& lse_t, at::Tensor& aux) const {
    const int64_t r = zs.size(0), v = zs.size(1);
    const float t = float(inv_t);
    const linear_kl::JsdWeights w = linear_kl::jsd_weights(float(beta));
    const float *zsp = zs.data_ptr<float>(), *ztp = zt.data_ptr<float>();
    const int64_t* tgt = targets.data_ptr<int64_t>() + r0;
    float *out = kl.data_ptr<float>() + r0, *ls = lse_s.data_ptr<float>() + r0,
          *lt = lse_t.data_ptr<float>() + r0, *ax = aux.data_ptr<float>() + r0;
    const cpu::VocabRows& rows = cpu::vocab_rows();
    at::parallel_for(0, r, cpu::row_grain(v), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float *zsi = zsp + i * v, *zti = ztp + i * v;
        const float ms = rows.row_max(zsi, v) * t, mt = rows.row_max(zti, v) * t;  // t > 0
        const auto [ss, st, cross] = rows.kl_sums(zsi, zti, v, t, ms, mt, int(mode));
        const double log_ss = std::log(ss), log_st = std::log(st);
        ls[i] = float(ms + log_ss);
        lt[i] = float(mt + log_st);
        double div;
        if (mode == Mode::kForward) {
          div = cross / st - log_st + log_ss;
          ax[i] = float(div);
        } else if (mode == Mode::kReverse) {
          div = cross / ss - log_ss + log_st;
          ax[i] = float(div);
        } else {
          const float la = ms + float(log_ss), lb = mt + float(log_st);
          double kl_t = 0.0, kl_s = 0.0;
          for (int64_t k = 0; k < v; ++k) {
            const float a = zsi[k] * t - la, b = zti[k] * t - lb;
            const float lm = linear_kl::log_mixture(a, b, w);
            kl_t += double(p_times(std::exp(b), b - lm));
            kl_s += double(p_times(std::exp(a), a - lm));
          }
          div = w.b * kl_t + w.one_mb * kl_s;
          ax[i] = float(kl_s);
        }
        // A divergence is >= 0; rounding can leave -1e-7 when the distributions coincide. NaN
        // passes through (std::max returns its first argument when the comparison is false).
        out[i] = tgt[i] == ignore_index ? 0.f : std::max(float(div), 0.f);
      }
    });
  }

  void backward(at::Tensor& zs, const at::Tensor& zt, int64_t r0, double inv_t, int64_t ignore_index,
                const at::Tensor& targets, int64_t mode, double beta, const at::Tensor& lse_s,
                const at::Tensor& lse_t, const at::Tensor& aux, const at::Tensor& grad_kl) const {
    const int64_t r = zs.size(0), v = zs.size(1);
    const float t = float(inv_t);
    const linear_kl::JsdWeights w = linear_kl::jsd_weights(float(beta));
    float* zsp = zs.data_ptr<float>();
    const float* ztp = zt.data_ptr<float>();
    const int64_t* tgt = targets.data_ptr<int64_t>() + r0;
    const float *ls = lse_s.data_ptr<float>() + r0, *lt = lse_t.data_ptr<float>() + r0,
                *ax = aux.data_ptr<float>() + r0, *g = grad_kl.data_ptr<float>() + r0;
    const int m = int(mode);
    const cpu::VocabRows& rows = cpu::vocab_rows();
    at::parallel_for(0, r, cpu::row_grain(v), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        float* zsi = zsp + i * v;
        const float* zti = ztp + i * v;
        if (tgt[i] == ignore_index) {
          std::fill(zsi, zsi + v, 0.f);
          continue;
        }
        const float gt = g[i] * t, la = ls[i], lb = lt[i], x = ax[i];
        if (m == Mode::kJsd) {
          for (int64_t k = 0; k < v; ++k)
            zsi[k] = gt * linear_kl::grad_logit(m, zsi[k] * t - la, zti[k] * t - lb, x, w);
        } else {
          rows.kl_grad(zsi, zti, v, t, la, lb, x, gt, m);
        }
      }
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& teacher_hidden, const c10::optional<at::Tensor>& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& teacher_logits,
    const at::Tensor& targets, double inv_temperature, int64_t ignore_index, int64_t mode, double beta) {
  const linear_kl::Teacher teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits);
  return linear_kl::forward(hidden, weight, bias, teacher, targets, inv_temperature, ignore_index, mode, beta,
                            CpuEpilogue{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& teacher_hidden, const c10::optional<at::Tensor>& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& teacher_logits,
    const at::Tensor& targets, const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& aux,
    const at::Tensor& grad_kl, double inv_temperature, int64_t ignore_index, int64_t mode, double beta,
    bool need_grad_hidden, bool need_grad_weight) {
  const linear_kl::Teacher teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits);
  return linear_kl::backward(hidden, weight, bias, teacher, targets, lse_s, lse_t, aux, grad_kl, inv_temperature,
                             ignore_index, mode, beta, need_grad_hidden, need_grad_weight, CpuEpilogue{});
}

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CPU, m) {
  m.impl("linear_kl_fwd", &fwd);
  m.impl("linear_kl_bwd", &bwd);
}

}  // namespace erpd
