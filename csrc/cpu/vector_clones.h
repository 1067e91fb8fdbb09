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

// Eight float32 lanes as a GCC/Clang vector type. A clone lowers each
// operation to its own target (one AVX2 register, or two SSE2 ones), so the
// code is written once. ROBUSTDROP_HAS_FLOAT8 says whether it is there; code
// that uses it keeps a scalar path for compilers without vector extensions.
#if defined(__GNUC__)
#define ROBUSTDROP_HAS_FLOAT8 1
#if !defined(__clang__)
// A Float8 never crosses a call (its helpers are always inlined, and each clone passes none), so
// GCC's note that 32-byte vectors are passed differently without AVX (-Wpsabi, in the baseline
// clone) names a calling convention that no code here uses.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float Float8 __attribute__((vector_size(32)));
typedef uint32_t Lanes8 __attribute__((vector_size(32)));
typedef int32_t Index8 __attribute__((vector_size(32)));

ROBUSTDROP_CLONE_INLINE Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

ROBUSTDROP_CLONE_INLINE void store8(float* p, const Float8& v) { std::memcpy(p, &v, sizeof(v)); }

// Lanes i0..i7 of the 16 lanes of (a, b).
#if defined(__clang__)
#define ROBUSTDROP_SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define ROBUSTDROP_SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shuffle(a, b, Index8{i0, i1, i2, i3, i4, i5, i6, i7})
#endif

// Transposes the 8 x 8 block held in rows[0..8) in place: rows[j][i] becomes
// rows[i][j]. Three rounds of two-input shuffles (unpack, 64-bit pairs,
// 128-bit halves), the usual AVX way, instead of 64 strided scalar moves.
ROBUSTDROP_CLONE_INLINE void transpose8x8(Float8 rows[8]) {
  Float8 pairs[8], quads[8];
  for (int i = 0; i < 8; i += 2) {
    pairs[i] = ROBUSTDROP_SHUFFLE8(rows[i], rows[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    pairs[i + 1] = ROBUSTDROP_SHUFFLE8(rows[i], rows[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    quads[i] = ROBUSTDROP_SHUFFLE8(pairs[i], pairs[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    quads[i + 1] = ROBUSTDROP_SHUFFLE8(pairs[i], pairs[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    quads[i + 2] = ROBUSTDROP_SHUFFLE8(pairs[i + 1], pairs[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    quads[i + 3] = ROBUSTDROP_SHUFFLE8(pairs[i + 1], pairs[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int j = 0; j < 4; ++j) {
    rows[j] = ROBUSTDROP_SHUFFLE8(quads[j], quads[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    rows[j + 4] = ROBUSTDROP_SHUFFLE8(quads[j], quads[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
#endif
