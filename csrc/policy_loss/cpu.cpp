// policy_loss on CPU: the entry point of csrc/policy_loss/host.h with the per-token math of
// csrc/policy_loss/math.h over rows in parallel (ATen's OpenMP pool), in one call that returns
// the loss, the metrics and the gradients w.r.t. the log-probs (and entropy), so that the
// backward is a scale.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/host.h"
#include "policy_loss/host.h"

namespace erpd {
namespace {

struct Cpu : policy_host::NoDeviceChecks {
  using Guard = host::NoGuard;

  static void reduce(const policy::Params& p, const policy::Batch& in, int64_t B,
                     const c10::optional<at::Tensor>& num_items, double num_items_value, double norm_scale,
                     at::Tensor& loss, at::Tensor& stats) {
    std::vector<policy::Acc> rows(B);
    // About 16k tokens per task: the common small batch stays on one thread instead of paying the
    // pool's start-up and join for microseconds of work.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(in.T, 1));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) policy::process_row(p, in, b, rows[b]);
    });
    policy::Acc total;
    for (const auto& r : rows) total.merge(r);
    policy::finalize(p, total, B, policy_host::num_items(num_items, num_items_value), float(norm_scale),
                     loss.data_ptr<float>(), stats.data_ptr<float>());
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CPU, m) { m.impl("policy_loss_fwd", &policy_host::fwd<Cpu>); }

}  // namespace erpd
