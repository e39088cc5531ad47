// The row loops of csrc/common/vocab_rows.h, compiled once per ISA level (vocab_rows_impl.h holds
// them), and the choice among the levels. Torch-free: it compiles in a second.
#include "common/vocab_rows.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "linear_kl/math.h"  // linear_kl::Mode, for the KL loops

namespace erpd {
namespace cpu {

namespace isa_default {
constexpr const char* kIsaName = "default";
constexpr bool kFma = false;
#include "common/vocab_rows_impl.h"
}  // namespace isa_default

// GCC's per-function targets: the AVX2 and AVX-512 copies run only where the CPU has them. Other
// compilers and architectures get the baseline copy (which the compiler still vectorizes for its
// default target).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ERPD_X86_LEVELS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
constexpr const char* kIsaName = "avx2";
constexpr bool kFma = true;
#include "common/vocab_rows_impl.h"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
namespace isa_avx512 {
constexpr const char* kIsaName = "avx512";
constexpr bool kFma = true;
#include "common/vocab_rows_impl.h"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

namespace {

bool supported(const std::string& isa) {
  if (isa == "default") return true;
#ifdef ERPD_X86_LEVELS
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && supported("avx2");
#endif
  return false;
}

const VocabRows& rows_of(const std::string& isa) {
#ifdef ERPD_X86_LEVELS
  if (isa == "avx512") return isa_avx512::kRows;
  if (isa == "avx2") return isa_avx2::kRows;
#endif
  return isa_default::kRows;
}

const VocabRows& checked(const std::string& isa, const char* what) {
  if (isa != "default" && isa != "avx2" && isa != "avx512")
    throw std::invalid_argument(std::string(what) + " must be default, avx2 or avx512, got '" + isa + "'");
  if (!supported(isa))
    throw std::runtime_error(std::string(what) + " " + isa + ": this CPU (or this build) has no " + isa +
                             " code path");
  return rows_of(isa);
}

const VocabRows* pick() {
  if (const char* env = std::getenv("ERPD_CPU_ISA"); env && *env) return &checked(env, "ERPD_CPU_ISA");
  for (const char* isa : {"avx512", "avx2"})
    if (supported(isa)) return &rows_of(isa);
  return &rows_of("default");
}

std::atomic<const VocabRows*>& current() {
  static std::atomic<const VocabRows*> rows{pick()};
  return rows;
}

}  // namespace

const VocabRows& vocab_rows() { return *current().load(std::memory_order_relaxed); }

void set_vocab_rows_isa(const std::string& isa) { current().store(&checked(isa, "cpu isa"), std::memory_order_relaxed); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"default", "avx2", "avx512"})
    if (supported(isa)) out.emplace_back(isa);
  return out;
}

}  // namespace cpu
}  // namespace erpd
