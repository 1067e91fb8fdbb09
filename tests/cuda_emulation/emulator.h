// A CUDA execution model on the CPU, for testing the kernels of csrc/cuda on a
// machine without a GPU (tests/cuda_emulation/build.py compiles them against
// this header with the host compiler).
//
// What it models:
//   - a launch runs its blocks one after another and, within a block, every
//     thread as a fiber (its own stack) that runs until it reaches a barrier or
//     returns. __syncthreads() (and its _or / _and / _count forms) resumes the
//     block's threads once all of them wait at the same barrier; the warp
//     shuffles exchange values once all 32 lanes of the warp are at the same
//     shuffle.
//   - blocks and threads run in a configurable order (forward, reverse, or a
//     permutation drawn from a seed). Between two barriers a thread's code runs
//     without interruption, so a result that differs between orders is a race
//     on shared or global memory.
//   - shared memory: static __shared__ variables are static locals (one block
//     runs at a time); dynamic shared memory is filled with 0xFF bytes (NaN as a
//     float) before every block, so reading it before writing shows.
//   - the device's multiprocessor count is configurable (2 by default, so
//     grid-stride loops take several steps; 132 as an H100).
// What it reports as an error of the launch (a C++ exception on the host):
//   a barrier that the threads of a block reach at different places or that
//   some thread of the block never reaches (it returned), a shuffle that not
//   all 32 lanes of a warp reach together or whose mask is not the full warp,
//   a failed CUDA_KERNEL_ASSERT, a launch configuration a GPU would refuse
//   (empty grid or block, more than 1024 threads, dynamic shared memory above
//   48 KiB without opt-in). Built with AddressSanitizer (build.py), a read or
//   write outside a tensor, a shared array or a thread's stack stops the run.
// What it cannot see: a race that needs a preemption inside a barrier interval
// (a non-atomic read-modify-write of global memory by two threads), the
// memory model, the static shared memory a block uses, device-specific floating
// point (fused multiply-adds, the device's expf / logf), timing.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

// ---- The CUDA language -------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint3 {
  unsigned x, y, z;
};

// Device code calls the math functions unqualified, with float overloads, as
// CUDA's math API declares them in the global namespace (those the kernels use).
using std::exp;
using std::fabs;
using std::isfinite;
using std::log;
using std::sqrt;

namespace emu {

// ---- Fibers ---------------------------------------------------------------------
// A saved execution context. On x86-64 a switch saves the callee-saved
// registers on the old stack and swaps stack pointers (controls.cpp holds the
// routine): no system call, unlike swapcontext, which saves the signal mask
// and made barrier-heavy kernels spend most of their time in the kernel.
#if defined(__x86_64__)
}  // namespace emu
extern "C" void robustdrop_emu_switch(void** save_stack_pointer, void* load_stack_pointer);
namespace emu {

struct Context {
  void* stack_pointer = nullptr;

  // A context whose first resumption calls entry() on the given stack.
  void prepare(char* stack, size_t bytes, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15};
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                            // entry's return address: it never returns
    *--sp = reinterpret_cast<void*>(entry);     // where the first switch returns to
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp, rbx, r12 .. r15
    stack_pointer = sp;
  }
};

inline void switch_context(Context& from, Context& to) { robustdrop_emu_switch(&from.stack_pointer, to.stack_pointer); }
#else
struct Context {
  ucontext_t context;

  void prepare(char* stack, size_t bytes, void (*entry)()) {
    getcontext(&context);
    context.uc_stack.ss_sp = stack;
    context.uc_stack.ss_size = bytes;
    context.uc_link = nullptr;
    makecontext(&context, entry, 0);
  }
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }
#endif

// The built-in variables of the thread that runs now.
inline uint3 thread_index{0, 0, 0};
inline uint3 block_index{0, 0, 0};
inline dim3 block_dim;
inline dim3 grid_dim;

enum class Order : int { forward = 0, reverse = 1, shuffled = 2 };

struct Config {
  Order thread_order = Order::forward;
  Order block_order = Order::forward;
  uint64_t shuffle_seed = 0;
  int multiprocessors = 2;
};

