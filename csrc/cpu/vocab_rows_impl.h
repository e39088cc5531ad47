// The row loops declared in csrc/cpu/vocab_rows.h. Included by csrc/cpu/vocab_rows.cpp once per
// ISA level, inside that level's namespace and `#pragma GCC target` region, so this file includes
// nothing (a standard header pulled in here would be compiled for one level only) and has no
// include guard.
//
// exp_f(x): e^x = 2^n e^r with n = round(x log2 e) and r = x - n ln2, the ln2 split in two
// (Cody-Waite; n * kLn2Hi is exact) so that |r| <= ln2 / 2 carries no cancellation error; e^r is
// its degree-7 Taylor polynomial (truncation r^8 / 8! < 6e-9 relative); 2^n goes straight into
// the exponent bits. x < -87.34 (a result below FLT_MIN) gives 0, x > 88 gives +inf (the
// epilogues only take x <= 0: d = z - max z, log p), NaN stays NaN. Branch-free, so the loops
// below vectorize.
//
// Sums: float per SIMD lane over kBlock logits, then double across blocks. Every term weighted by
// a probability goes through p_times (csrc/linear_kl_math.h): a -inf logit adds 0, not NaN.

constexpr int64_t kBlock = 256;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kRound = 12582912.f;  // 1.5 * 2^23: x + kRound - kRound rounds x to an integer

static inline float exp_f(float x) {
  const float xc = x < -87.33654f ? -87.33654f : (x > 88.f ? 88.f : x);
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  float e = p * scale;
  e = x < -87.33654f ? 0.f : e;
  e = x > 88.f ? __builtin_inff() : e;
  return x != x ? x : e;
}

static float row_max(const float* z, int64_t v) {
  float m = -__builtin_inff();
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < v; ++k) m = z[k] > m ? z[k] : m;
  return m;
}

static ExpSums exp_sums(const float* z, int64_t v, float t, float m) {
  double s = 0.0, u = 0.0;
  for (int64_t k0 = 0; k0 < v; k0 += kBlock) {
    const int64_t k1 = k0 + kBlock < v ? k0 + kBlock : v;
    float bs = 0.f, bu = 0.f;
#pragma omp simd reduction(+ : bs, bu)
    for (int64_t k = k0; k < k1; ++k) {
      const float d = z[k] * t - m, e = exp_f(d);
      bs += e;
      bu += p_times(e, d);
    }
    s += bs;
    u += bu;
  }
  return {s, u};
}

static void logprob_grad(float* z, int64_t v, float t, float lse, float g, float g_H, float H) {
#pragma omp simd
  for (int64_t k = 0; k < v; ++k) {
    const float lp = z[k] * t - lse;
    z[k] = -p_times(exp_f(lp), g + g_H * (lp + H));
  }
}

template <int Mode>
static KlSums kl_sums_mode(const float* zs, const float* zt, int64_t v, float t, float ms, float mt) {
  double ss = 0.0, st = 0.0, cross = 0.0;
  for (int64_t k0 = 0; k0 < v; k0 += kBlock) {
    const int64_t k1 = k0 + kBlock < v ? k0 + kBlock : v;
    float bs = 0.f, bt = 0.f, bc = 0.f;
#pragma omp simd reduction(+ : bs, bt, bc)
    for (int64_t k = k0; k < k1; ++k) {
      const float ds = zs[k] * t - ms, dt = zt[k] * t - mt;
      const float es = exp_f(ds), et = exp_f(dt);
      bs += es;
      bt += et;
      if (Mode == linear_kl::kForward) bc += p_times(et, dt - ds);
      if (Mode == linear_kl::kReverse) bc += p_times(es, ds - dt);
    }
    ss += bs;
    st += bt;
    cross += bc;
  }
  return {ss, st, cross};
}

static KlSums kl_sums(const float* zs, const float* zt, int64_t v, float t, float ms, float mt, int mode) {
  if (mode == linear_kl::kForward) return kl_sums_mode<linear_kl::kForward>(zs, zt, v, t, ms, mt);
  if (mode == linear_kl::kReverse) return kl_sums_mode<linear_kl::kReverse>(zs, zt, v, t, ms, mt);
  return kl_sums_mode<linear_kl::kJsd>(zs, zt, v, t, ms, mt);
}

static void kl_grad(float* zs, const float* zt, int64_t v, float t, float lse_s, float lse_t, float kl, float g,
                    int mode) {
  if (mode == linear_kl::kForward) {
#pragma omp simd
    for (int64_t k = 0; k < v; ++k) zs[k] = g * (exp_f(zs[k] * t - lse_s) - exp_f(zt[k] * t - lse_t));
  } else {
#pragma omp simd
    for (int64_t k = 0; k < v; ++k) {
      const float a = zs[k] * t - lse_s, b = zt[k] * t - lse_t;
      zs[k] = g * p_times(exp_f(a), a - b - kl);
    }
  }
}

static const VocabRows kRows = {row_max, exp_sums, logprob_grad, kl_sums, kl_grad, kIsaName};
