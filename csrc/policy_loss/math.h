// Per-token math of the policy losses (erpd.reference.policy_loss is the definition), shared by
// the C++ CPU ops (csrc/policy_loss/cpu.cpp, csrc/linear_policy_loss/cpu.cpp) and the CUDA kernels
// (csrc/policy_loss/kernels.cu).
// Torch-free, with host/device qualifiers, so that a CUDA kernel can include it as it is.
//
// Per valid token (mask true), with x = log p, x_old, advantage A, delta = x - x_old:
//   log r = clamp(delta, +-20)                       (gspo: the row's clamp(mean_t m delta, +-20))
//   ppo/gspo   l = max(-A r, -A clip(r, lo, hi));  A < 0 and dual clip c: l = min(l, -c A)
//              dl/dlog r = -A r where the unclipped branch is the max (and below c), else 0
//   sapo       l = -A (4/tau) sigmoid(tau (r - 1)),  dl/dlog r = -4 A s (1 - s) r,  tau by sign of A
//   cispo,     l = -sg(clip(r, lo, hi)) A x,  dl/dx = -clip(r, lo, hi) A
//   reinforce  (reinforce: lo = 0, hi = the truncation cap or +inf)
//   KL(pi || pi_ref), d = x_ref - x:  k1 = -d (dk/dx = 1),  k2 = d^2 / 2 (dk/dx = -d),
//              k3 = e^d - d - 1 with d clamped to +-20 (dk/dx = 1 - e^d, 0 where clamped)
//   kl_ratio (DeepSeek-V3.2's importance-weighted KL, TRL's use_bias_correction_kl): the KL term
//              is r k with the ratio r of the loss (token r, or gspo's s_b), differentiable:
//              d(r k)/dx = r dk/dx + r k (r's own derivative; 0 outside the +-20 clamp). For gspo
//              the second part reaches every token of the row through s_b, like its policy term.
// The exp of a clamped log-ratio has gradient 0 outside +-20 (torch.clamp's convention: the
// bounds themselves pass it).
//
// Aggregation: the loss is sum_t w_t [rho_t l_t + kl_coef k_t - entropy_coef H_t] with
// w_t = m_t f_b / D: f_b = 1 / max(L_b, 1) for seq-mean-token-mean and 1 otherwise (L_b = the
// row's valid-token count), and D the batch normaliser (see finalize()). Kernels accumulate the
// sums with f_b only and write gradients *without* the 1/D, which finalize() reports as
// stats[kInvNorm]: D may need the whole batch's token count, which one pass over rows does not
// have while it writes the gradients.
//
// gspo: l_t = l(s_b) for every token of row b, s_b = exp(log-ratio mean). Its exact gradient is
//   dL/dx_t = m_t (f_b / D) (sum_t' m_t' rho_t' dl_t'/dlog s) / L_b
// (every token's loss depends on every token's log-prob through s_b), so a row needs one pass for
// s_b, one for the per-token losses and their sum, and one to write the gradients.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "policy_loss/codes.h"

#if defined(__CUDACC__)
#define ERPD_HD __host__ __device__ __forceinline__
#else
#define ERPD_HD inline
#endif

