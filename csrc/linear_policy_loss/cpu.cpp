// linear_policy_loss on CPU: the entry point of csrc/linear_policy_loss/host.h with the CPU
// epilogues of linear_logprobs (csrc/linear_logprobs/cpu_epilogue.h; MKL GEMMs, gspo's passes in
// vocabulary blocks) and the policy loss's per-token math on the host: the row factors and 1/D
// come from the mask before anything else, so the token-level gradients get 1/D as soon as they
// are written.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/host.h"
#include "linear_logprobs/cpu_epilogue.h"
#include "linear_policy_loss/host.h"
#include "policy_loss/host.h"

namespace erpd {
namespace {

class CpuPass {
 public:
  CpuPass(const policy::Params& p, const at::Tensor& mask, const c10::optional<at::Tensor>& num_items,
          double num_items_value, double norm_scale, const at::TensorOptions& /*f32*/)
      : p_(p), items_(policy_host::num_items(num_items, num_items_value)), norm_scale_(float(norm_scale)) {
    // Row lengths and the normaliser come from the mask alone.
    const int64_t B = mask.size(0), T = mask.size(1);
    const bool* mk = mask.data_ptr<bool>();
    row_f_.resize(B);
    double n_valid = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      float len = 0.f;
      for (int64_t t = 0; t < T; ++t) len += mk[b * T + t];
      row_f_[b] = policy::row_factor(p, len);
      n_valid += len;
    }
    inv_ = float(policy::inv_norm(p, n_valid, B, items_, norm_scale_));
  }

  float rows(const policy::Batch& in, int64_t B, at::Tensor& loss, at::Tensor& stats) {
    std::vector<policy::Acc> acc(B);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(in.T, 1));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) policy::process_row(p_, in, b, acc[b]);
    });
    for (const auto& a : acc) total_.merge(a);
    finalize(B, loss, stats);
    return inv_;
  }

  void begin_segments() {}

  void segments(const policy::Batch& in, int64_t r0, int64_t r) {
    const int64_t T = in.T;
    // The chunk's rows are tokens [r0, r0 + r) of the flattened batch; walk them sequence by sequence.
    for (int64_t i = r0; i < r0 + r;) {
      const int64_t b = i / T, t0 = i % T, t1 = std::min(T, t0 + (r0 + r - i));
      policy::process_segment(p_, in, b, t0, t1, row_f_[b], total_);
      i += t1 - t0;
    }
    // These gradients feed the chunk's GEMMs right away: apply the normaliser now.
    float *glp = in.grad_logprobs, *gen = in.grad_entropy;
    for (int64_t i = r0; i < r0 + r; ++i) {
      glp[i] *= inv_;
      if (gen) gen[i] *= inv_;
    }
  }

  void finalize(int64_t B, at::Tensor& loss, at::Tensor& stats) const {
    policy::finalize(p_, total_, B, items_, norm_scale_, loss.data_ptr<float>(), stats.data_ptr<float>());
  }

 private:
  const policy::Params p_;
  const float items_, norm_scale_;
  std::vector<float> row_f_;
  float inv_;
  policy::Acc total_;
};

struct Cpu : policy_host::NoDeviceChecks {
  using Epilogue = cpu::CpuEpilogue;
  using Pass = CpuPass;
};

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CPU, m) { m.impl("linear_policy_loss_fwd", &linear_policy_loss::fwd<Cpu>); }

}  // namespace erpd
