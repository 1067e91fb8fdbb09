// The counter-based generator every backend shares (DESIGN.md section 3).
//
// uniform(seed, i) is bit-identical to Triton's tl.randint4x / tl.rand4x:
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(i >> 2), hi32(i >> 2), 0, 0)
//   word    = Philox4x32-10(counter, key)[i & 3]
//   x       = int32(word); x < 0 ? ~x : x
//   value   = float(x) * 4.6566127342e-10f          (a float in [0, 1))
// Usable from host and device code; no state, no curand.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ROBUSTDROP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ROBUSTDROP_HOST_DEVICE inline
#endif

namespace robustdrop {

struct PhiloxWords {
  uint32_t w[4];
};

ROBUSTDROP_HOST_DEVICE uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds on the counter (c0, c1, 0, 0) and the key (k0, k1).
ROBUSTDROP_HOST_DEVICE PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u;
  constexpr uint32_t kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u;
  constexpr uint32_t kWeyl1 = 0xBB67AE85u;
  uint32_t c2 = 0u, c3 = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t old_c0 = c0, old_c2 = c2;
    c0 = mul_hi_u32(kMul1, old_c2) ^ c1 ^ k0;
    c2 = mul_hi_u32(kMul0, old_c0) ^ c3 ^ k1;
    c1 = kMul1 * old_c2;
    c3 = kMul0 * old_c0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The four words of the Philox block that holds element indices 4*group .. 4*group+3.
ROBUSTDROP_HOST_DEVICE PhiloxWords philox_group(uint64_t seed, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Maps a word to [0, 1) exactly as Triton's uint_to_uniform_float does for 32-bit words.
ROBUSTDROP_HOST_DEVICE float word_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// x = int32(word), folded to x >= 0 by x < 0 ? ~x : x; in [0, 2**31).
ROBUSTDROP_HOST_DEVICE uint32_t fold_word(uint32_t word) { return word < 0x80000000u ? word : ~word; }

// The Bernoulli event uniform < threshold depends on the word only through
// fold_word(word), monotonically, so it equals fold_word(word) < T for one
// integer T: the smallest folded value whose uniform is >= threshold (2**31
// when there is none). Computing T once on the host turns every draw into an
// integer compare with exactly the same outcome. A NaN threshold draws no
// seeds (uniform < NaN is false), so its T is 0.
inline uint32_t folded_threshold(float threshold) {
  if (threshold != threshold) return 0u;
  uint32_t lo = 0u, hi = 0x80000000u;  // the answer lies in [lo, hi]
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (static_cast<float>(mid) * 4.6566127342e-10f >= threshold) hi = mid; else lo = mid + 1;
  }
  return lo;
}

ROBUSTDROP_HOST_DEVICE uint32_t philox_word(uint64_t seed, uint64_t index) {
  return philox_group(seed, index >> 2).w[index & 3];
}

ROBUSTDROP_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t index) {
  return word_to_uniform(philox_word(seed, index));
}

}  // namespace robustdrop
