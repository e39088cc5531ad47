// The chunked driver of linear_logprobs, shared by the CPU and CUDA backends.
//
// Rows are processed in chunks whose fp32 logits fit a byte budget; each chunk's logits come
// from one ATen GEMM (MKL/oneDNN on CPU, cuBLAS on CUDA), and a backend-specific epilogue turns
// them into per-row statistics (forward) or into dz in place (backward). So the logits only
// ever exist as one [rows, V] chunk: memory O(N + rows * V), while the GEMMs stay large.
//
// Math (DESIGN.md §3), for a row with logits z = (W h + b) * t and target y:
//   m = max z,  s = sum e^{z - m},  u = sum e^{z - m} (z - m)
//   lse = m + log s,  log p_y = z_y - lse,  H = log s - u / s
// (u is accumulated around m so that H never subtracts two numbers of size |lse|.)
// Backward, with p = e^{z - lse}:
//   dz_k = g_lp (delta_ky - p_k) - g_H p_k (log p_k + H)
//   dh = t dz W,  dW = t dz^T h,  db = t sum_rows dz
// The epilogue folds t into dz, so the GEMMs below use alpha = 1.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <tuple>

namespace erpd {
namespace linear_logprobs {

// Per-chunk logits budget: 64 MiB by default (ERPD_CHUNK_BYTES overrides). Large enough that
// each GEMM runs near peak, small enough that memory does not grow with N.
inline int64_t rows_per_chunk(int64_t n, int64_t v) {
  int64_t budget = int64_t(64) << 20;
  if (const char* env = std::getenv("ERPD_CHUNK_BYTES")) budget = std::max<int64_t>(std::atoll(env), 1);
  return std::max<int64_t>(std::min<int64_t>(budget / (v * int64_t(sizeof(float))), n), 1);
}

// GEMM operands. CPU: 16-bit inputs are upcast (W once, each hidden chunk when used): MKL's
// fp32 GEMM is the fast path there. CUDA: operands stay in their dtype for the tensor cores and
// the GEMMs write fp32 (ATen's out_dtype overloads), so logits are never rounded to bf16.
struct Operands {
  at::Tensor weight;             // [V, H], GEMM dtype
  c10::optional<at::Tensor> bias;  // [V] fp32
  bool upcast;

  Operands(const at::Tensor& w, const c10::optional<at::Tensor>& b)
      : upcast(w.device().is_cpu() && w.scalar_type() != at::kFloat) {
    weight = upcast ? w.to(at::kFloat) : w;
    if (b.has_value()) bias = b->to(at::kFloat);
  }
  at::Tensor rows(const at::Tensor& hidden, int64_t r0, int64_t r) const {
    at::Tensor h = hidden.narrow(0, r0, r);
    return upcast ? h.to(at::kFloat) : h;
  }
};

// out[fp32] = a @ b (+ beta * out), whatever the operands' dtype.
inline void gemm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == at::kFloat) {
    if (accumulate) out.addmm_(a, b); else at::mm_out(out, a, b);
  } else {
    if (accumulate) at::addmm_out(out, out, a, b, at::kFloat); else at::mm_out(out, a, b, at::kFloat);
  }
}

inline void chunk_logits(at::Tensor& z, const at::Tensor& h, const Operands& ops) {
  gemm_f32(z, h, ops.weight.t(), /*accumulate=*/false);
  if (ops.bias.has_value()) z.add_(*ops.bias);
}

// Epilogue interface (see csrc/cpu/linear_logprobs.cpp and csrc/cuda/linear_logprobs.cpp):
//   void forward(const at::Tensor& z, int64_t r0, double inv_t, int64_t ignore_index,
//                const at::Tensor& targets, at::Tensor& logp, at::Tensor& ent, at::Tensor& lse)
//     z: [r, V] fp32 logits *before* the temperature; writes rows [r0, r0 + r) of the outputs.
//   void backward(at::Tensor& z, int64_t r0, double inv_t, int64_t ignore_index,
//                 const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& ent,
//                 const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent)
//     overwrites z with t * dz.
template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_t, int64_t ignore_index, const Epilogue& ep) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, f32), ent = at::empty({n}, f32), lse = at::empty({n}, f32);
  const Operands ops(weight, bias);
  const int64_t rows = rows_per_chunk(n, v);
  at::Tensor zbuf = at::empty({rows, v}, f32);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor z = zbuf.narrow(0, 0, r);
    chunk_logits(z, ops.rows(hidden, r0, r), ops);
    ep.forward(z, r0, inv_t, ignore_index, targets, logp, ent, lse);
  }
  return {logp, ent, lse};
}

template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& ent,
    const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent, double inv_t,
    int64_t ignore_index, bool need_grad_hidden, bool need_grad_weight, const Epilogue& ep) {
  const int64_t n = hidden.size(0), v = weight.size(0), hdim = hidden.size(1);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const Operands ops(weight, bias);
  // fp32 accumulators, cast to the input dtype once at the end.
  at::Tensor gh = need_grad_hidden ? at::empty({n, hdim}, f32) : at::empty({0}, hidden.options());
  at::Tensor gw = need_grad_weight ? at::zeros({v, hdim}, f32) : at::empty({0}, weight.options());
  at::Tensor gb = bias.has_value() ? at::zeros({v}, f32) : at::empty({0}, f32);
  const int64_t rows = rows_per_chunk(n, v);
  at::Tensor zbuf = at::empty({rows, v}, f32);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor z = zbuf.narrow(0, 0, r);
    const at::Tensor h = ops.rows(hidden, r0, r);
    chunk_logits(z, h, ops);
    ep.backward(z, r0, inv_t, ignore_index, targets, lse, ent, g_lp, g_ent);
    // 16-bit operands on CUDA: dz is rounded to the input dtype for the tensor-core GEMMs (as
    // the unfused PyTorch backward does), with fp32 accumulation and output.
    const at::Tensor dz = ops.weight.scalar_type() == at::kFloat ? z : z.to(ops.weight.scalar_type());
    if (need_grad_hidden) {
      at::Tensor out = gh.narrow(0, r0, r);
      gemm_f32(out, dz, ops.weight, /*accumulate=*/false);
    }
    if (need_grad_weight) gemm_f32(gw, dz.t(), h, /*accumulate=*/true);
    if (bias.has_value()) gb.add_(z.sum(0));
  }
  if (need_grad_hidden) gh = gh.to(hidden.scalar_type());
  if (need_grad_weight) gw = gw.to(weight.scalar_type());
  return {gh, gw, gb};
}

}  // namespace linear_logprobs
}  // namespace erpd
