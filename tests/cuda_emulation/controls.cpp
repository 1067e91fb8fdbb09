// The emulator's controls, for the tests: how blocks and threads are ordered,
// how many multiprocessors the emulated device has, and what has run.
#include <torch/library.h>

#include <vector>

#include "emulator.h"

#if defined(__x86_64__)
// robustdrop_emu_switch(save, load): pushes the callee-saved registers, stores
// the stack pointer to *save, loads `load` and pops the registers saved there
// (System V x86-64 ABI; the floating-point control words are never changed by
// the kernels, so they are not saved).
asm(R"(
  .text
  .globl robustdrop_emu_switch
  .hidden robustdrop_emu_switch
  .type robustdrop_emu_switch, @function
robustdrop_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size robustdrop_emu_switch, .-robustdrop_emu_switch
)");
#endif

namespace {

void configure(int64_t thread_order, int64_t block_order, int64_t shuffle_seed, int64_t multiprocessors) {
  TORCH_CHECK(thread_order >= 0 && thread_order <= 2, "thread_order must be 0 (forward), 1 (reverse) or 2 (shuffled)");
  TORCH_CHECK(block_order >= 0 && block_order <= 2, "block_order must be 0 (forward), 1 (reverse) or 2 (shuffled)");
  TORCH_CHECK(multiprocessors >= 1, "multiprocessors must be at least 1");
  emu::Config& c = emu::config();
  c.thread_order = static_cast<emu::Order>(thread_order);
  c.block_order = static_cast<emu::Order>(block_order);
  c.shuffle_seed = static_cast<uint64_t>(shuffle_seed);
  c.multiprocessors = static_cast<int>(multiprocessors);
}

// launches, barriers and shuffles run since the library was loaded.
std::vector<int64_t> counters() {
  const emu::Counters& c = emu::counters();
  return {c.launches, c.barriers, c.shuffles};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(robustdrop_emulated, m) {
  m.def("emulator_configure(int thread_order, int block_order, int shuffle_seed, int multiprocessors) -> ()",
        &configure);
  m.def("emulator_counters() -> int[]", &counters);
}
