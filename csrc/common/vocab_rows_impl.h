// The row loops declared in csrc/common/vocab_rows.h. Included by csrc/common/vocab_rows.cpp once
// per ISA level, inside that level's namespace and `#pragma GCC target` region, so this file includes
// nothing (a standard header pulled in here would be compiled for one level only) and has no
// include guard.
//
// fmadd(a, b, c) = a * b + c, fused (one rounding) at the levels with FMA (kFma, set by
// vocab_rows.cpp per level); the file is compiled with -ffp-contract=off, so nothing else fuses.
//
// exp_f(x): e^x = 2^n e^r with n = round(x log2 e) and r = x - n ln2, the ln2 split in two
// (Cody-Waite; n * kLn2Hi is exact) so that |r| <= ln2 / 2 carries no cancellation error; e^r is
// its degree-7 Taylor polynomial (truncation r^8 / 8! < 6e-9 relative); 2^n goes straight into
// the exponent bits. x < -87.34 (a result below FLT_MIN) gives 0 and NaN stays NaN (it runs
// through every step); x is clamped at 88, which the epilogues never reach (they only take
// x <= 0 up to rounding: d = z - max z, log p). Branch-free, so the loops below vectorize; the
// element helpers are always inlined (with LTO, GCC otherwise called exp_f out of line and left
// the loops that use it twice scalar).
//
// log_f(x), x >= 0: x = 2^e m with m in [sqrt(1/2), sqrt(2)) and f = m - 1 (exact), log(1 + f)
// = f - f^2 / 2 + f^3 P(f) with the degree-8 minimax P of Cephes' logf (about 1 ulp), plus e ln2
// split as in exp_f: no division. 0 gives -inf, +inf gives +inf, NaN stays NaN; a subnormal x
// (only ever a probability below 1e-38 here, weighted by itself) comes out near -88.
//
// Sums: float per SIMD lane over kBlock logits, then double across blocks. Every term weighted by
// a probability goes through p_times (csrc/linear_kl/math.h): a -inf logit adds 0, not NaN.
//
// Online statistics: each block's maximum is taken first (the block then sits in L1 for its
// sums); when it exceeds the row's reference m, the sums so far are rescaled to the new one,
// in double: s' = c s, u' = c (u + s (m - m')) with c = e^{m - m'} (u = sum e^d d, d = t z - m).
// While m is -inf (only -inf or NaN logits so far) the block is summed about 0 instead, so that
// -inf - -inf never appears: -inf logits add 0 and a NaN logit still reaches the sums.

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kRound = 12582912.f;  // 1.5 * 2^23: x + kRound - kRound rounds x to an integer
constexpr float kExpMin = -87.33654f;  // e^kExpMin = FLT_MIN

[[gnu::always_inline]] static inline float fmadd(float a, float b, float c) {
  if constexpr (kFma) return __builtin_fmaf(a, b, c);
  return a * b + c;
}

[[gnu::always_inline]] static inline float exp_f(float x) {
  const float xh = x > 88.f ? 88.f : x;
  const float xc = xh < kExpMin ? kExpMin : xh;
  const float n = fmadd(xc, kLog2e, kRound) - kRound;
  const float r = fmadd(n, -kLn2Lo, fmadd(n, -kLn2Hi, xc));
  float p = 1.f / 5040.f;
  p = fmadd(p, r, 1.f / 720.f);
  p = fmadd(p, r, 1.f / 120.f);
  p = fmadd(p, r, 1.f / 24.f);
  p = fmadd(p, r, 1.f / 6.f);
  p = fmadd(p, r, 0.5f);
  p = fmadd(p, r, 1.f);
  p = fmadd(p, r, 1.f);
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return x < kExpMin ? 0.f : p * scale;
}

[[gnu::always_inline]] static inline float log_f(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  const float m1 = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m1 > 1.41421356f;
  const float f = (big ? m1 * 0.5f : m1) - 1.f;
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 127 + (big ? 1 : 0));
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = fmadd(p, f, -1.1514610310e-1f);
  p = fmadd(p, f, 1.1676998740e-1f);
  p = fmadd(p, f, -1.2420140846e-1f);
  p = fmadd(p, f, 1.4249322787e-1f);
  p = fmadd(p, f, -1.6668057665e-1f);
  p = fmadd(p, f, 2.0000714765e-1f);
  p = fmadd(p, f, -2.4999993993e-1f);
  p = fmadd(p, f, 3.3333331174e-1f);
  const float y = fmadd(-0.5f, z, fmadd(e, kLn2Lo, p * f * z));
  float r = fmadd(e, kLn2Hi, f + y);
  r = x == 0.f ? -__builtin_inff() : r;
  r = x == __builtin_inff() ? x : r;
  return x != x ? x : r;
}

static inline float block_max(const float* z, int64_t k0, int64_t k1) {
  float m = -__builtin_inff();
#pragma omp simd reduction(max : m)
  for (int64_t k = k0; k < k1; ++k) m = z[k] > m ? z[k] : m;
  return m;
}

