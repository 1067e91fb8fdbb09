// A C entry point to the tridiagonal eigensolver of csrc/lanczos.h (shared by
// the CPU and CUDA kernels), so that tests/test_lanczos.py can call it through
// ctypes and compare it with LAPACK.
#include "lanczos.h"

extern "C" int tridiagonal_top_eigenpairs(const double* alpha, const double* beta, int n, int k, double* theta,
                                          double* vectors, double* work) {
  return robustdrop::lanczos::tridiagonal_top_eigenpairs(alpha, beta, n, k, theta, vectors, work);
}