namespace erpd {
namespace policy {

// The codes (Method, Agg, KLEstimator) and the `stats` order (Stat) are in codes.h,
// generated from erpd/ops/policy_spec.py.

// Per-row partial sums (over valid tokens; the weighted ones carry f_b and rho, not 1/D).
enum Part : int {
  kPartPolicy = 0,   // sum f rho l
  kPartKL,           // sum f k
  kPartEntropy,      // sum f H
  kPartCount,        // sum m
  kPartClipLow,      // #(A < 0, r < lo)
  kPartClipHigh,     // #(A > 0, r > hi)
  kPartRatioSum,
  kPartRatioMin,
  kPartRatioMax,
  kPartApproxKL,     // sum (r_tok - 1) - log r_tok
  kPartKLSum,        // sum k (unweighted, for the metric)
  kPartEntropySum,   // sum H (unweighted)
  kNumParts
};

constexpr float kLogRatioClamp = 20.f;

struct Params {
  int64_t method = kPPO, agg = kTokenMean, kl_estimator = kK3;
  float lo = 0.8f, hi = 1.2f;  // ratio bounds (ppo/gspo: 1 - eps_lo, 1 + eps_hi; cispo: floor, cap)
  float dual_clip = 0.f;       // <= 0: none
  float tau_pos = 1.f, tau_neg = 1.05f;
  float kl_coef = 0.f, entropy_coef = 0.f;
  bool has_ref = false, has_entropy = false;
  bool kl_ratio = false;  // the KL term is r k (see the header)
};

struct Token {
  float pol = 0.f;    // l
  float dpol = 0.f;   // dl/dx (token methods) or dl/dlog s (gspo)
  float ratio = 1.f;  // the ratio the loss used
  float approx_kl = 0.f;
  float kl = 0.f, dkl = 0.f;
  float dkl_seq = 0.f;  // gspo with kl_ratio: d(s_b k)/dlog s_b = s_b k, added to the row's g_seq
  bool clip_low = false, clip_high = false;
};

// Comparisons, not fminf/fmaxf: without -ffast-math those are libm calls on the host (their
// NaN rules need it), which made the per-token loop several times slower. NaN passes through.
ERPD_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }
ERPD_HD float maxf(float a, float b) { return a < b ? b : a; }
ERPD_HD double mind(double a, double b) { return b < a ? b : a; }
ERPD_HD double maxd(double a, double b) { return a < b ? b : a; }

ERPD_HD bool in_clamp(float v) { return v >= -kLogRatioClamp && v <= kLogRatioClamp; }

// One valid token. `seq_log_ratio` is the row's (unclamped) mean log-ratio, used by gspo only.
ERPD_HD Token token(const Params& p, float x, float x_old, float adv, float x_ref, float seq_log_ratio) {
  Token o;
  const float delta = x - x_old;
  const float log_rt = clampf(delta, -kLogRatioClamp, kLogRatioClamp);
  const float rt = expf(log_rt);
  o.approx_kl = (rt - 1.f) - log_rt;
  const bool gspo = p.method == kGSPO;
  const float raw = gspo ? seq_log_ratio : delta;
  const float r = gspo ? expf(clampf(raw, -kLogRatioClamp, kLogRatioClamp)) : rt;
  const bool passes = in_clamp(raw);  // does the ratio's gradient pass the log-ratio clamp
  o.ratio = r;
  if (p.method == kPPO || gspo) {
    const float u1 = -adv * r, u2 = -adv * clampf(r, p.lo, p.hi);
    o.pol = maxf(u1, u2);
    o.dpol = (u1 >= u2 && passes) ? -adv * r : 0.f;
    if (p.dual_clip > 0.f && adv < 0.f && o.pol > -p.dual_clip * adv) {
      o.pol = -p.dual_clip * adv;
      o.dpol = 0.f;
    }
    o.clip_low = adv < 0.f && r < p.lo;
    o.clip_high = adv > 0.f && r > p.hi;
  } else if (p.method == kSAPO) {
    const float tau = adv > 0.f ? p.tau_pos : p.tau_neg;
    const float s = 1.f / (1.f + expf(-tau * (r - 1.f)));
    o.pol = -adv * (4.f / tau) * s;
    o.dpol = passes ? -4.f * adv * s * (1.f - s) * r : 0.f;
  } else {  // kCISPO, kReinforce: the clipped ratio is a detached weight on -A x
    const float w = clampf(r, p.lo, p.hi);
    o.pol = -w * adv * x;
    o.dpol = -w * adv;
    o.clip_low = adv < 0.f && r < p.lo;
    o.clip_high = adv > 0.f && r > p.hi;
  }
  if (p.has_ref) {
    const float d = x_ref - x;
    if (p.kl_estimator == kK1) {
      o.kl = -d;
      o.dkl = 1.f;
    } else if (p.kl_estimator == kK2) {
      o.kl = 0.5f * d * d;
      o.dkl = -d;
    } else {
      const float dc = clampf(d, -kLogRatioClamp, kLogRatioClamp), e = expf(dc);
      o.kl = e - dc - 1.f;
      o.dkl = in_clamp(d) ? 1.f - e : 0.f;
    }
    if (p.kl_ratio) {
      const float rk = passes ? r * o.kl : 0.f;  // r k times r's log-derivative (1, or 0 when clamped)
      o.dkl = r * o.dkl + (gspo ? 0.f : rk);
      o.dkl_seq = gspo ? rk : 0.f;
      o.kl *= r;
    }
  }
  return o;
}

// Row-major [B, T] float32 inputs and outputs of a batch (null pointers: absent).
struct Batch {
  const float* logprobs;
  const float* old_logprobs;  // null: on-policy, x_old = x (the fused op's "old = sg(log p)")
  const float* advantages;    // [B] or [B, T]
  const bool* mask;
  const float* ref_logprobs;
  const float* entropy;
  const float* is_weights;
  bool adv_per_row;
  int64_t T;
  float* grad_logprobs;       // [B, T], written for every token
  float* grad_entropy;        // [B, T] or null
};

struct Acc {
  double v[kNumParts];
  ERPD_HD Acc() {
    for (int k = 0; k < kNumParts; ++k) v[k] = 0.0;
    v[kPartRatioMin] = INFINITY;
    v[kPartRatioMax] = -INFINITY;
  }
  ERPD_HD void merge(const Acc& o) {
    for (int k = 0; k < kNumParts; ++k) {
      v[k] = k == kPartRatioMin ? mind(v[k], o.v[k]) : k == kPartRatioMax ? maxd(v[k], o.v[k]) : v[k] + o.v[k];
    }
  }
  // One valid token with aggregation factor f, importance weight rho and entropy h.
  ERPD_HD void add(const Token& o, float f, float rho, float h) {
    v[kPartPolicy] += double(f) * rho * o.pol;
    v[kPartKL] += double(f) * o.kl;
    v[kPartEntropy] += double(f) * h;
    v[kPartCount] += 1.0;
    v[kPartClipLow] += o.clip_low;
    v[kPartClipHigh] += o.clip_high;
    v[kPartRatioSum] += o.ratio;
    v[kPartRatioMin] = mind(v[kPartRatioMin], o.ratio);
    v[kPartRatioMax] = maxd(v[kPartRatioMax], o.ratio);
    v[kPartApproxKL] += o.approx_kl;
    v[kPartKLSum] += o.kl;
    v[kPartEntropySum] += h;
  }
};

ERPD_HD float row_factor(const Params& p, float length) {
  return p.agg == kSeqMeanTokenMean ? 1.f / maxf(length, 1.f) : 1.f;
}

// One token (flat index i of row b, whose aggregation factor is f and per-row advantage adv_row)
// of the per-token pass: accumulates it into `acc` and writes its gradients (without 1/D). gspo
// (seq_log_ratio: the row's mean log-ratio) writes only the KL part and adds the token's
// rho dl/dlog s to g_seq, from which process_row adds the policy part once the row is done.
// The CPU loops below and the CUDA kernels (csrc/policy_loss/kernels.cu) share it.
ERPD_HD void token_step(const Params& p, const Batch& in, int64_t i, float adv_row, float f, float seq_log_ratio,
                        Acc& acc, double& g_seq) {
  if (!in.mask[i]) {
    in.grad_logprobs[i] = 0.f;
    if (in.grad_entropy) in.grad_entropy[i] = 0.f;
    return;
  }
  const float x = in.logprobs[i];
  const float adv = in.adv_per_row ? adv_row : in.advantages[i];
  const Token o = token(p, x, in.old_logprobs ? in.old_logprobs[i] : x, adv, p.has_ref ? in.ref_logprobs[i] : 0.f,
                        seq_log_ratio);
  const float rho = in.is_weights ? in.is_weights[i] : 1.f;
  const float h = p.has_entropy ? in.entropy[i] : 0.f;
  acc.add(o, f, rho, h);
  if (p.method == kGSPO) {
    g_seq += double(rho) * o.dpol + double(p.kl_coef) * o.dkl_seq;
    in.grad_logprobs[i] = f * p.kl_coef * o.dkl;  // the policy part is added after the row's pass
  } else {
    in.grad_logprobs[i] = f * (rho * o.dpol + p.kl_coef * o.dkl);
  }
  if (in.grad_entropy) in.grad_entropy[i] = -p.entropy_coef * f;
}

// gspo's gradient w.r.t. every valid token's log-prob, from the row's sum of rho dl/dlog s.
ERPD_HD float gspo_token_grad(float f, double g_seq, double length) {
  return float(double(f) * g_seq / maxd(length, 1.0));
}

// Tokens [t0, t1) of row b, whose aggregation factor is f: accumulates into `acc` and writes the
// gradients (without 1/D). Not for gspo, whose gradients need the whole row (see process_row).
ERPD_HD void process_segment(const Params& p, const Batch& in, int64_t b, int64_t t0, int64_t t1, float f, Acc& out) {
  Acc acc;  // local, so that the sums stay in registers rather than in the caller's memory
  double unused = 0.0;
  const int64_t base = b * in.T;
  const float adv_row = in.adv_per_row ? in.advantages[b] : 0.f;
  for (int64_t t = t0; t < t1; ++t) token_step(p, in, base + t, adv_row, f, 0.f, acc, unused);
  out.merge(acc);
}

// A whole row: its length (and gspo's mean log-ratio) first, then process_segment, or gspo's
// three passes.
ERPD_HD void process_row(const Params& p, const Batch& in, int64_t b, Acc& out) {
  const int64_t base = b * in.T;
  double length = 0.0;
  double sum_delta = 0.0;
  const bool gspo = p.method == kGSPO;
  if (p.agg == kSeqMeanTokenMean || gspo) {
    for (int64_t t = 0; t < in.T; ++t) {
      const int64_t i = base + t;
      if (!in.mask[i]) continue;
      length += 1.f;
      if (gspo && in.old_logprobs) sum_delta += double(in.logprobs[i]) - in.old_logprobs[i];
    }
  }
  const float f = row_factor(p, length);
  if (!gspo) {
    process_segment(p, in, b, 0, in.T, f, out);
    return;
  }
  Acc acc;
  const float seq_log_ratio = float(sum_delta / maxd(length, 1.0));
  const float adv_row = in.adv_per_row ? in.advantages[b] : 0.f;
  double g_seq = 0.0;  // sum_t m (rho dl/dlog s + kl_coef d(s k)/dlog s)
  for (int64_t t = 0; t < in.T; ++t) token_step(p, in, base + t, adv_row, f, seq_log_ratio, acc, g_seq);
  const float g_pol = gspo_token_grad(f, g_seq, length);
  for (int64_t t = 0; t < in.T; ++t) {
    const int64_t i = base + t;
    if (in.mask[i]) in.grad_logprobs[i] += g_pol;
  }
  out.merge(acc);
}

// A tensor `num_items`' value as the count of the normaliser. Nothing may have checked it (the
// CUDA kernels read it on the device, where a check would need a sync), so every float has one
// meaning, the same as in erpd.reference.policy_agg_weights and kernels/policy_loss.py: below 1
// it counts as 1 (as every count of the normaliser does), and NaN or +-inf gives NaN, so the loss
// and its gradients are NaN instead of silently rescaled.
ERPD_HD float tensor_items(float v) {
  const float nan_unless_finite = v - v;  // 0 for a finite v, NaN for NaN and +-inf
  return (v < 1.f ? 1.f : v) + nan_unless_finite;
}

// The batch normaliser D (see erpd.reference.policy_agg_weights): the count is `num_items` when
// given, i.e. != 0 (a Python number, checked > 0 in erpd/ops/_validate.py, or tensor_items() of a
// tensor's value), else the valid-token count (token-mean) or the number of rows B; clamped at 1;
// times `norm_scale` (seq-mean-token-sum-norm's length constant, 1 otherwise).
ERPD_HD double inv_norm(const Params& p, double n_valid, int64_t rows, float num_items, float norm_scale) {
  const double count = num_items != 0.f ? double(num_items) : (p.agg == kTokenMean ? n_valid : double(rows));
  return 1.0 / (maxd(count, 1.0) * double(norm_scale));
}

ERPD_HD void finalize(const Params& p, const Acc& total, int64_t rows, float num_items, float norm_scale, float* loss,
                      float* stats) {
  const double n = total.v[kPartCount];
  const double inv = inv_norm(p, n, rows, num_items, norm_scale);
  const double inv_n = 1.0 / maxd(n, 1.0);
  *loss = float((total.v[kPartPolicy] + p.kl_coef * total.v[kPartKL] - p.entropy_coef * total.v[kPartEntropy]) * inv);
  stats[kInvNorm] = float(inv);
  stats[kPgLoss] = float(total.v[kPartPolicy] * inv);
  stats[kClipfracLow] = float(total.v[kPartClipLow] * inv_n);
  stats[kClipfracHigh] = float(total.v[kPartClipHigh] * inv_n);
  stats[kClipfrac] = float((total.v[kPartClipLow] + total.v[kPartClipHigh]) * inv_n);
  stats[kRatioMean] = float(total.v[kPartRatioSum] * inv_n);
  stats[kRatioMin] = n > 0 ? float(total.v[kPartRatioMin]) : 1.f;
  stats[kRatioMax] = n > 0 ? float(total.v[kPartRatioMax]) : 1.f;
  stats[kApproxKL] = float(total.v[kPartApproxKL] * inv_n);
  stats[kKLRef] = float(total.v[kPartKLSum] * inv_n);
  stats[kEntropy] = float(total.v[kPartEntropySum] * inv_n);
  stats[kNumValid] = float(n);
}

}  // namespace policy
}  // namespace erpd
