// ROBUSTDROP_VECTOR_CLONES marks a hot loop to be built for AVX2 and for the
// baseline x86-64; the loader picks one per machine (GCC's target_clones), so
// the extension runs everywhere and still uses 256-bit vectors where it can.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ROBUSTDROP_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ROBUSTDROP_VECTOR_CLONES
#endif
