// linear_logprobs on CUDA: the entry points of csrc/linear_logprobs/host.h with the epilogue
// kernels of csrc/linear_logprobs/kernels.cu (csrc/linear_logprobs/cuda_epilogue.h), in the
// driver's row chunks (csrc/linear_logprobs/driver.h; cuBLAS GEMMs with fp32 output), on the
// current stream. Nothing here synchronizes with the host.
#include <torch/library.h>

#include "linear_logprobs/cuda_epilogue.h"
#include "linear_logprobs/host.h"

namespace erpd {

TORCH_LIBRARY_IMPL(erpd, CUDA, m) {
  m.impl("linear_logprobs_fwd", &linear_logprobs::fwd<cuda::CudaEpilogue>);
  m.impl("linear_logprobs_bwd", &linear_logprobs::bwd<cuda::CudaEpilogue>);
}

}  // namespace erpd
