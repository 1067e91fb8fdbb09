// Every schema of the robustdrop operator library, defined once.
// CPU kernels register in csrc/cpu, CUDA kernels in csrc/cuda; the Python
// package adds fake (meta) implementations and autograd formulas.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing robustdrop._C runs the static TORCH_LIBRARY registrations below
// and in the kernel files; the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(robustdrop, m) {
  // uniform(seed, index) of DESIGN.md section 3 at every element of an int64 tensor.
  m.def("philox_uniform(Tensor index, int seed) -> Tensor");
  // The raw Philox word behind each uniform, as int64 values in [0, 2**32).
  m.def("philox_words(Tensor index, int seed) -> Tensor");
  // DropBlock forward (DESIGN.md 4.1). block_size is already min(block_size, H, W).
  // Returns y, the bit-packed keep mask (N, 1 or C, H, ceil(W/8)) uint8 and the
  // float32 0-d scale.
  m.def(
      "block_mask_forward(Tensor x, SymInt seed, float gamma, int block_size, bool couple_channels, "
      "bool normalize, float eps) -> (Tensor, Tensor, Tensor)");
  // dx = keep ? dy * scale : 0, with the mask and scale of the forward.
  m.def("block_mask_backward(Tensor grad_y, Tensor mask, Tensor scale) -> Tensor");
  // CamDrop forward (DESIGN.md 4.2): DropBlock whose seeds count only at the
  // spatial_topk largest CAM positions and the channel_topk largest class
  // weights of each sample. weight (K, g*C), target (N,) int64; guided, when
  // given, is a 0-d bool tensor on x's device: False makes every position and
  // channel a candidate (DropBlock, for warm-up). Returns y, the bit-packed keep
  // mask (N, C, H, ceil(W/8)) uint8 and the float32 0-d scale; the backward is
  // block_mask_backward.
  m.def(
      "cam_mask_forward(Tensor x, Tensor weight, Tensor target, Tensor? guided, SymInt seed, float gamma, "
      "int block_size, int spatial_topk, int channel_topk, bool normalize, float eps) -> (Tensor, Tensor, Tensor)");
}
