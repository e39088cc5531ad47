// The chunked driver of linear_kl, shared by the CPU and CUDA backends (csrc/common/chunked.h has the
// pieces common to every op). Each row chunk gets two fp32 logits blocks, the student's (one
// GEMM) and the teacher's (one GEMM of the teacher's own hidden states and head, or a slice of
// dense teacher logits), and an epilogue reduces them to the divergence (forward) or overwrites
// the student block with t * dz (backward). Neither [N, V] matrix ever exists.
//
// Math: csrc/linear_kl/math.h. Both logits are multiplied by t = 1 / temperature.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "common/chunked.h"
#include "linear_kl/math.h"

namespace erpd {
namespace linear_kl {

// Where the teacher's logits of a row chunk come from.
class Teacher {
 public:
  Teacher(const c10::optional<at::Tensor>& hidden, const c10::optional<at::Tensor>& weight,
          const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& logits) {
    if (logits.has_value()) {
      logits_ = *logits;
    } else {
      TORCH_CHECK(hidden.has_value() && weight.has_value(),
                  "linear_kl: give either teacher_logits or teacher_hidden and teacher_weight");
      hidden_ = *hidden;
      ops_.emplace(*weight, bias);
    }
  }

  // The GEMM operand of rows [r0, r0 + r) (fused; undefined for dense logits).
  at::Tensor rows(int64_t r0, int64_t r) const { return ops_ ? ops_->rows(hidden_, r0, r) : at::Tensor(); }

  // fp32 teacher logits (before the temperature) of rows [r0, r0 + r) at vocabulary columns
  // [c0, c0 + c), h = rows(r0, r); fills `buf` [r, c] unless the dense logits are already fp32,
  // whose slice is returned as is (rows with stride V when c < V).
  at::Tensor block(at::Tensor& buf, const at::Tensor& h, int64_t r0, int64_t c0) const {
    if (logits_.defined()) {
      const int64_t c = buf.size(1);
      at::Tensor src = logits_.narrow(0, r0, buf.size(0));
      if (c != src.size(1)) src = src.narrow(1, c0, c);
      if (src.scalar_type() == at::kFloat) return src;
      buf.copy_(src);
      return buf;
    }
    chunked::chunk_logits(buf, h, *ops_, c0);
    return buf;
  }
  at::Tensor chunk(at::Tensor& buf, int64_t r0, int64_t r) const { return block(buf, rows(r0, r), r0, 0); }

 private:
  at::Tensor logits_, hidden_;
  std::optional<chunked::Operands> ops_;
};

// Epilogue interface (csrc/linear_kl/cpu.cpp, csrc/linear_kl/cuda.cpp); zs, zt: [r, V] fp32
// logits before the temperature, rows [r0, r0 + r) of the outputs:
//   void forward(const at::Tensor& zs, const at::Tensor& zt, int64_t r0, double inv_t,
//                int64_t ignore_index, const at::Tensor& targets, int64_t mode, double beta,
//                at::Tensor& kl, at::Tensor& lse_s, at::Tensor& lse_t, at::Tensor& aux)
//   void backward(at::Tensor& zs, const at::Tensor& zt, int64_t r0, double inv_t,
//                 int64_t ignore_index, const at::Tensor& targets, int64_t mode, double beta,
//                 const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& aux,
//                 const at::Tensor& grad_kl)          -- overwrites zs with t * dz
//   void forward_backward(at::Tensor& zs, const at::Tensor& zt, int64_t r0, double inv_t,
//                         int64_t ignore_index, const at::Tensor& targets, int64_t mode, double beta,
//                         const at::Tensor& grad_kl, at::Tensor& kl, at::Tensor& lse_s,
//                         at::Tensor& lse_t, at::Tensor& aux)  -- both, on one chunk (the
//                         statistics may stay unwritten where the backend needs none)
template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const Teacher& teacher, const at::Tensor& targets, double inv_t, int64_t ignore_index, int64_t mode,
    double beta, const Epilogue& ep) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor kl = at::empty({n}, f32), lse_s = at::empty({n}, f32), lse_t = at::empty({n}, f32),
             aux = at::empty({n}, f32);
  const chunked::Operands ops(weight, bias);
  const int64_t rows = chunked::rows_per_chunk(n, v, 2, hidden.is_cuda());
  at::Tensor zs_buf = chunked::logits_buffer(rows, v, hidden), zt_buf = chunked::logits_buffer(rows, v, hidden);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor zs = zs_buf.narrow(0, 0, r), zt_b = zt_buf.narrow(0, 0, r);
    chunked::chunk_logits(zs, ops.rows(hidden, r0, r), ops);
    const at::Tensor zt = teacher.chunk(zt_b, r0, r);
    ep.forward(zs, zt, r0, inv_t, ignore_index, targets, mode, beta, kl, lse_s, lse_t, aux);
  }
  return {kl, lse_s, lse_t, aux};
}

