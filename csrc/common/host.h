// What the host files of every op share. Each op's entry points (its schemas in
// csrc/bindings.cpp) are written once, in <op>/host.h, as templates over what the device files
// supply: cpu.cpp and cuda.cpp each register them with their epilogue (or backend) type, which
// also names the guard held for the call.
#pragma once

#include <ATen/ATen.h>

namespace erpd {
namespace host {

// The guard of a CPU entry point: no device to make current. The CUDA files name
// c10::cuda::CUDAGuard instead, so that their launches and the current stream follow the
// tensors' device rather than whichever device is current.
struct NoGuard {
  explicit NoGuard(const at::Device& /*device*/) {}
};

}  // namespace host
}  // namespace erpd
