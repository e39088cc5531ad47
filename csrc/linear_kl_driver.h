// The chunked driver of linear_kl, shared by the CPU and CUDA backends (csrc/chunked.h has the
// pieces common to every op). Each row chunk gets two fp32 logits blocks, the student's (one
// GEMM) and the teacher's (one GEMM of the teacher's own hidden states and head, or a slice of
// dense teacher logits), and an epilogue reduces them to the divergence (forward) or overwrites
// the student block with t * dz (backward). Neither [N, V] matrix ever exists.
//
// Math: csrc/linear_kl_math.h. Both logits are multiplied by t = 1 / temperature.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "chunked.h"

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

  // fp32 teacher logits (before the temperature) of rows [r0, r0 + r); fills `buf` [r, V] unless
  // the dense logits are already fp32, whose slice is returned as is.
  at::Tensor chunk(at::Tensor& buf, int64_t r0, int64_t r) const {
    if (logits_.defined()) {
      const at::Tensor src = logits_.narrow(0, r0, r);
      if (src.scalar_type() == at::kFloat) return src;
      buf.copy_(src);
      return buf;
    }
    chunked::chunk_logits(buf, ops_->rows(hidden_, r0, r), *ops_);
    return buf;
  }

 private:
  at::Tensor logits_, hidden_;
  std::optional<chunked::Operands> ops_;
};

// Epilogue interface (csrc/cpu/linear_kl.cpp, csrc/cuda/linear_kl.cpp); zs, zt: [r, V] fp32
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
