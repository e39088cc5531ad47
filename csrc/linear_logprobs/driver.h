// The chunked driver of linear_logprobs, shared by the CPU and CUDA backends.
//
// Rows are processed in chunks whose fp32 logits fit a byte budget; each chunk's logits come
// from one ATen GEMM (MKL/oneDNN on CPU, cuBLAS on CUDA), and a backend-specific epilogue turns
// them into per-row statistics (forward) or into dz in place (backward). So the logits only
// ever exist as one [rows, V] chunk: memory O(N + rows * V), while the GEMMs stay large.
//
// Math (docs/design.md §4.2), for a row with logits z = (W h + b) * t and target y:
//   m = max z,  s = sum e^{z - m},  u = sum e^{z - m} (z - m)
//   lse = m + log s,  log p_y = z_y - lse,  H = log s - u / s
// (u is accumulated around m so that H never subtracts two numbers of size |lse|.)
// Backward, with p = e^{z - lse}:
//   dz_k = g_lp (delta_ky - p_k) - g_H p_k (log p_k + H)
//   dh = t dz W,  dW = t dz^T h,  db = t sum_rows dz
// The epilogue folds t into dz, so the gradient GEMMs (chunked::Grads) use alpha = 1. With
// softcapping, W h + b above is tanh(a (W h + b)) and dz picks up a (1 - tanh^2) (chunked::Softcap).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/chunked.h"

namespace erpd {
namespace linear_logprobs {

using chunked::Grads;
using chunked::Operands;
using chunked::Softcap;
using chunked::chunk_logits;
using chunked::rows_per_chunk;

// Epilogue interface (see csrc/linear_logprobs/cpu_epilogue.h and cuda_epilogue.h):
//   void forward(const at::Tensor& z, int64_t r0, double inv_t, int64_t ignore_index,
//                const at::Tensor& targets, at::Tensor& logp, at::Tensor& ent, at::Tensor& lse)
//     z: [r, V] fp32 logits *before* the temperature (softcapped already, chunked::Softcap);
//     writes rows [r0, r0 + r) of the outputs.
//   void backward(at::Tensor& z, int64_t r0, double inv_t, int64_t ignore_index,
//                 const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& ent,
//                 const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent)
//     overwrites z with t * dz.
// The per-row statistics besides log p_y and H that TRL's fused LM head reports
// (erpd.linear_token_stats), written to rows [r0, r0 + r) of stats [3, N]: log sum_k p_k^2, the
// mean logit t z (after the temperature), and whether y is the first maximal logit (is_top1, as
// 0/1). Chunk-level ATen reductions of the chunk's logits z (before the temperature) once the
// epilogue has written lse; they overwrite z, which the forward no longer needs. Ignored rows: 0.
inline void token_stats(at::Tensor& z, int64_t r0, double inv_t, int64_t ignore_index, const at::Tensor& targets,
                        const at::Tensor& lse, at::Tensor& stats) {
  const int64_t r = z.size(0);
  const at::Tensor y = targets.narrow(0, r0, r);
  const at::Tensor valid = y.ne(ignore_index);
  at::Tensor out = stats.narrow(1, r0, r);
  // argmax gives the first maximal index: a tie with an earlier token does not count as top-1.
  out[2].copy_(at::argmax(z, 1).eq(y).logical_and_(valid));
  out[1].copy_(at::where(valid, z.mean(1).mul_(inv_t), 0.0));
  // log sum_k p_k^2 = log sum_k exp(2 (t z_k - lse)); every exponent is <= 0.
  z.mul_(2.0 * inv_t).sub_(lse.narrow(0, r0, r).unsqueeze(1) * 2.0).exp_();
  out[0].copy_(at::where(valid, z.sum(1).log_(), 0.0));
}

template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_t, double cap_scale, int64_t ignore_index, bool with_stats,
    const Epilogue& ep) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, f32), ent = at::empty({n}, f32), lse = at::empty({n}, f32);
  at::Tensor stats = with_stats ? at::empty({3, n}, f32) : at::empty({0}, f32);
  const Operands ops(weight, bias);
  const Softcap cap{cap_scale};
  const int64_t rows = rows_per_chunk(n, v, 1, hidden.is_cuda());
  at::Tensor zbuf = chunked::logits_buffer(rows, v, hidden);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor z = zbuf.narrow(0, 0, r);
    chunk_logits(z, ops.rows(hidden, r0, r), ops);
    cap.apply(z);
    ep.forward(z, r0, inv_t, ignore_index, targets, logp, ent, lse);
    if (with_stats) token_stats(z, r0, inv_t, ignore_index, targets, lse, stats);
  }
  return {logp, ent, lse, stats};
}

