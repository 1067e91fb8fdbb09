// CPU implementations of the RNG ops, used to test csrc/philox.h against the
// known answers and against the other backends.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../philox.h"

namespace robustdrop {
namespace {

template <typename OutT, typename Fn>
at::Tensor map_indices(const at::Tensor& index, at::ScalarType out_type, Fn fn) {
  check_philox_args(index);
  const at::Tensor idx = index.contiguous();
  at::Tensor out = at::empty(idx.sizes(), idx.options().dtype(out_type));
  const int64_t* in_ptr = idx.data_ptr<int64_t>();
  OutT* out_ptr = out.data_ptr<OutT>();
  at::parallel_for(0, idx.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) out_ptr[k] = fn(static_cast<uint64_t>(in_ptr[k]));
  });
  return out;
}

at::Tensor philox_uniform_cpu(const at::Tensor& index, int64_t seed) {
  const uint64_t key = static_cast<uint64_t>(seed);
  return map_indices<float>(index, at::kFloat, [key](uint64_t i) { return philox_uniform(key, i); });
}

at::Tensor philox_words_cpu(const at::Tensor& index, int64_t seed) {
  const uint64_t key = static_cast<uint64_t>(seed);
  return map_indices<int64_t>(index, at::kLong,
                              [key](uint64_t i) { return static_cast<int64_t>(philox_word(key, i)); });
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, CPU, m) {
  m.impl("philox_uniform", &philox_uniform_cpu);
  m.impl("philox_words", &philox_words_cpu);
}

}  // namespace robustdrop