inline Config& config() {
  static Config c;
  return c;
}

// The counts of what the emulator ran, for tests that check it was exercised.
struct Counters {
  int64_t launches = 0, barriers = 0, shuffles = 0;
};

inline Counters& counters() {
  static Counters c;
  return c;
}

enum class Vote { any, all, count };

enum class Wait { running, block_barrier, warp_shuffle, done };

struct Fiber {
  Context context;
  char* stack = nullptr;  // usable stack (a guard page lies below it)
  uint3 index{0, 0, 0};
  unsigned linear = 0;
  Wait wait = Wait::running;
  const char* site = "";  // the barrier or shuffle it waits at (file:line)
  Vote vote_kind = Vote::count;
  int vote = 0;  // its predicate at a __syncthreads_or / _and / _count
  int vote_result = 0;
  unsigned warp_ops = 0;  // shuffles done (picks the exchange buffer)
};

class Emulator {
 public:
  static constexpr size_t kStackBytes = 512 * 1024;
  static constexpr unsigned kMaxThreads = 1024;
  static constexpr size_t kMaxDynamicShared = 48 * 1024;

  // Runs body() in every thread of every block of the grid.
  void launch(dim3 grid, dim3 block, size_t dynamic_bytes, const std::function<void()>& body) {
    check_config(grid, block, dynamic_bytes);
    ++counters().launches;
    const unsigned threads = block.x * block.y * block.z;
    const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
    reserve(threads);
    dynamic_shared_.assign((dynamic_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t),
                           std::max_align_t{});
    block_dim = block;
    grid_dim = grid;
    body_ = &body;
    const std::vector<uint64_t> block_order = ordering(blocks, config().block_order, 1);
    for (uint64_t b : block_order) {
      block_index = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                     static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
      if (!dynamic_shared_.empty()) {
        std::memset(dynamic_shared_.data(), 0xFF, dynamic_shared_.size() * sizeof(std::max_align_t));
      }
      run_block(threads, b);
    }
    body_ = nullptr;
  }

  void* dynamic_shared() { return dynamic_shared_.data(); }

  // Called by a thread: waits until every thread of the block is here.
  int block_barrier(const char* site, Vote kind, int vote) {
    Fiber& f = *current_;
    f.wait = Wait::block_barrier;
    f.site = site;
    f.vote_kind = kind;
    f.vote = vote;
    ++counters().barriers;
    yield(f);
    return f.vote_result;
  }

  // Called by a lane: publishes `bits`, waits for the whole warp, and returns
  // the bits that lane `source(lane)` published.
  template <typename Source>
  uint64_t warp_exchange(const char* site, unsigned mask, uint64_t bits, Source source) {
    Fiber& f = *current_;
    if (mask != 0xFFFFFFFFu) fail(std::string("a shuffle with a partial lane mask at ") + site);
    const unsigned lane = f.linear % 32, warp = f.linear / 32;
    auto& slots = exchange_[warp][f.warp_ops & 1u];
    slots[lane] = bits;
    f.wait = Wait::warp_shuffle;
    f.site = site;
    ++counters().shuffles;
    yield(f);
    const unsigned from = source(lane);
    ++f.warp_ops;
    return slots[from < 32 ? from : lane];
  }

  // Fails the launch. Called by a thread, it never returns: the thread is
  // abandoned and the launch raises on the host. It must not look noreturn to
  // the compiler (no [[noreturn]], a return after the switch): under
  // AddressSanitizer a noreturn call resets the shadow of the current stack,
  // which for a thread's stack it does not know.
  void fail(const std::string& message) {
    if (error_.empty()) error_ = message;
    if (current_ != nullptr) {
      Fiber& f = *current_;
      f.wait = Wait::done;  // abandoned: the scheduler stops at the error
      switch_context(f.context, scheduler_);
      return;  // not reached: an abandoned thread is never resumed
    }
    throw std::runtime_error(message);
  }