template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& ent,
    const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent, double inv_t, double cap_scale,
    int64_t ignore_index, bool need_grad_hidden, bool need_grad_weight, const Epilogue& ep) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const Operands ops(weight, bias);
  const Softcap cap{cap_scale};
  const int64_t rows = rows_per_chunk(n, v, cap.buffers(), hidden.is_cuda());
  Grads grads(hidden, weight, bias.has_value(), need_grad_hidden, need_grad_weight, rows);
  at::Tensor zbuf = chunked::logits_buffer(rows, v, hidden);
  at::Tensor fbuf = cap.on() ? chunked::logits_buffer(rows, v, hidden) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor z = zbuf.narrow(0, 0, r);
    at::Tensor f = cap.on() ? fbuf.narrow(0, 0, r) : at::Tensor();
    const at::Tensor h = ops.rows(hidden, r0, r);
    chunk_logits(z, h, ops);
    cap.apply(z);
    cap.save_grad_factor(z, f);
    ep.backward(z, r0, inv_t, ignore_index, targets, lse, ent, g_lp, g_ent);
    cap.apply_grad_factor(z, f);
    grads.add_chunk(z, h, ops, r0);
  }
  return grads.finish(hidden, weight);
}

// The CPU schedule (chunked::cpu_blocks): every [rows, cols] block of logits is reduced (forward:
// merged into each row's Epilogue::State, finished once the row's last block is done) or turned
// into dz and its gradient GEMMs (backward) while it is in cache. The same GEMMs as above, split
// along the vocabulary; softcapping applies per block. with_stats takes whole rows (token_stats
// reduces them once lse is known), in the row chunks of rows_per_chunk. Epilogue interface
// (csrc/linear_logprobs/cpu_epilogue.h): State,
//   forward_block(z, r0, c0, inv_t, ignore_index, targets, State* st)
//   forward_finish(const State* st, r0, r, ignore_index, targets, logp, ent, lse)
//   backward(z, r0, c0, inv_t, ignore_index, targets, lse, ent, g_lp, g_ent)
template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_blocked(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_t, double cap_scale, int64_t ignore_index, bool with_stats,
    const Epilogue& ep) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, f32), ent = at::empty({n}, f32), lse = at::empty({n}, f32);
  at::Tensor stats = with_stats ? at::empty({3, n}, f32) : at::empty({0}, f32);
  const Operands ops(weight, bias);
  const Softcap cap{cap_scale};
  const chunked::Blocks b =
      with_stats ? chunked::Blocks{rows_per_chunk(n, v, 1, false), v} : chunked::cpu_blocks(n, v, 1);
  const at::Tensor buf = chunked::logits_buffer(b.rows, b.cols, hidden);
  std::vector<typename Epilogue::State> st(b.rows);
  for (int64_t r0 = 0; r0 < n; r0 += b.rows) {
    const int64_t r = std::min(b.rows, n - r0);
    const at::Tensor h = ops.rows(hidden, r0, r);
    std::fill(st.begin(), st.end(), typename Epilogue::State{});
    at::Tensor z;
    for (int64_t c0 = 0; c0 < v; c0 += b.cols) {
      z = chunked::block_view(buf, r, std::min(b.cols, v - c0));
      chunk_logits(z, h, ops, c0);
      cap.apply(z);
      ep.forward_block(z, r0, c0, inv_t, ignore_index, targets, st.data());
    }
    ep.forward_finish(st.data(), r0, r, ignore_index, targets, logp, ent, lse);
    if (with_stats) token_stats(z, r0, inv_t, ignore_index, targets, lse, stats);
  }
  return {logp, ent, lse, stats};
}

