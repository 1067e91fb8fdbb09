// Philox for CPU kernels: 16 consecutive blocks at once, with AVX2 where the
// processor has it (8 blocks per register) and the scalar philox.h otherwise.
// Same words, bit for bit, as philox4x32_10.
#pragma once

#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../philox.h"

namespace robustdrop {

constexpr int kPhiloxLanes = 16;

// words[4*k + j] = word j of the Philox block of group first_group + k, for k < kPhiloxLanes.
inline void philox_lanes_scalar(uint64_t seed, uint64_t first_group, uint32_t* words) {
  for (int l = 0; l < kPhiloxLanes; ++l) {
    const PhiloxWords block = philox_group(seed, first_group + static_cast<uint64_t>(l));
    for (int j = 0; j < 4; ++j) words[4 * l + j] = block.w[j];
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ROBUSTDROP_PHILOX_AVX2 1

// (hi32, lo32) of each 32-bit lane of a times the constant in every 64-bit
// lane of factor: AVX2 multiplies only the even 32-bit lanes, so the odd ones
// are shifted down, multiplied, and the halves blended back in place.
__attribute__((target("avx2"))) inline void mul_hi_lo_avx2(__m256i a, __m256i factor, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, factor);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), factor);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// philox_lanes_scalar with 8 blocks per AVX2 register (one 32-bit lane each).
__attribute__((target("avx2"))) inline void philox_lanes_avx2(uint64_t seed, uint64_t first_group, uint32_t* words) {
  const __m256i mul0 = _mm256_set1_epi64x(0xD2511F53u), mul1 = _mm256_set1_epi64x(0xCD9E8D57u);
  for (int half = 0; half < kPhiloxLanes / 8; ++half) {
    alignas(32) uint32_t lo_init[8], hi_init[8];
    for (int l = 0; l < 8; ++l) {
      const uint64_t group = first_group + static_cast<uint64_t>(8 * half + l);
      lo_init[l] = static_cast<uint32_t>(group);
      hi_init[l] = static_cast<uint32_t>(group >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo_init));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_init));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mul_hi_lo_avx2(c0, mul0, hi0, lo0);
      mul_hi_lo_avx2(c2, mul1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    alignas(32) uint32_t out[4][8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[0]), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[1]), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[2]), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[3]), c3);
    for (int l = 0; l < 8; ++l) {
      for (int j = 0; j < 4; ++j) words[4 * (8 * half + l) + j] = out[j][l];
    }
  }
}
#endif

inline void philox_lanes(uint64_t seed, uint64_t first_group, uint32_t* words) {
#ifdef ROBUSTDROP_PHILOX_AVX2
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) return philox_lanes_avx2(seed, first_group, words);
#endif
  philox_lanes_scalar(seed, first_group, words);
}

// Calls visit(k, word) with the Philox word of element index first + k, for
// every k < count, drawing kPhiloxLanes blocks at a time.
template <typename Visit>
inline void for_each_philox_word(uint64_t seed, uint64_t first, int64_t count, Visit&& visit) {
  uint32_t words[4 * kPhiloxLanes];
  const uint64_t end = first + static_cast<uint64_t>(count);
  uint64_t group = first >> 2;
  while ((group << 2) < end) {
    philox_lanes(seed, group, words);
    const uint64_t block_first = group << 2;
    const uint64_t lo = block_first < first ? first : block_first;
    const uint64_t block_end = block_first + 4 * kPhiloxLanes;
    const uint64_t hi = block_end < end ? block_end : end;
    for (uint64_t index = lo; index < hi; ++index) visit(index - first, words[index - block_first]);
    group += kPhiloxLanes;
  }
}

// out[k] = 1 if uniform(seed, first + k) < threshold else 0, for k < count,
// with folded_cut = folded_threshold(threshold).
inline void bernoulli_bytes(uint64_t seed, uint64_t first, int64_t count, uint32_t folded_cut, uint8_t* out) {
  for_each_philox_word(seed, first, count, [&](uint64_t k, uint32_t word) { out[k] = fold_word(word) < folded_cut; });
}

// out[k] = uniform(seed, first + k), for k < count.
inline void uniform_floats(uint64_t seed, uint64_t first, int64_t count, float* out) {
  for_each_philox_word(seed, first, count, [&](uint64_t k, uint32_t word) { out[k] = word_to_uniform(word); });
}

}  // namespace robustdrop