 private:
  void check_config(dim3 grid, dim3 block, size_t dynamic_bytes) {
    auto bad = [](const std::string& what) { throw std::runtime_error("CUDA emulation: invalid launch: " + what); };
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) bad("an empty grid");
    if (grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) bad("grid dimensions over the limits");
    const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
    if (threads == 0) bad("an empty block");
    if (threads > kMaxThreads || block.z > 64) bad("more than 1024 threads per block");
    if (dynamic_bytes > kMaxDynamicShared) {
      bad(std::to_string(dynamic_bytes) + " bytes of dynamic shared memory (over 48 KiB needs an opt-in)");
    }
  }

  void reserve(unsigned threads) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    while (fibers_.size() < threads) {
      // A guard page below each stack turns an overflow into a fault, not a corruption.
      void* memory = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (memory == MAP_FAILED) throw std::runtime_error("CUDA emulation: no memory for a thread stack");
      mprotect(memory, page, PROT_NONE);
      fibers_.emplace_back();
      fibers_.back().stack = static_cast<char*>(memory) + page;
    }
    exchange_.resize((threads + 31) / 32);
  }

  static std::vector<uint64_t> ordering(uint64_t count, Order order, uint64_t salt) {
    std::vector<uint64_t> result(count);
    std::iota(result.begin(), result.end(), uint64_t{0});
    if (order == Order::reverse) std::reverse(result.begin(), result.end());
    if (order == Order::shuffled) {
      std::mt19937_64 rng(config().shuffle_seed * 1000003u + salt * 7919u + count);
      std::shuffle(result.begin(), result.end(), rng);
    }
    return result;
  }

  static void entry() {
    Emulator& e = instance();
    try {
      (*e.body_)();
    } catch (const std::exception& error) {
      // An exception cannot cross the fiber's stack: it becomes the launch's error.
      if (e.error_.empty()) e.error_ = std::string("a thread raised: ") + error.what();
    }
    e.current_->wait = Wait::done;
    switch_context(e.current_->context, e.scheduler_);
  }

  void yield(Fiber& f) {
    switch_context(f.context, scheduler_);
    // Resumed: restore this thread's built-in variables.
    thread_index = f.index;
  }

  void resume(Fiber& f) {
    current_ = &f;
    thread_index = f.index;
    f.wait = Wait::running;
    switch_context(scheduler_, f.context);
    current_ = nullptr;
  }

  void run_block(unsigned threads, uint64_t block_number) {
    error_.clear();
    if (abandoned_) clear_stacks();
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers_[t];
      f.linear = t;
      f.index = {t % block_dim.x, t / block_dim.x % block_dim.y, t / (block_dim.x * block_dim.y)};
      f.wait = Wait::running;
      f.warp_ops = 0;
      f.context.prepare(f.stack, kStackBytes, &Emulator::entry);
    }
    const std::vector<uint64_t> order = ordering(threads, config().thread_order, block_number + 1);
    while (true) {
      // Run every runnable thread up to its next barrier, shuffle or return.
      for (uint64_t t : order) {
        Fiber& f = fibers_[t];
        if (f.wait != Wait::running) continue;
        resume(f);
        if (!error_.empty()) {
          abandoned_ = true;
          throw std::runtime_error("CUDA emulation: " + error_);
        }
      }
      if (!release(threads)) break;
    }
  }

  // Releases the barriers and shuffles that every thread concerned has reached.
  // Returns false when every thread has returned; raises what would hang or be
  // undefined on a GPU.
  bool release(unsigned threads) {
    unsigned done = 0, at_block = 0;
    const char* block_site = nullptr;
    for (unsigned t = 0; t < threads; ++t) {
      const Fiber& f = fibers_[t];
      if (f.wait == Wait::done) ++done;
      if (f.wait == Wait::block_barrier) {
        ++at_block;
        if (block_site == nullptr) block_site = f.site;
        if (std::strcmp(block_site, f.site) != 0) {
          fail_host(std::string("threads of one block wait at different __syncthreads: ") + block_site + " and " +
                    f.site);
        }
      }
    }
    if (done == threads) return false;
    bool released = false;
    for (unsigned warp = 0; warp * 32 < threads; ++warp) {
      const unsigned first = warp * 32, last = std::min(threads, first + 32);
      unsigned at_shuffle = 0;
      const char* site = nullptr;
      for (unsigned t = first; t < last; ++t) {
        const Fiber& f = fibers_[t];
        if (f.wait != Wait::warp_shuffle) continue;
        ++at_shuffle;
        if (site == nullptr) site = f.site;
        if (std::strcmp(site, f.site) != 0) {
          fail_host(std::string("lanes of one warp at different shuffles: ") + site + " and " + f.site);
        }
      }
      if (at_shuffle == 0) continue;
      if (last - first != 32 || at_shuffle != 32) {
        fail_host(std::string("a full-mask shuffle that not all 32 lanes of the warp reach: ") + site);
      }
      for (unsigned t = first; t < last; ++t) fibers_[t].wait = Wait::running;
      released = true;
    }
    if (released) return true;
    if (at_block == 0) fail_host("no thread can run, none waits at a barrier");
    if (at_block + done != threads) fail_host("deadlock");
    if (done != 0) {
      fail_host(std::string("some threads of the block returned while the others wait at __syncthreads ") +
                block_site);
    }
    int any = 0, all = 1, count = 0;
    for (unsigned t = 0; t < threads; ++t) {
      const bool yes = fibers_[t].vote != 0;
      any |= yes;
      all &= yes;
      count += yes;
    }
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers_[t];
      f.vote_result = f.vote_kind == Vote::any ? any : f.vote_kind == Vote::all ? all : count;
      f.wait = Wait::running;
    }
    return true;
  }

  // A failed launch leaves its threads' frames on their stacks, never returned
  // from; under AddressSanitizer their red zones would stay poisoned for the
  // next launch's frames.
  void clear_stacks() {
#if defined(__SANITIZE_ADDRESS__)
    for (Fiber& f : fibers_) ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
    abandoned_ = false;
  }

  [[noreturn]] void fail_host(const std::string& message) {
    abandoned_ = true;
    throw std::runtime_error("CUDA emulation: " + message);
  }

 public:
  static Emulator& instance() {
    static Emulator e;
    return e;
  }

 private:
  std::vector<Fiber> fibers_;
  std::vector<std::array<std::array<uint64_t, 32>, 2>> exchange_;
  std::vector<std::max_align_t> dynamic_shared_;
  const std::function<void()>* body_ = nullptr;
  Fiber* current_ = nullptr;
  Context scheduler_;
  std::string error_;
  bool abandoned_ = false;  // a launch failed with threads mid-way
};

}  // namespace emu