// Moves a running reference m up to the block's maximum bm (both already times t); returns the
// factor c = e^{m - m'} and the shift m - m' that the sums about m need (c = 1, shift 0 when m
// stays). Nothing summed yet (m = -inf): no rescaling.
struct Rebase {
  double c, shift;
};
static inline Rebase rebase(float& m, float bm) {
  if (!(bm > m)) return {1.0, 0.0};
  const double shift = m == -__builtin_inff() ? 0.0 : double(m) - double(bm);
  m = bm;
  return {shift == 0.0 ? 1.0 : __builtin_exp(shift), shift};
}

// The reference a block is summed about: m, or 0 while m is still -inf.
static inline float ref(float m) { return m == -__builtin_inff() ? 0.f : m; }

static ExpSums exp_sums(const float* z, int64_t v, float t) {
  float m = -__builtin_inff();
  double s = 0.0, u = 0.0;
  for (int64_t k0 = 0; k0 < v; k0 += kBlock) {
    const int64_t k1 = k0 + kBlock < v ? k0 + kBlock : v;
    const Rebase rb = rebase(m, block_max(z, k0, k1) * t);  // t > 0
    u = rb.c * (u + s * rb.shift);
    s *= rb.c;
    const float mr = ref(m);
    float bs = 0.f, bu = 0.f;
#pragma omp simd reduction(+ : bs, bu)
    for (int64_t k = k0; k < k1; ++k) {
      const float d = z[k] * t - mr, e = exp_f(d);
      bs += e;
      bu += p_times(e, d);
    }
    s += bs;
    u += bu;
  }
  return {m, s, u};
}

static void logprob_grad(float* z, int64_t v, float t, float lse, float g, float g_H, float H) {
#pragma omp simd
  for (int64_t k = 0; k < v; ++k) {
    const float lp = z[k] * t - lse;
    z[k] = -p_times(exp_f(lp), g + g_H * (lp + H));
  }
}

// Keep (the reduced loss's rows, forward and reverse KL): the loop also leaves what the gradient
// needs, es = e^{d^S} in keep_s and et = e^{d^T} (forward) or d^S - d^T (reverse) in keep_t,
// each about the reference its block was summed with: ref_s[b], ref_t[b] per block (-inf for a
// block summed while its side had no reference yet, i.e. about 0).
template <int Mode, bool Keep>
static KlSums kl_sums_mode(const float* zs, const float* zt, int64_t v, float t, float* keep_s, float* keep_t,
                           float* ref_s, float* ref_t) {
  float ms = -__builtin_inff(), mt = -__builtin_inff();
  double ss = 0.0, st = 0.0, cross = 0.0;
  for (int64_t k0 = 0, b = 0; k0 < v; k0 += kBlock, ++b) {
    const int64_t k1 = k0 + kBlock < v ? k0 + kBlock : v;
    const Rebase rs = rebase(ms, block_max(zs, k0, k1) * t), rt = rebase(mt, block_max(zt, k0, k1) * t);
    // cross is weighted by the teacher's (forward) or the student's (reverse) exponentials, and
    // each of its terms d^T - d^S gains shift^T - shift^S.
    if (Mode == linear_kl::kForward) cross = rt.c * (cross + st * (rt.shift - rs.shift));
    if (Mode == linear_kl::kReverse) cross = rs.c * (cross + ss * (rs.shift - rt.shift));
    ss *= rs.c;
    st *= rt.c;
    const float msr = ref(ms), mtr = ref(mt);
    if (Keep) {
      ref_s[b] = ms;
      ref_t[b] = mt;
    }
    float bs = 0.f, bt = 0.f, bc = 0.f;
#pragma omp simd reduction(+ : bs, bt, bc)
    for (int64_t k = k0; k < k1; ++k) {
      const float ds = zs[k] * t - msr, dt = zt[k] * t - mtr;
      const float es = exp_f(ds), et = exp_f(dt);
      bs += es;
      bt += et;
      if (Mode == linear_kl::kForward) bc += p_times(et, dt - ds);
      if (Mode == linear_kl::kReverse) bc += p_times(es, ds - dt);
      if (Keep) {
        keep_s[k] = es;
        keep_t[k] = Mode == linear_kl::kForward ? et : ds - dt;
      }
    }
    ss += bs;
    st += bt;
    cross += bc;
  }
  return {ms, mt, ss, st, cross};
}

static KlSums kl_sums(const float* zs, const float* zt, int64_t v, float t, int mode) {
  if (mode == linear_kl::kForward)
    return kl_sums_mode<linear_kl::kForward, false>(zs, zt, v, t, nullptr, nullptr, nullptr, nullptr);
  if (mode == linear_kl::kReverse)
    return kl_sums_mode<linear_kl::kReverse, false>(zs, zt, v, t, nullptr, nullptr, nullptr, nullptr);
  return kl_sums_mode<linear_kl::kJsd, false>(zs, zt, v, t, nullptr, nullptr, nullptr, nullptr);
}

