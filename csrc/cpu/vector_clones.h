// ROBUSTDROP_VECTOR_CLONES marks a hot loop to be built for AVX2 and for the
// baseline x86-64; the loader picks one per machine (GCC's target_clones), so
// the extension runs everywhere and still uses 256-bit vectors where it can.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ROBUSTDROP_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ROBUSTDROP_VECTOR_CLONES
#endif

// A helper of a ROBUSTDROP_VECTOR_CLONES function: inlined into each clone,
// so it is built for that clone's target instead of behind a call per use.
#if defined(__GNUC__)
#define ROBUSTDROP_CLONE_INLINE inline __attribute__((always_inline))
#else
#define ROBUSTDROP_CLONE_INLINE inline
#endif

// value when keep is 1, +0.0 when it is 0, as a bit mask: GCC turns the
// plain `keep ? value : 0.0f` into a branch per element instead of vectors.
inline float select_kept(uint8_t keep, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits &= 0u - static_cast<uint32_t>(keep);
  std::memcpy(&value, &bits, sizeof(bits));
  return value;
}
