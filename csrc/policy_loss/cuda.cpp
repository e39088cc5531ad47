// policy_loss on CUDA: the entry point of csrc/policy_loss/host.h with the kernels of
// csrc/policy_loss/kernels.cu on the current stream, two launches per call: the per-row pass
// (loss terms, metrics' partial sums, gradients without 1/D) and the one-block finalize that
// writes the loss, 1/D and the metrics. No value is read on the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>


#include "policy_loss/host.h"
#include "policy_loss/kernels.h"

namespace erpd {
namespace {

struct Cuda : policy_host::CudaDeviceChecks {
  using Guard = c10::cuda::CUDAGuard;

  static void reduce(const policy::Params& p, const policy::Batch& in, int64_t B,
                     const c10::optional<at::Tensor>& num_items, double num_items_value, double norm_scale,
                     at::Tensor& loss, at::Tensor& stats) {
    // The one-element tensor stays on the device; the finalize kernel reads it.
    const at::Tensor items = num_items ? num_items->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor partials = at::empty({B, policy::kNumParts}, loss.options().dtype(at::kDouble));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(cuda::policy_loss_rows(p, in, B, partials.data_ptr<double>(), stream));
    C10_CUDA_CHECK(cuda::policy_loss_finalize(p, partials.data_ptr<double>(), B,
                                              items.defined() ? items.data_ptr<float>() : nullptr,
                                              float(num_items_value), float(norm_scale), loss.data_ptr<float>(),
                                              stats.data_ptr<float>(), stream));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CUDA, m) { m.impl("policy_loss_fwd", &policy_host::fwd<Cuda>); }

}  // namespace erpd