// ---- Built-in variables, barriers, shuffles, atomics and intrinsics ------------

#define EMU_STRINGIFY_(x) #x
#define EMU_STRINGIFY(x) EMU_STRINGIFY_(x)
#define EMU_SITE __FILE__ ":" EMU_STRINGIFY(__LINE__)

#define threadIdx (::emu::thread_index)
#define blockIdx (::emu::block_index)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

#define __syncthreads() ((void)::emu::Emulator::instance().block_barrier(EMU_SITE, ::emu::Vote::count, 0))
#define __syncthreads_or(p) ::emu::Emulator::instance().block_barrier(EMU_SITE, ::emu::Vote::any, (p) ? 1 : 0)
#define __syncthreads_and(p) ::emu::Emulator::instance().block_barrier(EMU_SITE, ::emu::Vote::all, (p) ? 1 : 0)
#define __syncthreads_count(p) ::emu::Emulator::instance().block_barrier(EMU_SITE, ::emu::Vote::count, (p) ? 1 : 0)

#define __shfl_xor_sync(mask, value, ...) ::emu::shuffle_xor(EMU_SITE, mask, value, __VA_ARGS__)
#define __shfl_up_sync(mask, value, ...) ::emu::shuffle_up(EMU_SITE, mask, value, __VA_ARGS__)

namespace emu {

template <typename T>
T shuffle(const char* site, unsigned mask, T value, const std::function<unsigned(unsigned)>& source) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move 4 or 8 byte values");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = Emulator::instance().warp_exchange(site, mask, bits, source);
  T result;
  std::memcpy(&result, &bits, sizeof(T));
  return result;
}