template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const Teacher& teacher, const at::Tensor& targets, const at::Tensor& lse_s, const at::Tensor& lse_t,
    const at::Tensor& aux, const at::Tensor& grad_kl, double inv_t, int64_t ignore_index, int64_t mode,
    double beta, bool need_grad_hidden, bool need_grad_weight, const Epilogue& ep) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const chunked::Operands ops(weight, bias);
  const int64_t rows = chunked::rows_per_chunk(n, v, 2, hidden.is_cuda());
  chunked::Grads grads(hidden, weight, bias.has_value(), need_grad_hidden, need_grad_weight, rows);
  at::Tensor zs_buf = chunked::logits_buffer(rows, v, hidden), zt_buf = chunked::logits_buffer(rows, v, hidden);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor zs = zs_buf.narrow(0, 0, r), zt_b = zt_buf.narrow(0, 0, r);
    const at::Tensor h = ops.rows(hidden, r0, r);
    chunked::chunk_logits(zs, h, ops);
    const at::Tensor zt = teacher.chunk(zt_b, r0, r);
    ep.backward(zs, zt, r0, inv_t, ignore_index, targets, mode, beta, lse_s, lse_t, aux, grad_kl);
    grads.add_chunk(zs, h, ops, r0);
  }
  return grads.finish(hidden, weight);
}

// The CPU schedule (chunked::cpu_blocks, as in linear_logprobs::forward_blocked): both logits
// blocks of every [rows, cols] block of the vocabulary are reduced (forward: merged into each
// row's Epilogue::State, finished after the row's last block) or turned into dz and its gradient
// GEMMs (backward) while they are in cache. jsd's forward needs both log-sum-exps before its
// second sum, so it takes whole rows, in the row chunks of rows_per_chunk. The teacher block
// may be the caller's fp32 logits, rows with stride V. Epilogue interface
// (csrc/linear_kl/cpu.cpp): State,
//   forward_block(zs, zt, r0, c0, inv_t, ignore_index, targets, mode, beta, State* st)
//   forward_finish(const State* st, r0, r, ignore_index, targets, mode, beta, kl, lse_s, lse_t, aux)
//   backward(zs, zt, r0, inv_t, ignore_index, targets, mode, beta, lse_s, lse_t, aux, grad_kl)
template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_blocked(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const Teacher& teacher, const at::Tensor& targets, double inv_t, int64_t ignore_index, int64_t mode,
    double beta, const Epilogue& ep) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor kl = at::empty({n}, f32), lse_s = at::empty({n}, f32), lse_t = at::empty({n}, f32),
             aux = at::empty({n}, f32);
  const chunked::Operands ops(weight, bias);
  const chunked::Blocks b = mode == Mode::kJsd ? chunked::Blocks{chunked::rows_per_chunk(n, v, 2, false), v}
                                               : chunked::cpu_blocks(n, v, 2);
  const at::Tensor zs_buf = chunked::logits_buffer(b.rows, b.cols, hidden),
                   zt_buf = chunked::logits_buffer(b.rows, b.cols, hidden);
  std::vector<typename Epilogue::State> st(b.rows);
  for (int64_t r0 = 0; r0 < n; r0 += b.rows) {
    const int64_t r = std::min(b.rows, n - r0);
    const at::Tensor h = ops.rows(hidden, r0, r), ht = teacher.rows(r0, r);
    std::fill(st.begin(), st.end(), typename Epilogue::State{});
    for (int64_t c0 = 0; c0 < v; c0 += b.cols) {
      const int64_t c = std::min(b.cols, v - c0);
      at::Tensor zs = chunked::block_view(zs_buf, r, c), zt_b = chunked::block_view(zt_buf, r, c);
      chunked::chunk_logits(zs, h, ops, c0);
      const at::Tensor zt = teacher.block(zt_b, ht, r0, c0);
      ep.forward_block(zs, zt, r0, c0, inv_t, ignore_index, targets, mode, beta, st.data());
    }
    ep.forward_finish(st.data(), r0, r, ignore_index, targets, mode, beta, kl, lse_s, lse_t, aux);
  }
  return {kl, lse_s, lse_t, aux};
}

