// Pieces shared by the chunked drivers of every op (csrc/<op>_driver.h), on CPU and CUDA.
//
// A chunked driver processes rows in chunks whose fp32 logits fit a byte budget: each chunk's
// logits come from one ATen GEMM (MKL/oneDNN on CPU, cuBLAS on CUDA) and an op-specific epilogue
// reduces them (forward) or overwrites them with t * dz (backward), after which two more GEMMs
// give the chunk's share of dh and dW. Memory is O(N + rows * V) while the GEMMs stay large.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <tuple>

namespace erpd {
namespace chunked {

// Rows per chunk for `buffers` fp32 [rows, v] logits blocks (two for linear_kl: student and
// teacher), within a byte budget for all of them that ERPD_CHUNK_BYTES overrides. Default:
//  * CPU 128 MiB per block (512 rows at V = 64K): MKL's chunk GEMM needs a few hundred rows to
//    come close to the rate of one big GEMM. Memory stays O(rows * V);
//  * CUDA 1 GiB in all (~2000 rows at V = 128K for one block): a cuBLAS GEMM needs M in the
//    thousands to run at the tensor cores' rate, the one-block-per-row epilogues need rows >> SMs,
//    and every chunk re-reads and re-writes the fp32 dW accumulator.
// The measurements: benchmarks/results/README.md, "Where the defaults in the code come from".
inline int64_t rows_per_chunk(int64_t n, int64_t v, int64_t buffers, bool cuda) {
  int64_t budget = cuda ? int64_t(1) << 30 : buffers * (int64_t(128) << 20);
  if (const char* env = std::getenv("ERPD_CHUNK_BYTES")) budget = std::max<int64_t>(std::atoll(env), 1);
  return std::max<int64_t>(std::min<int64_t>(budget / (buffers * v * int64_t(sizeof(float))), n), 1);
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

// The gradient GEMMs of each chunk.
//  * dh: every row belongs to one chunk, so its GEMM writes the final value. When the operands
//    are not upcast (CUDA, or fp32 anywhere) it goes straight into the input dtype (the GEMM
//    accumulates in fp32 and rounds once); on CPU with 16-bit inputs, into fp32, cast at the end.
//  * dW sums over chunks: an fp32 accumulator that the first chunk writes (beta = 0, so the
//    buffer is never zero-filled or read) and the others add to, cast once at the end. When one
//    chunk holds every row there is nothing to sum: written once in the input dtype. (At
//    V = 128K, H = 4096 the accumulator is 2 GB, so every pass over it saved counts.)
struct Grads {
  at::Tensor gh, gw, gb;
  bool need_h, need_w, has_bias, gh_final, gw_final, gw_written = false;

  Grads(const at::Tensor& hidden, const at::Tensor& weight, bool has_bias, bool need_h, bool need_w,
        int64_t rows_per_chunk)
      : need_h(need_h), need_w(need_w), has_bias(has_bias) {
    const int64_t n = hidden.size(0), v = weight.size(0), hdim = hidden.size(1);
    const bool upcast = hidden.device().is_cpu() && hidden.scalar_type() != at::kFloat;
    gh_final = !upcast;
    gw_final = !upcast && rows_per_chunk >= n;
    const auto f32 = hidden.options().dtype(at::kFloat);
    gh = need_h ? at::empty({n, hdim}, gh_final ? hidden.options() : f32) : at::empty({0}, hidden.options());
    gw = need_w ? at::empty({v, hdim}, gw_final ? weight.options() : f32) : at::empty({0}, weight.options());
    gb = has_bias ? at::zeros({v}, f32) : at::empty({0}, f32);
  }

  // z: the chunk's logits buffer, already overwritten with t * dz; h: the chunk's GEMM operand.
  void add_chunk(const at::Tensor& z, const at::Tensor& h, const Operands& ops, int64_t r0) {
    // 16-bit operands on CUDA: dz is rounded to the input dtype for the tensor-core GEMMs (as
    // the unfused PyTorch backward does), with fp32 accumulation.
    const at::Tensor dz = ops.weight.scalar_type() == at::kFloat ? z : z.to(ops.weight.scalar_type());
    if (need_h) {
      at::Tensor out = gh.narrow(0, r0, z.size(0));
      if (gh_final) at::mm_out(out, dz, ops.weight); else gemm_f32(out, dz, ops.weight, /*accumulate=*/false);
    }
    if (need_w) {
      if (gw_final) at::mm_out(gw, dz.t(), h); else gemm_f32(gw, dz.t(), h, /*accumulate=*/gw_written);
      gw_written = true;
    }
    if (has_bias) gb.add_(z.sum(0));
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(const at::Tensor& hidden, const at::Tensor& weight) {
    if (need_w && !gw_written) gw.zero_();  // no rows at all
    if (need_h) gh = gh.to(hidden.scalar_type());
    if (need_w) gw = gw.to(weight.scalar_type());
    return {gh, gw, gb};
  }
};

// Softcapping (Gemma's final_logit_softcapping c, any logit scale s folded in): with
// cap_scale a = s / c > 0, each chunk's logits y become tanh(a y) before the epilogue, whose
// inverse temperature then carries c / temperature (erpd/ops/_validate.py logit_transform). So
// the transform is a chunk-level pass and the epilogues see plain logits. Backward: the epilogue
// writes t dz w.r.t. tanh(a y); the chain rule multiplies by a (1 - tanh^2), saved from the
// transformed chunk into a second buffer before the epilogue overwrites it (so a softcapped call
// budgets two logits buffers per chunk).
struct Softcap {
  double a;  // 0: no softcapping

  bool on() const { return a > 0.0; }
  int64_t buffers() const { return on() ? 2 : 1; }
  void apply(at::Tensor& z) const {
    if (on()) z.mul_(a).tanh_();
  }
  // f = a (1 - z^2) from the transformed chunk z.
  void save_grad_factor(const at::Tensor& z, at::Tensor& f) const {
    if (!on()) return;
    at::mul_out(f, z, z);
    f.sub_(1.0).mul_(-a);
  }
  void apply_grad_factor(at::Tensor& dz, const at::Tensor& f) const {
    if (on()) dz.mul_(f);
  }
};

}  // namespace chunked
}  // namespace erpd