// A lane whose source falls outside its width-lane segment reads its own value.
inline unsigned in_segment(unsigned lane, int source, int width) {
  const int first = static_cast<int>(lane) & ~(width - 1);
  return (source >= first && source < first + width) ? static_cast<unsigned>(source) : lane;
}

template <typename T>
T shuffle_xor(const char* site, unsigned mask, T value, int lane_mask, int width = 32) {
  return shuffle(site, mask, value,
                 [=](unsigned lane) { return in_segment(lane, static_cast<int>(lane ^ lane_mask), width); });
}

template <typename T>
T shuffle_up(const char* site, unsigned mask, T value, unsigned delta, int width = 32) {
  return shuffle(site, mask, value,
                 [=](unsigned lane) { return in_segment(lane, static_cast<int>(lane) - static_cast<int>(delta), width); });
}

template <typename T>
struct Identity {
  using type = T;
};

// The atomics the kernels use (others follow the same pattern), for the types
// CUDA has them for. One thread runs at a time, so a plain read-modify-write
// is atomic here.
template <typename T>
constexpr bool kAtomicType = std::is_same<T, int>::value || std::is_same<T, unsigned>::value ||
                             std::is_same<T, unsigned long long>::value || std::is_same<T, float>::value ||
                             std::is_same<T, double>::value;

template <typename T, typename Update>
T atomic_update(T* address, Update update) {
  static_assert(kAtomicType<T>, "CUDA has no atomics for this type");
  const T old = *address;
  *address = update(old);
  return old;
}

}  // namespace emu

template <typename T>
T atomicAdd(T* address, typename emu::Identity<T>::type value) {
  return emu::atomic_update(address, [&](T old) { return old + value; });
}

template <typename T>
T atomicOr(T* address, typename emu::Identity<T>::type value) {
  static_assert(std::is_integral<T>::value, "CUDA has no atomicOr for floating point");
  return emu::atomic_update(address, [&](T old) { return old | value; });
}

// A failed device assert fails the launch, as "device-side assert triggered" does on a GPU.
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(condition)                                                                      \
  do {                                                                                                     \
    if (!(condition)) ::emu::Emulator::instance().fail("device-side assert triggered: " #condition " at " EMU_SITE); \
  } while (0)

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline unsigned __float_as_uint(float x) {
  unsigned bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}
// The explicitly rounded operations exist on the device to keep the compiler
// from contracting them into fused multiply-adds; the emulation is compiled
// with -ffp-contract=off, so plain operations round the same way.
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }

// ---- The runtime API the launchers use (only that) -------------------------------

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidDevice = 101 };

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : error == cudaErrorInvalidValue ? "invalid argument" : "invalid device ordinal";
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  if (attribute != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = emu::config().multiprocessors;
  return cudaSuccess;
}

inline cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(pointer, value, bytes);
  return cudaSuccess;
}

// ---- Launches ----------------------------------------------------------------------
// tests/cuda_emulation/build.py rewrites kernel<<<grid, block, shared, stream>>>(args)
// as emu::launch(emu::LaunchConfig{grid, block, shared, stream}, a call of kernel, args).

namespace emu {

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
  cudaStream_t stream = nullptr;
};

// Runs call(args...) in every thread of the launch; call is a lambda that
// calls the kernel, so the kernel's template arguments are deduced as nvcc
// deduces them. Every thread gets its own copy of the parameters.
template <typename Call, typename... Args>
void launch(const LaunchConfig& config, Call call, Args&&... args) {
  const std::tuple<std::decay_t<Args>...> values(std::forward<Args>(args)...);
  const std::function<void()> body = [&]() {
    std::apply([&](const auto&... v) { call(std::decay_t<decltype(v)>(v)...); }, values);
  };
  Emulator::instance().launch(config.grid, config.block, config.shared_bytes, body);
}

template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(Emulator::instance().dynamic_shared());
}

}  // namespace emu
