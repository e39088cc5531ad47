// LD_PRELOAD shim for an experiment: make two gloo worker threads leave c10d::opTypeToString together.
// ProcessGroupGloo::runLoop move-assigns its result into the shared pgStatus_->lastCompletedWorkName
// right after this call, outside workMutex_. Releasing both workers from a spin barrier at once lines
// up their two unlocked move-assigns, which a real run only does by chance.
#include <dlfcn.h>
#include <pthread.h>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>

namespace c10d {
enum class OpType : std::uint8_t;
std::string opTypeToString(OpType t);
}  // namespace c10d

using Fn = std::string (*)(c10d::OpType);
static std::atomic<int> arrived{0};
static std::atomic<unsigned> round_{0};

std::string c10d::opTypeToString(c10d::OpType t) {
  // libtorch_cpu is loaded RTLD_LOCAL by Python, out of RTLD_NEXT's reach: look it up by name.
  static Fn real = reinterpret_cast<Fn>(
      dlsym(dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY), "_ZN4c10d14opTypeToStringB5cxx11ENS_6OpTypeE"));
  std::string s = real(t);
  char name[32] = {0};
  pthread_getname_np(pthread_self(), name, sizeof(name));
  if (s.size() <= 15 || std::strcmp(name, "pt_gloo_runloop") != 0) return s;
  unsigned r = round_.load();
  if (arrived.fetch_add(1) == 1) {  // the second worker: release both
    arrived.store(0);
    round_.fetch_add(1);
    return s;
  }
  auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(2);
  while (round_.load() == r) {
    if (std::chrono::steady_clock::now() > end) {
      int one = 1;
      if (arrived.compare_exchange_strong(one, 0)) break;  // nobody came
    }
  }
  return s;
}