template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_blocked(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& ent,
    const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent, double inv_t, double cap_scale,
    int64_t ignore_index, bool need_grad_hidden, bool need_grad_weight, const Epilogue& ep) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const Operands ops(weight, bias);
  const Softcap cap{cap_scale};
  const chunked::Blocks b = chunked::cpu_blocks(n, v, cap.buffers());
  Grads grads(hidden, weight, bias.has_value(), need_grad_hidden, need_grad_weight, b.rows);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const at::Tensor buf = at::empty({b.rows, b.cols}, f32), fbuf = cap.on() ? at::empty_like(buf) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += b.rows) {
    const int64_t r = std::min(b.rows, n - r0);
    const at::Tensor h = ops.rows(hidden, r0, r);
    for (int64_t c0 = 0; c0 < v; c0 += b.cols) {
      const int64_t c = std::min(b.cols, v - c0);
      at::Tensor z = chunked::block_view(buf, r, c), f = cap.on() ? chunked::block_view(fbuf, r, c) : at::Tensor();
      chunk_logits(z, h, ops, c0);
      cap.apply(z);
      cap.save_grad_factor(z, f);
      ep.backward(z, r0, c0, inv_t, ignore_index, targets, lse, ent, g_lp, g_ent);
      cap.apply_grad_factor(z, f);
      grads.add_chunk(z, h, ops, r0, c0);
    }
  }
  return grads.finish(hidden, weight);
}

// Forward that also produces the gradients, for a loss whose gradient w.r.t. each row's log-prob
// (and entropy) is known as soon as that row's log-prob is: the token-level policy losses
// (erpd.linear_policy_loss). Per chunk: the logits GEMM, the forward epilogue, then
// `grad_step(r0, r, logp, ent)` fills rows [r0, r0 + r) of g_lp (and g_ent), the backward
// epilogue turns the same logits into dz in place, and the dh, dW GEMMs follow. So each chunk's
// logits are computed once: 6·N·H·V FLOPs in all, and the autograd backward only scales the
// returned gradients. g_ent == nullopt: no entropy gradient. On CPU the three middle steps run
// on groups of rows (chunked::cache_rows) that stay in cache from the forward epilogue's read to
// the backward's, which the whole chunk does not; the gradient steps still visit the rows in
// order. Returns (logp, ent, grad_hidden, grad_weight, grad_bias).
template <class Epilogue, class GradStep>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_with_grads(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_t, double cap_scale, int64_t ignore_index, const at::Tensor& g_lp,
    const c10::optional<at::Tensor>& g_ent, bool need_grad_hidden, bool need_grad_weight, const Epilogue& ep,
    GradStep&& grad_step) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, f32), ent = at::empty({n}, f32), lse = at::empty({n}, f32);
  const Operands ops(weight, bias);
  const Softcap cap{cap_scale};
  const int64_t rows = rows_per_chunk(n, v, cap.buffers(), hidden.is_cuda());
  Grads grads(hidden, weight, bias.has_value(), need_grad_hidden, need_grad_weight, rows);
  at::Tensor zbuf = chunked::logits_buffer(rows, v, hidden);
  at::Tensor fbuf = cap.on() ? chunked::logits_buffer(rows, v, hidden) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor z = zbuf.narrow(0, 0, r);
    const at::Tensor h = ops.rows(hidden, r0, r);
    chunk_logits(z, h, ops);
    cap.apply(z);
    const int64_t group = hidden.is_cuda() ? r : chunked::cache_rows(v);
    for (int64_t g0 = 0; g0 < r; g0 += group) {
      const int64_t gr = std::min(group, r - g0);
      at::Tensor zg = z.narrow(0, g0, gr);
      at::Tensor fg = cap.on() ? fbuf.narrow(0, g0, gr) : at::Tensor();
      ep.forward(zg, r0 + g0, inv_t, ignore_index, targets, logp, ent, lse);
      grad_step(r0 + g0, gr, logp, ent);
      cap.save_grad_factor(zg, fg);
      ep.backward(zg, r0 + g0, inv_t, ignore_index, targets, lse, ent, g_lp, g_ent);
      cap.apply_grad_factor(zg, fg);
    }
    grads.add_chunk(z, h, ops, r0);
  }
  auto [gh, gw, gb] = grads.finish(hidden, weight);
  return {logp, ent, gh, gw, gb};
}

}  // namespace linear_logprobs
}  // namespace erpd
