// Pieces shared by the chunked drivers of every op (csrc/<op>/driver.h), on CPU and CUDA.
//
// A chunked driver processes rows in chunks whose fp32 logits fit a byte budget: each chunk's
// logits come from one ATen GEMM (MKL/oneDNN on CPU, cuBLAS on CUDA) and an op-specific epilogue
// reduces them (forward) or overwrites them with t * dz (backward), after which two more GEMMs
// give the chunk's share of dh and dW. Memory is O(N + rows * V) while the GEMMs stay large.
// The CPU schedule of the per-token ops splits each chunk along the vocabulary too (cpu_blocks),
// so that every block of logits is still in cache when its epilogue reads it; the ops that
// compute their gradients in the forward need whole rows (dz needs the row's log-sum-exp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// The CPU drivers' schedule (the *_blocked drivers): vocabulary blocks of `cols` columns for
// `rows` rows at a time, each of the `buffers` fp32 [rows, cols] logits blocks small enough to
// stay in cache from its GEMM to its epilogue (16 MiB in all; ERPD_CHUNK_BYTES overrides it):
// as many rows as fit with 256 columns (every row, up to 16K at one buffer), then the columns
// that fit, in multiples of 256 (the row loops' sum block). The epilogue then reads its logits
// from cache instead of memory (the chunk-sized blocks of rows_per_chunk do not fit: on the
// 2-core Xeon an exp-sum pass ran at 0.4 ns per logit from cache and 0.7 from memory, the
// log-prob gradient pass at 0.3 and 1.3), and with every row in one chunk each dW block is
// written once, never re-read.
struct Blocks {
  int64_t rows, cols;
};
inline Blocks cpu_blocks(int64_t n, int64_t v, int64_t buffers) {
  constexpr int64_t kAlign = 256;
  int64_t budget = int64_t(16) << 20;
  if (const char* env = std::getenv("ERPD_CHUNK_BYTES")) budget = std::max<int64_t>(std::atoll(env), 1);
  const int64_t col_bytes = buffers * int64_t(sizeof(float));
  const int64_t rows = std::max<int64_t>(1, std::min(n, budget / (col_bytes * kAlign)));
  const int64_t cols = std::max(kAlign, budget / (col_bytes * rows) / kAlign * kAlign);
  return {rows, std::min(cols, v)};
}

// Rows of V fp32 logits that fit 2 MiB (8 at V = 64K): a group small enough to stay in the
// cores' caches between two passes over it.
inline int64_t cache_rows(int64_t v) { return std::max<int64_t>(1, (int64_t(2) << 20) / (v * int64_t(sizeof(float)))); }

// A CPU logits buffer of this size, before anything touches it, is advised to transparent huge
// pages (Linux, where THP is on or "madvise"): each call's 128 MiB logits block otherwise costs
// ~50 ms of 4 KiB page faults on first write (15 ms with 2 MiB pages, one core of the 2-core
// Xeon), and the GEMMs and row loops that sweep it take fewer TLB misses. Only the 2 MiB-aligned
// interior is advised; the tensor stays an ordinary allocation.
inline at::Tensor prefer_huge_pages(at::Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (t.device().is_cpu() && t.nbytes() >= 2 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + t.nbytes()) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice: failure is harmless
  }
#endif
  return t;
}

// CPU logits blocks of 32 MiB and more are kept between calls (ERPD_CPU_SCRATCH=0: not kept;
// erpd.release_cpu_scratch() frees them). A fresh 128 MiB block costs its page faults on every
// call, and where THP defrag is "madvise" (the kernel's default) a huge-page fault may first
// compact memory, which stalled calls by up to ~200 ms on the 2-core Xeon. A block is free
// again once no tensor views it, so the pool holds what the most blocks in use at once needed
// (two for linear_kl, 128 MiB each by default). Thread-safe: a block is handed out under the
// lock, viewed before the lock drops.
class ScratchPool {
 public:
  at::Tensor take(int64_t numel, const at::TensorOptions& f32) {
    std::lock_guard<std::mutex> lock(mu_);
    at::Tensor* spare = nullptr;
    for (at::Tensor& b : blocks_) {
      if (b.storage().use_count() != 1) continue;  // viewed by a running call
      if (b.numel() >= numel) return b.narrow(0, 0, numel);
      spare = &b;
    }
    at::Tensor fresh = prefer_huge_pages(at::empty({numel}, f32));
    if (spare) *spare = fresh; else blocks_.push_back(fresh);  // a free block too small is replaced
    return fresh.narrow(0, 0, numel);
  }
  // Drops the blocks no call is using; returns their bytes.
  int64_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t freed = 0;
    std::vector<at::Tensor> kept;
    for (at::Tensor& b : blocks_) {
      if (b.storage().use_count() == 1) freed += int64_t(b.nbytes()); else kept.push_back(b);
    }
    blocks_.swap(kept);
    return freed;
  }
  int64_t bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t n = 0;
    for (const at::Tensor& b : blocks_) n += int64_t(b.nbytes());
    return n;
  }

 private:
  std::mutex mu_;
  std::vector<at::Tensor> blocks_;
};

inline ScratchPool& cpu_scratch() {
  static ScratchPool pool;
  return pool;
}