static KlSums kl_sums_keep(float* zs, const float* zt, float* kept, int64_t v, float t, int mode, float* ref_s,
                           float* ref_t) {
  if (mode == linear_kl::kForward)
    return kl_sums_mode<linear_kl::kForward, true>(zs, zt, v, t, zs, kept, ref_s, ref_t);
  return kl_sums_mode<linear_kl::kReverse, true>(zs, zt, v, t, zs, kept, ref_s, ref_t);
}

// e^{ref - lse}: what turns e^{d} about a block's reference into the probability; 0 for a block
// without one (ref -inf: its e^{d}, about 0, are 0 or NaN, and e^{0 - lse} could overflow).
static inline float to_prob(float ref_b, float lse) {
  return static_cast<float>(__builtin_exp(double(ref_b) - double(lse)));
}

static void kl_grad_kept(float* zs, const float* kept, int64_t v, const float* ref_s, const float* ref_t, float lse_s,
                         float lse_t, float aux, float g, int mode) {
  // Per block: the factors change only where a block moved a reference up (a few times a row).
  float last_s = __builtin_nanf(""), last_t = __builtin_nanf(""), cs = 0.f, ct = 0.f, off = 0.f;
  for (int64_t k0 = 0, b = 0; k0 < v; k0 += kBlock, ++b) {
    const int64_t k1 = k0 + kBlock < v ? k0 + kBlock : v;
    if (!(ref_s[b] == last_s && ref_t[b] == last_t)) {
      last_s = ref_s[b];
      last_t = ref_t[b];
      cs = g * to_prob(last_s, lse_s);
      ct = g * to_prob(last_t, lse_t);
      // reverse: a - b - kl = (d^S - d^T) + (ref_s - lse_s) - (ref_t - lse_t) - kl
      off = (ref(last_s) - lse_s) - (ref(last_t) - lse_t) - aux;
    }
    if (mode == linear_kl::kForward) {
#pragma omp simd
      for (int64_t k = k0; k < k1; ++k) zs[k] = fmadd(cs, zs[k], -ct * kept[k]);
    } else {
#pragma omp simd
      for (int64_t k = k0; k < k1; ++k) zs[k] = cs * p_times(zs[k], kept[k] + off);
    }
  }
}

// log m_k of the jsd's mixture from the two probabilities (log_mixture of csrc/linear_kl/math.h
// is the same quantity from the log-probs, at the price of a second exp and a log1p). Where both
// probabilities underflow, log m = -inf, but every use weights it by one of them (p_times).
[[gnu::always_inline]] static inline float log_mix(float ps, float pt, const linear_kl::JsdWeights& w) {
  return log_f(w.one_mb * ps + w.b * pt);
}

static JsdSums jsd_sums(const float* zs, const float* zt, int64_t v, float t, float lse_s, float lse_t,
                        linear_kl::JsdWeights w) {
  double kl_t = 0.0, kl_s = 0.0;
  for (int64_t k0 = 0; k0 < v; k0 += kBlock) {
    const int64_t k1 = k0 + kBlock < v ? k0 + kBlock : v;
    float bt = 0.f, bs = 0.f;
#pragma omp simd reduction(+ : bt, bs)
    for (int64_t k = k0; k < k1; ++k) {
      const float a = zs[k] * t - lse_s, b = zt[k] * t - lse_t;
      const float ps = exp_f(a), pt = exp_f(b), lm = log_mix(ps, pt, w);
      bt += p_times(pt, b - lm);
      bs += p_times(ps, a - lm);
    }
    kl_t += bt;
    kl_s += bs;
  }
  return {kl_t, kl_s};
}

static void kl_grad(float* zs, const float* zt, int64_t v, float t, float lse_s, float lse_t, float aux, float g,
                    int mode, linear_kl::JsdWeights w) {
  if (mode == linear_kl::kForward) {
#pragma omp simd
    for (int64_t k = 0; k < v; ++k) zs[k] = g * (exp_f(zs[k] * t - lse_s) - exp_f(zt[k] * t - lse_t));
  } else if (mode == linear_kl::kReverse) {
#pragma omp simd
    for (int64_t k = 0; k < v; ++k) {
      const float a = zs[k] * t - lse_s, b = zt[k] * t - lse_t;
      zs[k] = g * p_times(exp_f(a), a - b - aux);
    }
  } else {
    const float gj = g * w.one_mb;
#pragma omp simd
    for (int64_t k = 0; k < v; ++k) {
      const float a = zs[k] * t - lse_s, b = zt[k] * t - lse_t;
      const float ps = exp_f(a), lm = log_mix(ps, exp_f(b), w);
      zs[k] = gj * p_times(ps, a - lm - aux);
    }
  }
}

static const VocabRows kRows = {exp_sums, logprob_grad, kl_sums, jsd_sums, kl_grad, kl_sums_keep, kl_grad_kept,
                                kIsaName};
