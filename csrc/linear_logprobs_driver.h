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

// The gradient GEMMs of each chunk, into fp32 accumulators that are cast to the input dtype
// once at the end.
struct Grads {
  at::Tensor gh, gw, gb;
  bool need_h, need_w, has_bias;

  Grads(const at::Tensor& hidden, const at::Tensor& weight, bool has_bias, bool need_h, bool need_w)
      : need_h(need_h), need_w(need_w), has_bias(has_bias) {
    const int64_t n = hidden.size(0), v = weight.size(0), hdim = hidden.size(1);
    const auto f32 = hidden.options().dtype(at::kFloat);
    gh = need_h ? at::empty({n, hdim}, f32) : at::empty({0}, hidden.options());
    gw = need_w ? at::zeros({v, hdim}, f32) : at::empty({0}, weight.options());
    gb = has_bias ? at::zeros({v}, f32) : at::empty({0}, f32);
  }

  // z: the chunk's logits buffer, already overwritten with t * dz; h: the chunk's GEMM operand.
  void add_chunk(const at::Tensor& z, const at::Tensor& h, const Operands& ops, int64_t r0) {
    // 16-bit operands on CUDA: dz is rounded to the input dtype for the tensor-core GEMMs (as
    // the unfused PyTorch backward does), with fp32 accumulation and output.
    const at::Tensor dz = ops.weight.scalar_type() == at::kFloat ? z : z.to(ops.weight.scalar_type());
    if (need_h) {
      at::Tensor out = gh.narrow(0, r0, z.size(0));
      gemm_f32(out, dz, ops.weight, /*accumulate=*/false);
    }
    if (need_w) gemm_f32(gw, dz.t(), h, /*accumulate=*/true);
    if (has_bias) gb.add_(z.sum(0));
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(const at::Tensor& hidden, const at::Tensor& weight) {
    if (need_h) gh = gh.to(hidden.scalar_type());
    if (need_w) gw = gw.to(weight.scalar_type());
    return {gh, gw, gb};
  }
};

template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& ent,
    const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent, double inv_t,
    int64_t ignore_index, bool need_grad_hidden, bool need_grad_weight, const Epilogue& ep) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const Operands ops(weight, bias);
  Grads grads(hidden, weight, bias.has_value(), need_grad_hidden, need_grad_weight);
  const int64_t rows = rows_per_chunk(n, v);
  at::Tensor zbuf = at::empty({rows, v}, hidden.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor z = zbuf.narrow(0, 0, r);
    const at::Tensor h = ops.rows(hidden, r0, r);
    chunk_logits(z, h, ops);
    ep.backward(z, r0, inv_t, ignore_index, targets, lse, ent, g_lp, g_ent);
    grads.add_chunk(z, h, ops, r0);
  }
  return grads.finish(hidden, weight);
}

// Forward that also produces the gradients, for a loss whose gradient w.r.t. each row's log-prob
// (and entropy) is known as soon as that row's log-prob is: the token-level policy losses
// (erpd.linear_policy_loss). Per chunk: the logits GEMM, the forward epilogue, then
// `grad_step(r0, r, logp, ent)` fills rows [r0, r0 + r) of g_lp (and g_ent), the backward
// epilogue turns the same logits into dz in place, and the dh, dW GEMMs follow. So each chunk's
// logits are computed once: 6·N·H·V FLOPs in all, and the autograd backward only scales the
// returned gradients. g_ent == nullopt: no entropy gradient. Returns
// (logp, ent, grad_hidden, grad_weight, grad_bias).
template <class Epilogue, class GradStep>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_with_grads(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_t, int64_t ignore_index, const at::Tensor& g_lp,
    const c10::optional<at::Tensor>& g_ent, bool need_grad_hidden, bool need_grad_weight, const Epilogue& ep,
    GradStep&& grad_step) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, f32), ent = at::empty({n}, f32), lse = at::empty({n}, f32);
  const Operands ops(weight, bias);
  Grads grads(hidden, weight, bias.has_value(), need_grad_hidden, need_grad_weight);
  const int64_t rows = rows_per_chunk(n, v);
  at::Tensor zbuf = at::empty({rows, v}, f32);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor z = zbuf.narrow(0, 0, r);
    const at::Tensor h = ops.rows(hidden, r0, r);
    chunk_logits(z, h, ops);
    ep.forward(z, r0, inv_t, ignore_index, targets, logp, ent, lse);
    grad_step(r0, r, logp, ent);
    ep.backward(z, r0, inv_t, ignore_index, targets, lse, ent, g_lp, g_ent);
    grads.add_chunk(z, h, ops, r0);
  }
  auto [gh, gw, gb] = grads.finish(hidden, weight);
  return {logp, ent, gh, gw, gb};
}

}  // namespace linear_logprobs
}  // namespace erpd
