// Every schema of the robustdrop operator library, defined once.
// CPU kernels register in csrc/cpu, CUDA kernels in csrc/cuda and the autograd
// of both in csrc/autograd; the Python package adds fake (meta) implementations.
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
  // sample_gamma, when given, is a float32 (N,) seed probability per sample that
  // replaces gamma. The N samples form normalize_groups consecutive groups, each
  // normalised by its own kept count. Returns y, the bit-packed keep mask
  // (N, 1 or C, H, ceil(W/8)) uint8 and the float32 scale: 0-d for one group,
  // else (normalize_groups,). normalize_groups is a SymInt, as it is N for per-sample
  // normalisation: under torch.compile and torch.export the batch stays symbolic.
  m.def(
      "block_mask_forward(Tensor x, SymInt seed, float gamma, int block_size, bool couple_channels, "
      "bool normalize, float eps, Tensor? sample_gamma=None, SymInt normalize_groups=1) "
      "-> (Tensor, Tensor, Tensor)");
  // dx = keep ? dy * scale[group of n] : 0, with the mask and scale of the forward.
  m.def("block_mask_backward(Tensor grad_y, Tensor mask, Tensor scale) -> Tensor");
  // CamDrop forward (DESIGN.md 4.2): DropBlock whose seeds count only at the
  // spatial_topk largest CAM positions and the channel_topk largest class
  // weights of each sample. weight (K, g*C), target (N,) int64; guided, when
  // given, is a 0-d bool tensor on x's device: False makes every position and
  // channel a candidate (DropBlock, for warm-up). sample_gamma, when given, is a
  // float32 (N,) seed probability per sample that replaces gamma, as in
  // block_mask_forward. Returns y, the bit-packed keep mask (N, C, H, ceil(W/8))
  // uint8 and the float32 0-d scale; the backward is block_mask_backward. The top-k
  // counts are SymInts: their defaults follow H*W and C, which may be symbolic.
  m.def(
      "cam_mask_forward(Tensor x, Tensor weight, Tensor target, Tensor? guided, SymInt seed, float gamma, "
      "int block_size, SymInt spatial_topk, SymInt channel_topk, bool normalize, float eps, "
      "Tensor? sample_gamma=None) "
      "-> (Tensor, Tensor, Tensor)");
  // Feature density (DESIGN.md 4.3) of x (N, C, H, W) with dims in {1, 2, 3}, or of
  // x (N, F) with dims 1: per sample, the PCA coordinates of the channels binned on a
  // grids**dims grid. Returns cell (N, C) int64 and counts (N, grids**dims) int64.
  m.def("feature_density(Tensor x, int dims, int grids) -> (Tensor, Tensor)");
  // Feature-density dropout forward: channel c of sample n is dropped iff
  // uniform(seed, n*C + c) < p[cell], p = clamp(kappa * count / max(count) + alpha, 0, 1).
  // Returns y, the bit-packed channel keep mask (N, ceil(C/8)) uint8 and the scale:
  // a 0-d float32 1 without rescale, else (N, C) float32 1/(1 - p) (0 where dropped).
  m.def(
      "feature_density_forward(Tensor x, int dims, int grids, SymInt seed, float kappa, float alpha, "
      "bool rescale) -> (Tensor, Tensor, Tensor)");
  // dx[n, c, ...] = keep(n, c) ? dy[n, c, ...] * scale : 0 for dy (N, C, H, W) or (N, C),
  // mask (N, ceil(C/8)) uint8 and scale 0-d or (N, C) float32.
  m.def("channel_mask_backward(Tensor grad_y, Tensor mask, Tensor scale) -> Tensor");
  // Random Mask apply (DESIGN.md 4.4): y[n, c, h, w] = keep[c, h, w] ? x[n, c, h, w] : 0
  // for x (N, C, H, W) and one bit-packed keep mask (C, H, ceil(W/8)) uint8 shared by
  // every sample. Linear and self-adjoint: the backward is the same op on dy.
  m.def("fixed_mask_apply(Tensor x, Tensor mask) -> Tensor");
  // The same, written into x.
  m.def("fixed_mask_apply_(Tensor(a!) x, Tensor mask) -> ()");
  // kl_distill (EWS): per row of student and teacher logits (N, K), with p = softmax(t / T),
  // KL_row = sum_k p_k (log p_k - log_softmax(s / T)_k) and the row gradient for the
  // backward, d KL_row / d s = (softmax(s / T) - p) / T. Returns (loss, grad (N, K)), both
  // float32 (float64 for float64 logits): the rows reduced by `reduction` (F.kl_div's
  // "batchmean", "sum", "mean", or "none" for the rows (N,); csrc/kl_distill.h) and the
  // row gradient, which the backward scales by d loss / d KL_row.
  m.def("kl_distill_forward(Tensor student_logits, Tensor teacher_logits, float temperature, str reduction) "
        "-> (Tensor, Tensor)");
  // The loss of kl_distill_forward alone, what robustdrop.ews.kl_distill calls: the row
  // gradient stays inside its autograd node, which can then scale it in place. Its kernel,
  // one for every device, and its autograd are in csrc/autograd/kl_distill_autograd.cpp.
  m.def("kl_distill(Tensor student_logits, Tensor teacher_logits, float temperature, str reduction) -> Tensor");
}
