// linear_logprobs on CPU: the entry points of csrc/linear_logprobs/host.h with the fused epilogues
// of csrc/linear_logprobs/cpu_epilogue.h, in the driver's vocabulary-blocked schedule
// (csrc/linear_logprobs/driver.h, MKL GEMMs). The math is in the driver header.
#include <torch/library.h>

#include "linear_logprobs/cpu_epilogue.h"
#include "linear_logprobs/host.h"

namespace erpd {

TORCH_LIBRARY_IMPL(erpd, CPU, m) {
  m.impl("linear_logprobs_fwd", &linear_logprobs::fwd<cpu::CpuEpilogue>);
  m.impl("linear_logprobs_bwd", &linear_logprobs::bwd<cpu::CpuEpilogue>);
}

}  // namespace erpd
