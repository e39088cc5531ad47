// linear_policy_loss on CUDA: the entry point of csrc/linear_policy_loss/host.h with the CUDA
// pieces: cuBLAS GEMMs with fp32 output (csrc/common/chunked.h), the linear_logprobs epilogues
// (csrc/linear_logprobs/cuda_epilogue.h) and the policy-loss kernels
// (csrc/policy_loss/kernels.cu), all on the current stream, with no value read on the host.
// Token-level methods: two small kernels compute the row factors and 1/D from the mask first
// (policy_loss_norm), then each chunk's tokens get dL/dlogp and dL/dH (policy_loss_segments)
// before dz = t [g_lp (onehot - p) - g_H p (log p + H)] overwrites the chunk's logits. gspo: the
// per-row policy kernel over whole rows and the finalize, whose 1/D (stats[0], on the device)
// then scales the gradients.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "linear_logprobs/cuda_epilogue.h"
#include "linear_policy_loss/host.h"
#include "policy_loss/host.h"
#include "policy_loss/kernels.h"

namespace erpd {
namespace {

class CudaPass {
 public:
  CudaPass(const policy::Params& p, const at::Tensor& mask, const c10::optional<at::Tensor>& num_items,
           double num_items_value, double norm_scale, const at::TensorOptions& f32)
      : p_(p),
        mask_(mask),
        // The one-element tensor stays on the device; the kernels read it.
        items_(num_items ? num_items->to(at::kFloat).contiguous() : at::Tensor()),
        num_items_value_(float(num_items_value)),
        norm_scale_(float(norm_scale)),
        f32_(f32),
        stream_(c10::cuda::getCurrentCUDAStream()),
        partials_(at::empty({mask.size(0), policy::kNumParts}, f32.dtype(at::kDouble))) {}

  at::Tensor rows(const policy::Batch& in, int64_t B, at::Tensor& loss, at::Tensor& stats) {
    C10_CUDA_CHECK(cuda::policy_loss_rows(p_, in, B, partials_.data_ptr<double>(), stream_));
    finalize(B, loss, stats);
    return stats.narrow(0, policy::kInvNorm, 1);
  }

  // Row factors and 1/D from the mask, before any gradient is written.
  void begin_segments() {
    const int64_t B = mask_.size(0), T = mask_.size(1);
    row_f_ = at::empty({B}, f32_);
    lengths_ = at::empty({B}, f32_);
    inv_ = at::empty({}, f32_);
    C10_CUDA_CHECK(cuda::policy_loss_norm(p_, mask_.data_ptr<bool>(), B, T, items_ptr(), num_items_value_, norm_scale_,
                                          row_f_.data_ptr<float>(), lengths_.data_ptr<float>(), inv_.data_ptr<float>(),
                                          partials_.data_ptr<double>(), stream_));
  }

  void segments(const policy::Batch& in, int64_t r0, int64_t r) {
    C10_CUDA_CHECK(cuda::policy_loss_segments(p_, in, r0, r, row_f_.data_ptr<float>(), inv_.data_ptr<float>(),
                                              partials_.data_ptr<double>(), stream_));
  }

  void finalize(int64_t B, at::Tensor& loss, at::Tensor& stats) {
    C10_CUDA_CHECK(cuda::policy_loss_finalize(p_, partials_.data_ptr<double>(), B, items_ptr(), num_items_value_,
                                              norm_scale_, loss.data_ptr<float>(), stats.data_ptr<float>(), stream_));
  }

 private:
  const float* items_ptr() const { return items_.defined() ? items_.data_ptr<float>() : nullptr; }

  const policy::Params p_;
  const at::Tensor mask_;
  const at::Tensor items_;
  const float num_items_value_, norm_scale_;
  const at::TensorOptions f32_;
  const cudaStream_t stream_;
  at::Tensor partials_, row_f_, lengths_, inv_;  // lengths_: the norm kernel's scratch
};

struct Cuda : policy_host::CudaDeviceChecks {
  using Epilogue = cuda::CudaEpilogue;
  using Pass = CudaPass;
};

}  // namespace

TORCH_LIBRARY_IMPL(erpd, CUDA, m) { m.impl("linear_policy_loss_fwd", &linear_policy_loss::fwd<Cuda>); }

}  // namespace erpd
