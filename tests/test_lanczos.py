"""The tridiagonal eigensolver of csrc/lanczos.h against LAPACK.

The CPU and CUDA FDD kernels both take the top eigenpairs of Lanczos's
tridiagonal T from ``tridiagonal_top_eigenpairs`` (multisection on Sturm
counts until each eigenvalue is isolated, then safeguarded Newton, then
inverse iteration). Here it is built on its own (tests/lanczos_check) and
called through ctypes on families of T that stress each part: clusters
(Wilkinson's matrices), exactly repeated eigenvalues (zero off-diagonals),
graded and far-scaled entries. Bounds, from the header's stopping rules:
each eigenvalue within 1e-10 of its magnitude (plus 1e-13 ||T|| for the
rounding of the recurrences), residuals ||T v - theta v|| within 1e-9 ||T||,
vectors orthonormal within 1e-12.
"""
import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
MAX_DIMS = 3  # lanczos::kMaxDims

_DOUBLES = ctypes.POINTER(ctypes.c_double)


@pytest.fixture(scope="module")
def solver(tmp_path_factory):
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build tests/lanczos_check")
    library = tmp_path_factory.mktemp("lanczos") / "libtridiagonal.so"
    subprocess.run([compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-I", CSRC,
                    os.path.join(HERE, "lanczos_check", "tridiagonal.cpp"), "-o", str(library)], check=True)
    function = ctypes.CDLL(str(library)).tridiagonal_top_eigenpairs
    function.restype = ctypes.c_int
    function.argtypes = [_DOUBLES, _DOUBLES, ctypes.c_int, ctypes.c_int, _DOUBLES, _DOUBLES, _DOUBLES]

    def top_eigenpairs(alpha, beta, k):
        """(theta (pairs,), vectors (pairs, n)) of tridiag(beta, alpha, beta)."""
        n = len(alpha)
        alpha = np.ascontiguousarray(alpha, dtype=np.float64)
        beta = np.ascontiguousarray(np.append(beta, 0.0), dtype=np.float64)  # the kernels' beta has n entries
        theta = np.zeros(MAX_DIMS)
        vectors = np.zeros(MAX_DIMS * n)
        work = np.zeros(4 * n)
        pairs = function(*(array.ctypes.data_as(_DOUBLES) for array in (alpha, beta)), n, k,
                         *(array.ctypes.data_as(_DOUBLES) for array in (theta, vectors, work)))
        return theta[:pairs], vectors[:pairs * n].reshape(pairs, n)

    return top_eigenpairs


def lanczos_tridiagonal(matrix, generator):
    """alpha, beta of Lanczos with full re-orthogonalisation on a symmetric matrix, in float64."""
    n = matrix.shape[0]
    q = generator.standard_normal(n)
    basis = [q / np.linalg.norm(q)]
    alpha, beta = [], []
    for j in range(n):
        w = matrix @ basis[-1]
        alpha.append(basis[-1] @ w)
        for u in basis:
            w -= (u @ w) * u
        if j + 1 < n:
            beta.append(np.linalg.norm(w))
            basis.append(w / beta[-1])
    return np.array(alpha), np.array(beta)


def families():
    generator = np.random.default_rng(0)
    cases = []
    for _ in range(60):
        n = int(generator.integers(1, 130))
        cases.append(("random", generator.random(n) * 10 - 2, generator.standard_normal(n - 1),
                      int(generator.integers(1, 4))))
    for _ in range(30):  # zero off-diagonals: T splits, eigenvalues repeat across the blocks
        n = int(generator.integers(2, 60))
        beta = generator.random(n - 1)
        beta[generator.random(n - 1) < 0.3] = 0.0
        cases.append(("split", np.round(generator.random(n) * 4) / 4, beta, 3))
    for half in (1, 2, 5, 10, 20, 50):  # W+_(2h+1): top pairs equal to ~1e-14 at h = 10
        cases.append(("wilkinson", np.abs(np.arange(2 * half + 1) - half).astype(float), np.ones(2 * half), 3))
    for n in (1, 2, 3, 8):
        cases.append(("repeated", np.full(n, 5.0), np.zeros(n - 1), 3))
    for _ in range(20):
        n = int(generator.integers(2, 40))
        scale = 10.0 ** -np.arange(n, dtype=float)
        cases.append(("graded", scale * generator.random(n), np.sqrt(scale[:-1] * scale[1:]) * generator.random(n - 1), 3))
    for magnitude in (1e-100, 1e100):
        for _ in range(10):
            n = int(generator.integers(1, 40))
            cases.append(("scaled", magnitude * generator.random(n), magnitude * generator.random(n - 1), 3))
    for _ in range(20):  # what FDD's Lanczos sees: a low-rank PSD matrix plus noise
        n = int(generator.integers(3, 40))
        x = generator.standard_normal((n, 3)) * [8.0, 4.0, 2.0] @ generator.standard_normal((3, 200))
        x += 1e-2 * generator.standard_normal((n, 200))
        cases.append(("psd", *lanczos_tridiagonal(x @ x.T, generator), 3))
    return cases


CASES = families()


@pytest.mark.parametrize("family", sorted({case[0] for case in CASES}))
def test_top_eigenpairs_match_lapack(solver, family):
    checked = 0
    for name, alpha, beta, k in CASES:
        if name != family:
            continue
        n = len(alpha)
        matrix = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
        spectrum = np.linalg.eigvalsh(matrix)
        norm = np.abs(spectrum).max()
        exact = spectrum[::-1][:min(n, k)]
        theta, vectors = solver(alpha, beta, k)
        assert len(theta) == min(n, k)
        np.testing.assert_array_less(np.abs(theta - exact), 1e-10 * np.abs(exact) + 1e-13 * norm + 1e-300)
        residuals = np.linalg.norm(matrix @ vectors.T - vectors.T * theta, axis=0)
        np.testing.assert_array_less(residuals, 1e-9 * norm + 1e-300)
        np.testing.assert_allclose(vectors @ vectors.T, np.eye(len(theta)), rtol=0, atol=1e-12)
        checked += 1
    assert checked > 0


def test_an_eigenvalue_of_multiplicity_three_gets_three_orthonormal_vectors(solver):
    """With every pair started from the same vector, 5 I gave all three the same one."""
    theta, vectors = solver(np.full(6, 5.0), np.zeros(5), 3)
    np.testing.assert_array_equal(theta, [5.0, 5.0, 5.0])
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(3), rtol=0, atol=1e-12)