template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_blocked(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const Teacher& teacher, const at::Tensor& targets, const at::Tensor& lse_s, const at::Tensor& lse_t,
    const at::Tensor& aux, const at::Tensor& grad_kl, double inv_t, int64_t ignore_index, int64_t mode,
    double beta, bool need_grad_hidden, bool need_grad_weight, const Epilogue& ep) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const chunked::Operands ops(weight, bias);
  const chunked::Blocks b = chunked::cpu_blocks(n, v, 2);
  chunked::Grads grads(hidden, weight, bias.has_value(), need_grad_hidden, need_grad_weight, b.rows);
  const at::Tensor zs_buf = at::empty({b.rows, b.cols}, f32), zt_buf = at::empty({b.rows, b.cols}, f32);
  for (int64_t r0 = 0; r0 < n; r0 += b.rows) {
    const int64_t r = std::min(b.rows, n - r0);
    const at::Tensor h = ops.rows(hidden, r0, r), ht = teacher.rows(r0, r);
    for (int64_t c0 = 0; c0 < v; c0 += b.cols) {
      const int64_t c = std::min(b.cols, v - c0);
      at::Tensor zs = chunked::block_view(zs_buf, r, c), zt_b = chunked::block_view(zt_buf, r, c);
      chunked::chunk_logits(zs, h, ops, c0);
      const at::Tensor zt = teacher.block(zt_b, ht, r0, c0);
      ep.backward(zs, zt, r0, inv_t, ignore_index, targets, mode, beta, lse_s, lse_t, aux, grad_kl);
      grads.add_chunk(zs, h, ops, r0, c0);
    }
  }
  return grads.finish(hidden, weight);
}

// Forward that also produces the gradients of a reduced loss sum_i grad_kl_i * kl_i, whose
// per-row weights grad_kl are known before the forward (erpd.linear_kl with a reduction): per
// chunk, the two logits GEMMs, the epilogue's forward and backward on the same logits, the dh
// and dW GEMMs. Each chunk's logits are computed once: 8·N·H·V FLOPs with a fused teacher of
// the student's size (6·N·H·V with dense teacher logits, plus their read), and the autograd
// backward only scales the returned gradients. Returns (kl, grad_hidden, grad_weight, grad_bias).
template <class Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_with_grads(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const Teacher& teacher, const at::Tensor& targets, const at::Tensor& grad_kl, double inv_t,
    int64_t ignore_index, int64_t mode, double beta, bool need_grad_hidden, bool need_grad_weight,
    const Epilogue& ep) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor kl = at::empty({n}, f32), lse_s = at::empty({n}, f32), lse_t = at::empty({n}, f32),
             aux = at::empty({n}, f32);
  const chunked::Operands ops(weight, bias);
  const int64_t rows = chunked::rows_per_chunk(n, v, 2, hidden.is_cuda());
  chunked::Grads grads(hidden, weight, bias.has_value(), need_grad_hidden, need_grad_weight, rows);
  at::Tensor zs_buf = chunked::logits_buffer(rows, v, hidden), zt_buf = chunked::logits_buffer(rows, v, hidden);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor zs = zs_buf.narrow(0, 0, r), zt_b = zt_buf.narrow(0, 0, r);
    const at::Tensor h = ops.rows(hidden, r0, r);
    chunked::chunk_logits(zs, h, ops);
    const at::Tensor zt = teacher.chunk(zt_b, r0, r);
    ep.forward_backward(zs, zt, r0, inv_t, ignore_index, targets, mode, beta, grad_kl, kl, lse_s, lse_t, aux);
    grads.add_chunk(zs, h, ops, r0);
  }
  auto [gh, gw, gb] = grads.finish(hidden, weight);
  return {kl, gh, gw, gb};
}

}  // namespace linear_kl
}  // namespace erpd