// The fp32 [rows, v] logits block of a chunked driver. Blocks under 32 MiB (the per-token ops'
// vocabulary blocks) are not kept: malloc reuses them without fresh page faults, and a kept
// forward block would add to the backward's peak.
inline at::Tensor logits_buffer(int64_t rows, int64_t v, const at::Tensor& like) {
  constexpr int64_t kKeepBytes = int64_t(32) << 20;
  const auto f32 = like.options().dtype(at::kFloat);
  const char* keep = std::getenv("ERPD_CPU_SCRATCH");
  if (!like.is_cpu() || rows * v * int64_t(sizeof(float)) < kKeepBytes || (keep && std::string(keep) == "0"))
    return prefer_huge_pages(at::empty({rows, v}, f32));
  return cpu_scratch().take(rows * v, f32).view({rows, v});
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
  // The head's vocabulary rows [c0, c0 + c).
  at::Tensor cols(int64_t c0, int64_t c) const { return c == weight.size(0) ? weight : weight.narrow(0, c0, c); }
};

// out = a @ b (+ out) in out's dtype: 16-bit operands into an fp32 out go through ATen's
// out_dtype overloads (fp32 accumulation, one rounding).
inline void gemm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == out.scalar_type()) {
    if (accumulate) out.addmm_(a, b); else at::mm_out(out, a, b);
  } else {
    if (accumulate) at::addmm_out(out, out, a, b, at::kFloat); else at::mm_out(out, a, b, at::kFloat);
  }
}

// out (+)= a @ b, split on CPU into one range of out's rows (dim 0, with a's rows) or columns
// (dim 1, with b's columns) per intra-op thread, each range one single-threaded GEMM (the BLAS
// runs serially inside a parallel region). MKL's own two-thread split of a row chunk's
// [512, 512] x [512, 65536] logits GEMM ran at 0.83x the rate of this one on the 2-core Xeon
// (benchmarks/results/README.md). Range boundaries fall on 16-element (64-byte) multiples.
inline void gemm_parts(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate, int64_t dim) {
  constexpr int64_t kMinPart = 256;  // rows or columns per thread; below it one GEMM keeps the BLAS's threading
  const int64_t n = out.size(dim);
  const int64_t parts = out.is_cpu() && !at::in_parallel_region() ? std::min<int64_t>(at::get_num_threads(), n / kMinPart) : 1;
  if (parts <= 1) return gemm_f32(out, a, b, accumulate);
  // The workers run the GEMMs as this thread would: same dispatch keys (autograd is excluded
  // inside an op) and grad mode.
  const at::ThreadLocalState state;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t lo = n * p / parts / 16 * 16, hi = p + 1 == parts ? n : n * (p + 1) / parts / 16 * 16;
      at::Tensor o = out.narrow(dim, lo, hi - lo);
      gemm_f32(o, dim == 0 ? a.narrow(0, lo, hi - lo) : a, dim == 1 ? b.narrow(1, lo, hi - lo) : b, accumulate);
    }
  });
}

// z [r, c] = the logits of rows h at vocabulary columns [c0, c0 + c) (all of them by default).
inline void chunk_logits(at::Tensor& z, const at::Tensor& h, const Operands& ops, int64_t c0 = 0) {
  const int64_t c = z.size(1);
  gemm_parts(z, h, ops.cols(c0, c).t(), /*accumulate=*/false, /*dim=*/1);
  if (ops.bias.has_value()) z.add_(c == ops.bias->size(0) ? *ops.bias : ops.bias->narrow(0, c0, c));
}

// A contiguous fp32 [r, c] view of the first r * c elements of a logits buffer.
inline at::Tensor block_view(const at::Tensor& buf, int64_t r, int64_t c) {
  return buf.view({-1}).narrow(0, 0, r * c).view({r, c});
}

// The gradient GEMMs of each chunk (and, on CPU, of each vocabulary block of a chunk).
//  * dh: every row belongs to one chunk, so its GEMM writes the final value (with vocabulary
//    blocks, the first block writes and the others add, in fp32). When the operands are not
//    upcast (CUDA, or fp32 anywhere) it goes straight into the input dtype (the GEMM
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
    // Not advised to huge pages: dW is fresh memory on every call (it is returned), and with THP
    // defrag "madvise" an advised fault may compact memory first. On the 2-core Xeon that made
    // the dW GEMMs of a call take up to 1.7x as long, on about half the calls.
    gw = need_w ? at::empty({v, hdim}, gw_final ? weight.options() : f32) : at::empty({0}, weight.options());
    gb = has_bias ? at::zeros({v}, f32) : at::empty({0}, f32);
  }

  // z: the logits of rows [r0, r0 + r) at vocabulary columns [c0, c0 + c), already overwritten
  // with t * dz; h: the rows' GEMM operand. Rows are visited in order, each chunk's columns too.
  void add_chunk(const at::Tensor& z, const at::Tensor& h, const Operands& ops, int64_t r0, int64_t c0 = 0) {
    const int64_t c = z.size(1);
    const at::Tensor w = ops.cols(c0, c);
    // 16-bit operands on CUDA: dz is rounded to the input dtype for the tensor-core GEMMs (as
    // the unfused PyTorch backward does), with fp32 accumulation.
    const at::Tensor dz = w.scalar_type() == at::kFloat ? z : z.to(w.scalar_type());
    if (need_h) {
      at::Tensor out = gh.narrow(0, r0, z.size(0));
      TORCH_CHECK(c0 == 0 || out.scalar_type() == at::kFloat, "vocabulary blocks need an fp32 dh");
      gemm_parts(out, dz, w, /*accumulate=*/c0 > 0, /*dim=*/0);
    }
    if (need_w) {
      at::Tensor out = c == gw.size(0) ? gw : gw.narrow(0, c0, c);
      gemm_parts(out, dz.t(), h, /*accumulate=*/r0 > 0, /*dim=*/0);
      gw_written = true;
    }
    if (has_bias) (c == gb.size(0) ? gb : gb.narrow(0, c0, c)).add_(z.sum(0));
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
