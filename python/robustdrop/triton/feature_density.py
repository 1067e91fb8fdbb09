"""Feature-density dropout (FDD, DESIGN.md 4.3) in Triton, batched over samples.

Shapes: x (N, C, H, W) with D = H*W and dims in {1, 2, 3}, or x (N, F) with
dims = 1 (F plays C, D = 1); m = min(C, D); G = grids**dims; L = 4 axis lanes
(dims <= 3, padded to a power of two). Per sample n, in float32 unless noted:

    X      = s_n * float32(x[n]) viewed (C, D), s_n = 2**k bringing max |x[n]| into [1, 2)
             (k in [-126, 126]; 1 if that max is 0 or not finite): exact, cells unchanged
             by it, and no product below overflows or underflows whatever |x|
    mu     = mean of X over channels;  Xc = X - mu
    A      = Xc (C < D, "Gram side", m = C) or Xc^T (C >= D, "covariance side", m = D)
    M      = A A^T                                   (m, m), float32 without TF32
    regular iff trace(M) is finite and trace(M) > 1e-10 * sum X**2 (float64); otherwise
             every channel is in cell 0 (NaN/Inf, equal channels, C = 1, zeros, D = 0)
    theta_r, y_r  (r < R <= dims): the top eigenpairs of M by Lanczos with full
             re-orthogonalisation; the eigenpairs of its tridiagonal T_j come from
             multisection on Sturm counts and inverse iteration, in float64
    axis r is present iff r < R and theta_r > 1e-5 * theta_0; otherwise f[:, r] = 0
    P      = Y A                                     (L, K): w_r = Xc^T y_r (Gram, K = D)
                                                             or Xc v_r (covariance, K = C)
    o_r    = -1 iff the component of largest |.| (lowest index on ties) of v_r is < 0,
             with v_r = w_r / ||w_r|| (Gram) or y_r (covariance)
    f[c,r] = o_r * float32(sqrt(theta_r)) * y_r[c] (Gram) or o_r * P[r, c] (covariance);
             2-D x: f[c, 0] = float32(x[n, c]), all 0 if any value of x[n] is not finite
    b_r    = clamp(floor((f - lo_r) / ((hi_r - lo_r) / grids)), 0, grids - 1); 0 if hi_r == lo_r,
             f, lo_r and hi_r scaled by the power of two that brings max(|lo_r|, |hi_r|) into [1, 2)
    cell   = sum_r b_r * grids**r (int64);  counts = histogram of cell over G cells
    p32    = float32(min(max(kappa * count / max(counts) + alpha, 0), 1)), float64 steps
    keep   = uniform(seed, n*C + c) >= p32[cell]     (float32 compare, DESIGN.md section 3)
    scale  = 1 (0-d), or with rescale keep ? float32(1 / (1 - float64(p32))) : 0 (N, C)
    y      = keep ? x * scale : 0                    (float32 maths; float64 for float64 x)

Launches, none of which waits for the host (4-D x; 2-D x skips 1-4), besides
torch's fill of the (N, G) counts with zeros (and of the 0-d scale with 1.0
when rescale is False):

0. ``_scale_kernel``, grid (N,): s_n from max |x[n]|.
1. ``_mean_kernel``, grid (N * D tiles,): mu and the per-column energy sum_c X**2.
2. ``_gram_kernel``, grid (N * T*T,): the upper tiles of M = A A^T by ``tl.dot``
   (input_precision "ieee"), centring on the fly and mirroring each off-diagonal
   tile, so M is exactly symmetric.
3. ``_lanczos_kernel``, grid (N,): one program per sample. Vectors of length
   BLOCK_M = next_pow2(m) live in registers; M streams from its (N, m, m)
   scratch in row tiles and the basis sits in an (N, m, m) scratch. The tridiagonal
   solve (Sturm counts over a (L, SHIFTS) block of shifts, pivoting inverse
   iteration over L lanes) works in small float64 scratches. Writes the unit Ritz
   vectors Y (N, L, m) and theta (N, L) float64, both 0 on absent axes.
4. ``_project_kernel``, grid (N * K tiles,): P = Y A.
5. ``_bins_kernel``, grid (N,): orientation, coordinates, bins, cell, and counts
   by atomics into a zeroed (N, G) tensor.
6. ``_drop_kernel``, grid (N,) (forward only): p32, the Bernoulli draws, the
   packed mask (N, ceil(C/8)) and the per-channel scale.
7. ``_apply_kernel``, grid (row tiles, column tiles): y = keep ? x * s : 0; the
   backward pass is the same kernel on grad_y.

So feature_density is 7 launches (2-D x: 2), the forward 9 or 10 (2-D x: 4 or
5) and the backward 1. Scratch: M and the Lanczos basis, 2 * N * m * m float32.

Passes over x (forward, 4-D): launches 0, 1, 2, 4 and 7 read x, 7 writes y, so five
reads and one write when M is one Gram tile (m <= 64); with T = ceil(m / 64)
tiles per side launch 2 reads x T times (each panel once per tile of its tile
row and column). The axes depend on every channel and position of a sample,
and the drop on every channel's cell, so none of these reads can be fused into
the apply; the scale must be known before the channel sums of launch 1 (a plain
float32 sum of |x| ~ 1e37 overflows), so launch 0 cannot join it. 2-D x: the bins
kernel and the apply read x, the apply writes y.
"""

import struct

import torch
import triton
import triton.language as tl

from . import block_mask
from .philox import launch, register_op, sample_and_tile, uniform

# Axis lanes: dims <= 3, padded to a power of two (kernels and host alike).
_LANES = tl.constexpr(4)
_MAX_CELLS = 1 << 16
# The contract's tolerances (csrc/lanczos.h has the same). A module constant multiplies from the
# right (x * _TOLERANCE): in Triton 3.8's interpreter, constant * tensor gives a value that a
# comparison or tl.maximum then refuses ("cannot convert ... to tensor").
_DEGENERATE_TOLERANCE = tl.constexpr(1e-10)
_ABSENT_AXIS_TOLERANCE = tl.constexpr(1e-5)
_RESIDUAL_TOLERANCE = tl.constexpr(1e-6)
_EXHAUSTED_TOLERANCE = tl.constexpr(1e-6)
_CHECK_EVERY = tl.constexpr(4)
_INVERSE_ITERATIONS = tl.constexpr(2)
_DBL_EPSILON = tl.constexpr(2.220446049250313e-16)
_DBL_MIN = tl.constexpr(2.2250738585072014e-308)
_DBL_MAX = tl.constexpr(1.7976931348623157e308)
# Multisection: SHIFTS evenly spaced shifts per round cut the interval into
# SHIFTS parts (log2(SHIFTS) = 7 halvings); ROUNDS rounds make >= 100 halvings.
# Few wide rounds suit both the GPU (the Sturm recurrence is a serial chain)
# and the interpreter (one numpy op per step, whatever its width).
_SHIFTS = 128
_ROUNDS = 15
# Tiles: at most this many elements per block of registers.
_TILE = 4096
_GRAM_BLOCK = 64
_GRAM_BLOCK_K = 32
_GRAM_WARPS = 8
_APPLY_BLOCK = 2048
_APPLY_WARPS = 8


# --------------------------------------------------------------------------
# Kernels: centring and the small matrix
# --------------------------------------------------------------------------


@triton.jit
def _magnitude_scale(largest):
    """2**k (float32) bringing largest (>= 0) into [1, 2), k clamped to [-126, 126]; 1 when
    largest is 0 or not finite: csrc/lanczos.h's magnitude_scale, from the exponent bits."""
    exponent = (largest.to(tl.int32, bitcast=True) >> 23) & 0xFF
    k = tl.minimum(tl.maximum(127 - exponent, -126), 126)
    scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where((largest > 0.0) & (largest < float("inf")), scale, 1.0)


@triton.jit
def _offsets(rows, cols, stride_row, stride_col):
    """(len(rows), len(cols)) int64 element offsets within a sample, which may hold more than 2**31 elements."""
    return rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, C, D, stride_n, stride_c, stride_p,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """scale[n] = _magnitude_scale(max over the sample of |float32(x)|), NaN passed over.

    x: as _mean_kernel; scale_ptr: (N,) float32.
    """
    n = tl.program_id(0).to(tl.int64)
    sample = x_ptr + n * stride_n
    largest = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            ok = (c < C)[:, None] & (d < D)[None, :]
            v = tl.abs(tl.load(sample + _offsets(c, d, stride_c, stride_p), mask=ok, other=0.0).to(tl.float32))
            largest = tl.maximum(largest, tl.where(v == v, v, 0.0))
    tl.store(scale_ptr + n, _magnitude_scale(tl.max(tl.max(largest, axis=1), axis=0)))


@triton.jit
def _mean_kernel(x_ptr, scale_ptr, mu_ptr, energy_ptr, C, D, tiles, stride_n, stride_c, stride_p,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """mu[n, d] = float32 mean over c of X[c, d]; energy[n, d] = sum_c X[c, d]**2 in float64.

    x: sample n at x_ptr + n*stride_n, X[c, d] = scale[n] * x at c*stride_c + d*stride_p.
    mu_ptr: (N, D) float32; energy_ptr: (N, D) float64 (the Lanczos kernel adds
    the columns, so no atomics are needed).
    """
    n, tile = sample_and_tile(tiles)
    d = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    sample = x_ptr + n * stride_n
    scale = tl.load(scale_ptr + n)
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    energy = tl.zeros((BLOCK_D,), dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = (c < C)[:, None] & d_ok[None, :]
        v = tl.load(sample + _offsets(c, d, stride_c, stride_p), mask=ok, other=0.0).to(tl.float32)
        v = v * scale
        total += tl.sum(v, axis=0)
        wide = v.to(tl.float64)
        energy += tl.sum(wide * wide, axis=0)
    tl.store(mu_ptr + n * D + d, tl.div_rn(total, tl.zeros_like(total) + C), mask=d_ok)
    tl.store(energy_ptr + n * D + d, energy, mask=d_ok)


@triton.jit
def _centred_tile(sample, scale, mu, rows, k, m, K, stride_i, stride_k, MU_ON_ROWS: tl.constexpr):
    """A[rows, k] as a float32 tile, 0 outside (m, K).

    A is Xc (rows are channels, mu indexed by k) or Xc^T (rows are positions,
    MU_ON_ROWS); sample, scale and mu are sample n's x, s_n and mu.
    """
    ok = (rows < m)[:, None] & (k < K)[None, :]
    v = tl.load(sample + _offsets(rows, k, stride_i, stride_k), mask=ok, other=0.0).to(tl.float32)
    v = v * scale
    if MU_ON_ROWS:
        centre = tl.load(mu + rows, mask=rows < m, other=0.0)[:, None]
    else:
        centre = tl.load(mu + k, mask=k < K, other=0.0)[None, :]
    return tl.where(ok, v - centre, 0.0)


@triton.jit
def _gram_kernel(x_ptr, scale_ptr, mu_ptr, mat_ptr, m, K, D, tiles, stride_n, stride_i, stride_k,
                 MU_ON_ROWS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """One BLOCK x BLOCK tile (ti, tj), ti <= tj, of M = A A^T for sample n.

    mat_ptr: (N, m, m) float32. Tiles below the diagonal do nothing: their
    upper twin stores its transpose too. A diagonal tile is symmetrised so
    that M is exactly symmetric (the Lanczos matvec reads it by columns).
    """
    n, tile = sample_and_tile(tiles * tiles)
    ti = tile // tiles
    tj = tile % tiles
    upper = ti <= tj
    i = ti * BLOCK + tl.arange(0, BLOCK)
    j = tj * BLOCK + tl.arange(0, BLOCK)
    sample = x_ptr + n * stride_n
    scale = tl.load(scale_ptr + n)
    mu = mu_ptr + n * D
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, tl.where(upper, K, 0), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = _centred_tile(sample, scale, mu, i, k, m, K, stride_i, stride_k, MU_ON_ROWS)
        if ti == tj:  # a diagonal tile reads its panel once
            b = a
        else:
            b = _centred_tile(sample, scale, mu, j, k, m, K, stride_i, stride_k, MU_ON_ROWS)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    # On a diagonal tile i and j are the same indices: keep the upper triangle.
    acc = tl.where(ti < tj, acc, tl.where(i[:, None] <= j[None, :], acc, tl.trans(acc)))
    mat = mat_ptr + n * m * m
    # Scalar conditions enter masks through the bounds: the interpreter's
    # vector & scalar gives integers, which a mask rejects.
    rows = tl.where(upper, m, 0)
    tl.store(mat + i[:, None] * m + j[None, :], acc, mask=(i < rows)[:, None] & (j < rows)[None, :])
    rows = tl.where(ti < tj, m, 0)
    tl.store(mat + j[None, :] * m + i[:, None], acc, mask=(i < rows)[:, None] & (j < rows)[None, :])


# --------------------------------------------------------------------------
# Kernels: Lanczos and the tridiagonal eigenpairs (one program per sample)
# --------------------------------------------------------------------------


@triton.jit
def _start_component(i):
    """float32(uint32((i + 1) * 0x9E3779B1)) / 2**32 - 0.5 (lanczos::start_component), any int shape."""
    hashed = ((i.to(tl.int64) + 1) * 0x9E3779B1) & 0xFFFFFFFF
    return hashed.to(tl.float32) * 2.3283064365386963e-10 - 0.5  # 2**-32, exact


@triton.jit
def _start_vector(idx, inside):
    """q_1 = s / ||s||, s[i] = _start_component(i)."""
    s = tl.where(inside, _start_component(idx), 0.0)
    return tl.div_rn(s, tl.zeros_like(s) + tl.sqrt_rn(tl.sum(s * s)))


@triton.jit
def _matvec(mat, q_row, m, idx, inside, ROWS: tl.constexpr):
    """M q for symmetric M (m, m): sum over row tiles of M[rows, :] * q[rows].

    Reading q by tiles from the stored basis row q_row avoids scattering
    register tiles; M's symmetry turns the row tiles into columns of M q.
    """
    w = tl.zeros(idx.shape, dtype=tl.float32)
    for r0 in range(0, m, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rows_ok = rows < m
        tile = tl.load(mat + rows[:, None] * m + idx[None, :], mask=rows_ok[:, None] & inside[None, :], other=0.0)
        q = tl.load(q_row + rows, mask=rows_ok, other=0.0)
        w += tl.sum(tile * q[:, None], axis=0)
    return w


@triton.jit
def _reorthogonalise(w, basis, j, m, idx, inside, ROWS: tl.constexpr):
    """w - Q_j (Q_j^T w), classical Gram-Schmidt against the j stored basis vectors.

    Every h = Q_j^T w uses the incoming w, so one sweep over Q_j suffices.
    """
    correction = tl.zeros(w.shape, dtype=tl.float32)
    for r0 in range(0, j, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        ok = (rows < j)[:, None] & inside[None, :]
        q = tl.load(basis + rows[:, None] * m + idx[None, :], mask=ok, other=0.0)
        h = tl.sum(q * w[None, :], axis=1)
        correction += tl.sum(q * h[:, None], axis=0)
    return w - correction


@triton.jit
def _sturm_counts(alpha, beta, j, shift, pivot_min):
    """Number of eigenvalues of T_j below each shift (a float64 block of any shape).

    alpha: T's diagonal (j,), beta: its off-diagonal (j - 1,), float64.
    LDL^T pivots q_i = (alpha_i - x) - beta_{i-1}**2 / q_{i-1}; a pivot below
    pivot_min becomes -pivot_min so that none is zero.
    """
    q = tl.zeros(shift.shape, dtype=tl.float64) + 1.0
    count = tl.zeros(shift.shape, dtype=tl.int32)
    for i in range(0, j):
        a = tl.load(alpha + i)
        b = tl.load(beta + i - 1, mask=i > 0, other=0.0)
        q = (a - shift) - b * b / q
        q = tl.where(tl.abs(q) < pivot_min, -pivot_min, q)
        count += (q < 0.0).to(tl.int32)
    return count


@triton.jit
def _bisect(alpha, beta, j, pairs, lower, upper, pivot_min, SHIFTS: tl.constexpr, ROUNDS: tl.constexpr):
    """theta (L,) float64: lane r holds the r-th largest eigenvalue of T_j, r < pairs.

    Multisection inside the Gershgorin interval [lower, upper]: each round
    counts at SHIFTS points of every lane's interval at once and keeps the
    part where the count crosses index j - 1 - r, until the width is at the
    level of float64 rounding or ROUNDS * log2(SHIFTS) halvings are done.
    """
    lanes = tl.arange(0, _LANES)
    index = j - 1 - lanes
    lo = tl.zeros((_LANES,), dtype=tl.float64) + lower
    hi = tl.zeros((_LANES,), dtype=tl.float64) + upper
    fraction = tl.arange(0, SHIFTS).to(tl.float64) / SHIFTS
    rounds = tl.full((), 0, dtype=tl.int32)
    go = pairs > 0
    while go:
        shift = lo[:, None] + (hi - lo)[:, None] * fraction[None, :]
        below = _sturm_counts(alpha, beta, j, shift, pivot_min) <= index[:, None]
        # lo only rises and hi only falls, even for lanes past pairs (index < 0).
        lo = tl.maximum(lo, tl.max(tl.where(below, shift, -float("inf")), axis=1))
        hi = tl.minimum(hi, tl.min(tl.where(below, float("inf"), shift), axis=1))
        rounds += 1
        wide = hi - lo > tl.maximum(tl.abs(lo), tl.abs(hi)) * (2.0 * _DBL_EPSILON) + pivot_min
        go = (rounds < ROUNDS) & (tl.sum((wide & (lanes < pairs)).to(tl.int32)) > 0)
    return 0.5 * (lo + hi)


@triton.jit
def _shifted_solve(alpha, beta, vectors, elim, j, theta, tiny, BLOCK_M: tl.constexpr):
    """vectors[r, :j] <- (T_j - theta_r I)^-1 vectors[r, :j] for the four lanes r.

    Gaussian elimination with partial pivoting (rows i and i + 1 swap when the
    sub-diagonal is larger), a pivot below tiny replaced by tiny: a shift at an
    eigenvalue then blows up that eigenvector's direction, as inverse iteration
    wants. vectors: (L, BLOCK_M) float64; elim: (4, BLOCK_M, L) float64, the
    eliminated rows (diagonal, upper, second upper, right-hand side).
    """
    lanes = tl.arange(0, _LANES)
    field = BLOCK_M * _LANES  # elim holds field f of row i, lane r at (f * BLOCK_M + i) * L + r
    zero = tl.zeros((_LANES,), dtype=tl.float64)
    d = tl.load(alpha) - theta
    u = zero + tl.load(beta, mask=j > 1, other=0.0)
    z = tl.load(vectors + lanes * BLOCK_M)
    for i in range(0, j - 1):
        sub = tl.load(beta + i)
        c = tl.load(alpha + i + 1) - theta
        e = zero + tl.load(beta + i + 1, mask=i + 2 < j, other=0.0)
        z_next = tl.load(vectors + lanes * BLOCK_M + i + 1)
        swap = tl.abs(d) < tl.abs(sub)
        pivot = tl.where(tl.abs(d) < tiny, tiny, d)
        keep_factor = sub / pivot
        swap_factor = d / tl.where(sub == 0.0, 1.0, sub)
        row = elim + i * _LANES + lanes
        tl.store(row, tl.where(swap, sub, pivot))
        tl.store(row + field, tl.where(swap, c, u))
        tl.store(row + 2 * field, tl.where(swap, e, 0.0))
        tl.store(row + 3 * field, tl.where(swap, z_next, z))
        next_d = tl.where(swap, u - swap_factor * c, c - keep_factor * u)
        u = tl.where(swap, -swap_factor * e, e)
        z = tl.where(swap, z - swap_factor * z_next, z_next - keep_factor * z)
        d = next_d
    row = elim + (j - 1) * _LANES + lanes
    tl.store(row, tl.where(tl.abs(d) < tiny, tiny, d))
    tl.store(row + field, zero)
    tl.store(row + 2 * field, zero)
    tl.store(row + 3 * field, z)
    tl.debug_barrier()
    z1 = zero
    z2 = zero
    for step in range(0, j):
        i = j - 1 - step
        row = elim + i * _LANES + lanes
        value = tl.load(row + 3 * field) - tl.load(row + field) * z1 - tl.load(row + 2 * field) * z2
        value = value / tl.load(row)
        tl.store(vectors + lanes * BLOCK_M + i, value)
        z2 = z1
        z1 = value


@triton.jit
def _lane(block, lanes, r):
    """Row r of a (L, B) block as a (B,) vector."""
    return tl.sum(tl.where(lanes[:, None] == r, block, 0.0), axis=0)


@triton.jit
def _orthonormalise(vectors, j, pairs, DIMS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Normalises vectors[r, :j] in order of r, each after removing the earlier lanes.

    Nearly equal eigenvalues give inverse iteration nearly equal vectors;
    this keeps their Ritz vectors orthogonal. Lanes from pairs to DIMS, or a
    vector that cannot be normalised, become e_0; lanes past DIMS stay 0.
    """
    lanes = tl.arange(0, _LANES)
    idx = tl.arange(0, BLOCK_M)
    ptrs = vectors + lanes[:, None] * BLOCK_M + idx[None, :]
    block = tl.load(ptrs, mask=(lanes < pairs)[:, None] & (idx < j)[None, :], other=0.0)
    for r in tl.static_range(DIMS):  # lanes past DIMS are never used
        v = _lane(block, lanes, r)
        for p in tl.static_range(r):
            u = _lane(block, lanes, p)
            v -= tl.sum(u * v) * u
        norm = tl.sqrt(tl.sum(v * v))
        good = (norm > 0.0) & (norm <= _DBL_MAX)
        v = tl.where(good, v / tl.where(good, norm, 1.0), tl.where(idx == 0, 1.0, 0.0))
        block = tl.where(lanes[:, None] == r, v[None, :], block)
    tl.store(ptrs, block, mask=(idx < j)[None, :])


@triton.jit
def _tridiagonal_top(alpha, beta, theta_out, vectors, elim, j, pairs, residual, DIMS: tl.constexpr,
                     BLOCK_M: tl.constexpr, SHIFTS: tl.constexpr, ROUNDS: tl.constexpr):
    """Top `pairs` eigenpairs of T_j into theta_out (L,) and vectors (L, BLOCK_M); True iff converged.

    Converged: j >= DIMS and residual * |s_r[j - 1]| <= 1e-6 * theta_0 for
    every r < pairs, residual being beta_j (the next Lanczos residual norm).
    """
    idx = tl.arange(0, BLOCK_M)
    lanes = tl.arange(0, _LANES)
    on = idx < j
    a = tl.load(alpha + idx, mask=on, other=0.0)
    b_next = tl.load(beta + idx, mask=idx < j - 1, other=0.0)
    b_prev = tl.load(beta + idx - 1, mask=on & (idx >= 1), other=0.0)
    radius = tl.abs(b_prev) + tl.abs(b_next)
    lower = tl.min(tl.where(on, a - radius, float("inf")))
    upper = tl.max(tl.where(on, a + radius, -float("inf")))
    norm = tl.max(tl.where(on, tl.abs(a) + radius, 0.0))
    pivot_min = tl.maximum(tl.max(b_next * b_next), 1.0) * _DBL_MIN
    tiny = tl.maximum(norm, _DBL_MIN) * _DBL_EPSILON
    theta = _bisect(alpha, beta, j, pairs, lower, upper, pivot_min, SHIFTS, ROUNDS)
    tl.store(theta_out + lanes, theta)
    # Lane 0 starts from ones, later lanes from hashed vectors (csrc/lanczos.h):
    # from ones again, a multiple eigenvalue gave every lane the same vector.
    start = _start_component(lanes[:, None].to(tl.int64) * j + idx[None, :]).to(tl.float64)
    start = tl.where(lanes[:, None] == 0, 1.0, start)
    tl.store(vectors + lanes[:, None] * BLOCK_M + idx[None, :], start)
    for _ in tl.static_range(_INVERSE_ITERATIONS):
        tl.debug_barrier()
        _shifted_solve(alpha, beta, vectors, elim, j, theta, tiny, BLOCK_M)
        tl.debug_barrier()
        _orthonormalise(vectors, j, pairs, DIMS, BLOCK_M)
    tl.debug_barrier()
    last = tl.load(vectors + lanes * BLOCK_M + j - 1)
    theta0 = tl.sum(tl.where(lanes == 0, theta, 0.0))
    small = (residual * tl.abs(last) <= tl.abs(theta0) * _RESIDUAL_TOLERANCE) | (lanes >= pairs)
    return (j >= DIMS) & (tl.sum(small.to(tl.int32)) == _LANES)


@triton.jit
def _ritz_vectors(basis, vectors, theta_in, axes, theta_out, j, pairs, m, DIMS: tl.constexpr,
                  BLOCK_M: tl.constexpr, ROWS: tl.constexpr):
    """axes[r] = Q_j s_r / ||Q_j s_r|| and theta_out[r] = theta_r on present axes, 0 elsewhere.

    Present: r < pairs and theta_r > 1e-5 * theta_0. axes: (L, m) float32;
    theta_out: (L,) float64.
    """
    idx = tl.arange(0, BLOCK_M)
    inside = idx < m
    lanes = tl.arange(0, _LANES)
    theta = tl.load(theta_in + lanes, mask=lanes < pairs, other=0.0)
    theta0 = tl.sum(tl.where(lanes == 0, theta, 0.0))
    present = (lanes < pairs) & (theta > theta0 * _ABSENT_AXIS_TOLERANCE)
    ritz = tl.zeros((_LANES, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, j, ROWS):
        k = k0 + tl.arange(0, ROWS)
        k_ok = k < j
        q = tl.load(basis + k[:, None] * m + idx[None, :], mask=k_ok[:, None] & inside[None, :], other=0.0)
        for r in tl.static_range(DIMS):
            s = tl.load(vectors + r * BLOCK_M + k, mask=k < tl.where(r < pairs, j, 0), other=0.0).to(tl.float32)
            ritz = tl.where(lanes[:, None] == r, ritz + tl.sum(s[:, None] * q, axis=0)[None, :], ritz)
    norm = tl.sqrt_rn(tl.sum(ritz * ritz, axis=1))
    ritz = tl.div_rn(ritz, tl.zeros_like(ritz) + tl.where(norm > 0.0, norm, 1.0)[:, None])
    ritz = tl.where(present[:, None], ritz, 0.0)
    tl.store(axes + lanes[:, None] * m + idx[None, :], ritz, mask=inside[None, :])
    tl.store(theta_out + lanes, tl.where(present, theta, 0.0))


@triton.jit
def _lanczos_kernel(
    mat_ptr, energy_ptr, basis_ptr, tri_ptr, theta_work_ptr, vectors_ptr, elim_ptr, axes_ptr, theta_ptr,
    m, D,
    DIMS: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr,
    SHIFTS: tl.constexpr, ROUNDS: tl.constexpr,
):
    """Top DIMS eigenpairs of sample n's M (m, m) by Lanczos: axes (L, m), theta (L,).

    mat_ptr, basis_ptr: (N, m, m) float32 (basis row j - 1 holds q_j);
    energy_ptr: (N, D) float64 column energies; tri_ptr: (N, 2, BLOCK_M) float64
    alpha and beta; theta_work_ptr (N, L), vectors_ptr (N, L, BLOCK_M) and
    elim_ptr (N, 4, BLOCK_M, L) float64 are the tridiagonal solver's. A
    degenerate sample runs no step: every axis is absent.
    """
    n = tl.program_id(0).to(tl.int64)
    mat = mat_ptr + n * m * m
    basis = basis_ptr + n * m * m
    alpha = tri_ptr + n * 2 * BLOCK_M
    beta = alpha + BLOCK_M
    theta_work = theta_work_ptr + n * _LANES
    vectors = vectors_ptr + n * _LANES * BLOCK_M
    elim = elim_ptr + n * 4 * BLOCK_M * _LANES
    idx = tl.arange(0, BLOCK_M)
    inside = idx < m

    trace = tl.sum(tl.load(mat + idx * (m + 1), mask=inside, other=0.0))
    energy = tl.zeros((BLOCK_E,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_E):
        d = d0 + tl.arange(0, BLOCK_E)
        energy += tl.load(energy_ptr + n * D + d, mask=d < D, other=0.0)
    # NaN fails both comparisons; an infinite trace fails the first.
    regular = (tl.abs(trace) < float("inf")) & (trace.to(tl.float64) > tl.sum(energy) * _DEGENERATE_TOLERANCE)

    q = _start_vector(idx, inside)
    tl.store(basis + idx, q, mask=inside)
    q_prev = tl.zeros((BLOCK_M,), dtype=tl.float32)
    beta_prev = tl.sum(q_prev)
    j = tl.sum(idx * 0)
    pairs = j
    go = regular
    while go:
        j += 1
        tl.debug_barrier()  # q_j's store is visible to every thread
        w = _matvec(mat, basis + (j - 1) * m, m, idx, inside, ROWS)
        a = tl.sum(q * w)
        w = w - (a * q + beta_prev * q_prev)
        w = _reorthogonalise(w, basis, j, m, idx, inside, ROWS)
        w = _reorthogonalise(w, basis, j, m, idx, inside, ROWS)
        b = tl.sqrt_rn(tl.sum(w * w))
        tl.store(alpha + j - 1, a.to(tl.float64))
        tl.store(beta + j - 1, b.to(tl.float64))
        exhausted = b <= trace * _EXHAUSTED_TOLERANCE
        converged = j < 0
        if (j == m) | exhausted | ((j >= DIMS) & (j % _CHECK_EVERY == 0)):
            tl.debug_barrier()
            pairs = tl.minimum(j, DIMS)
            converged = _tridiagonal_top(alpha, beta, theta_work, vectors, elim, j, pairs, b.to(tl.float64),
                                         DIMS, BLOCK_M, SHIFTS, ROUNDS)
        go = ~(converged | exhausted | (j == m))
        q_prev = q
        # b > 1e-6 * trace > 0 whenever the loop goes on.
        q = tl.div_rn(w, tl.zeros_like(w) + tl.where(go, b, 1.0))
        tl.store(basis + j * m + idx, q, mask=idx < tl.where(go, m, 0))
        beta_prev = b
    tl.debug_barrier()
    _ritz_vectors(basis, vectors, theta_work, axes_ptr + n * _LANES * m, theta_ptr + n * _LANES, j, pairs, m, DIMS, BLOCK_M, ROWS)


# --------------------------------------------------------------------------
# Kernels: projection, orientation, bins and counts
# --------------------------------------------------------------------------


@triton.jit
def _project_kernel(x_ptr, scale_ptr, mu_ptr, axes_ptr, out_ptr, m, K, D, tiles, stride_n, stride_i, stride_k,
                    MU_ON_ROWS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, r, k] = sum_i axes[n, r, i] * A[i, k] for one tile of k: P = Y A.

    axes_ptr: (N, L, m) float32 (0 on absent axes); out_ptr: (N, L, K) float32.
    """
    n, tile = sample_and_tile(tiles)
    k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    lanes = tl.arange(0, _LANES)
    sample = x_ptr + n * stride_n
    scale = tl.load(scale_ptr + n)
    mu = mu_ptr + n * D
    axes = axes_ptr + n * _LANES * m
    acc = tl.zeros((_LANES, BLOCK_K), dtype=tl.float32)
    for i0 in range(0, m, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        a = _centred_tile(sample, scale, mu, i, k, m, K, stride_i, stride_k, MU_ON_ROWS)
        y = tl.load(axes + lanes[:, None] * m + i[None, :], mask=(i < m)[None, :], other=0.0)
        acc += tl.sum(y[:, :, None] * a[None, :, :], axis=1)
    tl.store(out_ptr + n * _LANES * K + lanes[:, None] * K + k[None, :], acc, mask=(k < K)[None, :])


@triton.jit
def _orientation(vec, length, NORMALISE: tl.constexpr, BLOCK: tl.constexpr):
    """(L,) float32 +-1: -1 iff the largest-|.| component of v_r is negative (ties: lowest index).

    vec: (L, length) float32 rows; v_r = row r, divided by its norm when
    NORMALISE (the contract orients v_r = w_r / ||w_r||; float32 rounding of
    the quotient can merge or split ties, so it is formed explicitly).
    """
    lanes = tl.arange(0, _LANES)
    norm = tl.zeros((_LANES,), dtype=tl.float32) + 1.0
    if NORMALISE:
        squares = tl.zeros((_LANES,), dtype=tl.float32)
        for t0 in range(0, length, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            v = tl.load(vec + lanes[:, None] * length + t[None, :], mask=(t < length)[None, :], other=0.0)
            squares += tl.sum(v * v, axis=1)
        norm = tl.sqrt_rn(squares)
        norm = tl.where(norm > 0.0, norm, 1.0)
    best = tl.zeros((_LANES,), dtype=tl.float32) - 1.0
    sign = tl.zeros((_LANES,), dtype=tl.float32) + 1.0
    for t0 in range(0, length, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        ok = (t < length)[None, :]
        v = tl.load(vec + lanes[:, None] * length + t[None, :], mask=ok, other=0.0)
        v = tl.div_rn(v, tl.zeros_like(v) + norm[:, None])
        size = tl.where(ok, tl.abs(v), -1.0)
        tile_best = tl.max(size, axis=1)
        first = tl.min(tl.where(size == tile_best[:, None], t[None, :], 2147483647), axis=1)
        value = tl.sum(tl.where(t[None, :] == first[:, None], v, 0.0), axis=1)
        # Tiles come in index order, so a strictly larger value is needed to move.
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        sign = tl.where(better, tl.where(value < 0.0, -1.0, 1.0), sign)
    return sign


@triton.jit
def _coordinates(x_row, stride_c, axes, proj, weight, live, c, C, m, K, MODE: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """f (L, BLOCK_C) float32 of channels c: 0 for c >= C and on lanes that are not live.

    MODE 0: all 0 (D = 0). 1: 2-D x, lane 0 = float32(x). 2 (Gram side):
    weight_r * y_r[c], weight = o_r * sqrt(theta_r). 3 (covariance side):
    weight_r * P[r, c], weight = o_r. Masking by live (not multiplying by a
    zero weight) keeps a degenerate sample's NaN projections out.
    """
    lanes = tl.arange(0, _LANES)
    ok = live[:, None] & (c < C)[None, :]
    if MODE == 1:
        v = tl.load(x_row + c * stride_c, mask=c < C, other=0.0).to(tl.float32)
        f = tl.where((lanes == 0)[:, None], v[None, :], 0.0)
    elif MODE == 2:
        f = weight[:, None] * tl.load(axes + lanes[:, None] * m + c[None, :], mask=ok, other=0.0)
    elif MODE == 3:
        f = weight[:, None] * tl.load(proj + lanes[:, None] * K + c[None, :], mask=ok, other=0.0)
    else:
        f = tl.zeros((_LANES, BLOCK_C), dtype=tl.float32)
    return tl.where(ok, f, 0.0)


@triton.jit
def _bins_kernel(x_ptr, axes_ptr, theta_ptr, proj_ptr, cell_ptr, counts_ptr,
                 C, m, K, G, grids, stride_n, stride_c,
                 MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr):
    """cell[n, :] and counts[n, :] (+= by atomics; zeroed by the caller) of sample n.

    axes_ptr (N, L, m), theta_ptr (N, L) float64 and proj_ptr (N, L, K) come
    from the Lanczos and projection kernels (MODE 2, 3; see _coordinates).
    Two sweeps over the channels: lo/hi (and, for 2-D x, finiteness), then bins.
    """
    n = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, _LANES)
    axes = axes_ptr + n * _LANES * m
    proj = proj_ptr + n * _LANES * K
    x_row = x_ptr + n * stride_n
    # Live lanes: the present axes (theta > 0), the values' lane for 2-D x, none for D = 0.
    weight = tl.zeros((_LANES,), dtype=tl.float32)
    if MODE == 1:
        live = lanes == 0
    elif MODE == 2:
        theta = tl.load(theta_ptr + n * _LANES + lanes)
        live = theta > 0.0
        weight = _orientation(proj, K, True, BLOCK_O) * tl.sqrt(theta).to(tl.float32)
    elif MODE == 3:
        live = tl.load(theta_ptr + n * _LANES + lanes) > 0.0
        weight = _orientation(axes, m, False, BLOCK_O)
    else:
        live = lanes < 0

    lo = tl.zeros((_LANES,), dtype=tl.float32) + float("inf")
    hi = tl.zeros((_LANES,), dtype=tl.float32) - float("inf")
    bad = tl.sum(lanes * 0)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        f = _coordinates(x_row, stride_c, axes, proj, weight, live, c, C, m, K, MODE, BLOCK_C)
        ok = (c < C)[None, :]
        lo = tl.minimum(lo, tl.min(tl.where(ok, f, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(ok, f, -float("inf")), axis=1))
        bad += tl.sum((ok & ~(tl.abs(f) < float("inf"))).to(tl.int32))
    # Axes where every channel shares one value, and 2-D samples with a NaN/Inf, are all bin 0.
    split = (hi > lo) & (lanes * 0 + bad == 0)
    # Each axis binned scaled by a power of two (exact): hi - lo cannot overflow, nor width underflow.
    axis_scale = _magnitude_scale(tl.maximum(tl.abs(lo), tl.abs(hi)))
    lo = lo * axis_scale
    hi = hi * axis_scale
    width = tl.div_rn(hi - lo, tl.zeros_like(hi) + grids)
    width = tl.where(split, width, 1.0)
    top = tl.zeros_like(hi) + (grids - 1)
    g = tl.zeros((_LANES,), dtype=tl.int64) + grids  # grids**2 can pass int32 (dims 1 and grids 65536)
    power = tl.where(lanes == 0, 1, tl.where(lanes == 1, g, tl.where(lanes == 2, g * g, 0)))
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        f = _coordinates(x_row, stride_c, axes, proj, weight, live, c, C, m, K, MODE, BLOCK_C)
        position = tl.floor(tl.div_rn(f * axis_scale[:, None] - lo[:, None], tl.zeros_like(f) + width[:, None]))
        # NaN fails both comparisons and lands in bin 0.
        b = tl.where(position >= top[:, None], top[:, None], tl.where(position > 0.0, position, 0.0)).to(tl.int64)
        b = tl.where(split[:, None], b, 0)
        cell = tl.sum(b * power[:, None], axis=0)
        tl.store(cell_ptr + n * C + c, cell, mask=c_ok)
        tl.atomic_add(counts_ptr + n * G + cell, tl.zeros_like(cell) + 1, mask=c_ok, sem="relaxed")


# --------------------------------------------------------------------------
# Kernels: the drop and the apply
# --------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed", "kappa_bits", "alpha_bits"])
def _drop_kernel(cell_ptr, counts_ptr, mask_ptr, scale_ptr, C, G, row_bytes, seed, kappa_bits, alpha_bits,
                 RESCALE: tl.constexpr, BLOCK_C: tl.constexpr):
    """mask[n, :] (N, row_bytes) uint8 and, with RESCALE, scale[n, :] (N, C) float32.

    kappa_bits, alpha_bits: the float64 bits of kappa and alpha (Triton float
    arguments are float32). max(counts) is the largest count of any channel's
    cell, the same as over all cells since every nonzero cell holds a channel.
    """
    n = tl.program_id(0).to(tl.int64)
    kappa = kappa_bits.to(tl.int64).to(tl.float64, bitcast=True)
    alpha = alpha_bits.to(tl.int64).to(tl.float64, bitcast=True)
    cells = cell_ptr + n * C
    counts = counts_ptr + n * G
    largest = tl.zeros((BLOCK_C,), dtype=tl.int64)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        count = tl.load(counts + tl.load(cells + c, mask=c < C, other=0), mask=c < C, other=0)
        largest = tl.maximum(largest, count)
    max_count = tl.max(largest).to(tl.float64)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        count = tl.load(counts + tl.load(cells + c, mask=c_ok, other=0), mask=c_ok, other=0)
        # Three separately rounded float64 steps, then one rounding to float32.
        t = count.to(tl.float64) * kappa
        t = t / max_count
        t = t + alpha
        p = tl.minimum(tl.maximum(t, 0.0), 1.0).to(tl.float32)
        keep = (uniform(seed, n * C + c) >= p) & c_ok
        bits = keep.to(tl.int32) << (tl.arange(0, BLOCK_C) % 8)
        packed = tl.sum(tl.reshape(bits, (BLOCK_C // 8, 8)), axis=1)
        byte = c0 // 8 + tl.arange(0, BLOCK_C // 8)
        tl.store(mask_ptr + n * row_bytes + byte, packed.to(tl.uint8), mask=byte < row_bytes)
        if RESCALE:
            inverse = (1.0 / (1.0 - p.to(tl.float64))).to(tl.float32)
            tl.store(scale_ptr + n * C + c, tl.where(keep, inverse, 0.0), mask=c_ok)


@triton.jit
def _apply_kernel(x_ptr, y_ptr, mask_ptr, scale_ptr, rows, inner, C, D, row_bytes,
                  CHANNELS_INNER: tl.constexpr, PER_CHANNEL: tl.constexpr, WIDE: tl.constexpr,
                  BFLOAT16: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """y = keep ? x * s : 0 on a (BR, BC) tile of x viewed as (rows, inner); a 0-d s of exactly 1
    is y = keep ? x : 0, x's bits untouched (csrc/cuda/feature_density_kernel.cu's rule).

    Contiguous 4-D x: rows = N*C, inner = D (row = n*C + c). channels_last or
    2-D x: rows = N*D, inner = C (row = n*D + position, column = c). mask:
    (N, row_bytes) uint8; s = scale[n, c] if PER_CHANNEL else the one value.
    WIDE computes in float64 (float64 x); BFLOAT16 rounds explicitly.
    """
    row = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    col = tl.program_id(1) * BC + tl.arange(0, BC)
    ok = (row < rows)[:, None] & (col < inner)[None, :]
    if CHANNELS_INNER:
        n = (row // D)[:, None]
        c = col[None, :]
    else:
        n = (row // C)[:, None]
        c = (row % C)[:, None]
    byte = tl.load(mask_ptr + n * row_bytes + (c >> 3), mask=ok, other=0)
    keep = ((byte.to(tl.int32) >> (c & 7).to(tl.int32)) & 1) != 0
    offs = row[:, None] * inner + col[None, :]
    if PER_CHANNEL:
        scale = tl.load(scale_ptr + n * C + c, mask=ok, other=0.0)
        block_mask.store_kept(x_ptr, y_ptr, offs, ok, keep, scale, WIDE, BFLOAT16)
    else:
        scale = tl.load(scale_ptr)
        if scale == 1.0:  # multiplies nothing: kept values keep their bits, NaN payloads included
            block_mask.store_kept(x_ptr, y_ptr, offs, ok, keep, None, WIDE, BFLOAT16)
        else:
            block_mask.store_kept(x_ptr, y_ptr, offs, ok, keep, scale, WIDE, BFLOAT16)


# --------------------------------------------------------------------------
# Host side: checks
# --------------------------------------------------------------------------


def _check_density_args(x: torch.Tensor, dims: int, grids: int) -> None:
    """The checks of csrc/checks.h check_feature_density_args, with its messages."""
    block_mask._check_float(x, "x")
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    if x.dim() not in (2, 4):
        raise ValueError(f"x must be 4-D (N, C, H, W) feature maps or 2-D (N, F) features, got {x.dim()} dimensions")
    if x.dim() == 2 and dims != 1:
        raise ValueError(f"dims must be 1 for 2-D (N, F) features (each value is its own coordinate), got {dims}")
    if grids < 1:
        raise ValueError(f"grids must be >= 1, got {grids}")
    if grids**dims > _MAX_CELLS:
        raise ValueError(f"grids must give at most {_MAX_CELLS} cells (grids**dims), got {grids}**{dims}")


def _check_forward_args(x: torch.Tensor, dims: int, grids: int, kappa: float, alpha: float) -> None:
    _check_density_args(x, dims, grids)
    if not abs(kappa) < float("inf"):
        raise ValueError(f"kappa must be finite, got {kappa}")
    if not abs(alpha) < float("inf"):
        raise ValueError(f"alpha must be finite, got {alpha}")


def _check_backward_args(grad_y: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> None:
    """The checks of csrc/checks.h check_channel_mask_backward_args, with its messages."""
    block_mask._check_float(grad_y, "grad_y")
    if grad_y.dim() not in (2, 4):
        raise ValueError(f"grad_y must be 4-D (N, C, H, W) or 2-D (N, C), got {grad_y.dim()} dimensions")
    N, C = grad_y.shape[:2]
    if mask.dtype != torch.uint8:
        raise TypeError(f"mask must be uint8, got {mask.dtype}")
    if mask.dim() != 2 or mask.shape[0] != N or mask.shape[1] != (C + 7) // 8:
        raise ValueError(f"mask must have shape (N, ceil(C/8)) = ({N}, {(C + 7) // 8}), got {list(mask.shape)}")
    if scale.dtype != torch.float32:
        raise TypeError(f"scale must be float32, got {scale.dtype}")
    if not (scale.numel() == 1 or (scale.dim() == 2 and tuple(scale.shape) == (N, C))):
        raise ValueError(f"scale must hold one value or have shape (N, C) = ({N}, {C}), got {list(scale.shape)}")
    if mask.device != grad_y.device or scale.device != grad_y.device:
        raise ValueError("grad_y, mask and scale must be on one device")


# --------------------------------------------------------------------------
# Host side: launchers
# --------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return block_mask._next_pow2(n)


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, bool, int, int]:
    """(src, channels_inner, stride_c, stride_p) of x walked as (N, C, D).

    src is x, or a contiguous copy for other strides. Contiguous 4-D x has
    channels outside positions; channels_last and 2-D x have them inside.
    The strides follow from the layout (a size-1 dimension's stride is arbitrary).
    """
    src, channels_last = block_mask._walkable(x)
    C, D = src.shape[1], _positions(src)
    if src.dim() == 2 or channels_last:
        return src, True, 1, C
    return src, False, D, 1


def _positions(x: torch.Tensor) -> int:
    """D = H*W for 4-D x, 1 for 2-D x."""
    return x.shape[2] * x.shape[3] if x.dim() == 4 else 1


def _principal_axes(src, stride_c, stride_p, dims):
    """Launches 1-4 on a non-empty 4-D src: (axes (N, L, m), theta (N, L), proj (N, L, K), mode, m, K)."""
    N, C = src.shape[:2]
    D = _positions(src)
    device = src.device
    gram = C < D
    m, K = (C, D) if gram else (D, C)
    # A = Xc (rows are channels) on the Gram side, Xc^T (rows are positions) otherwise.
    stride_i, stride_k = (stride_c, stride_p) if gram else (stride_p, stride_c)
    mu_on_rows = not gram

    scale = torch.empty((N,), dtype=torch.float32, device=device)
    mu = torch.empty((N, D), dtype=torch.float32, device=device)
    energy = torch.empty((N, D), dtype=torch.float64, device=device)
    block_d = min(_pow2(D), 128)
    block_c = max(1, min(_pow2(C), _TILE // block_d))
    launch(_scale_kernel, (N,), src, scale, C, D, src.stride(0), stride_c, stride_p, BLOCK_C=block_c, BLOCK_D=block_d)
    tiles = triton.cdiv(D, block_d)
    launch(_mean_kernel, (N * tiles,), src, scale, mu, energy, C, D, tiles, src.stride(0), stride_c,
           stride_p, BLOCK_C=block_c, BLOCK_D=block_d)

    mat = torch.empty((N, m, m), dtype=torch.float32, device=device)
    block = min(_GRAM_BLOCK, max(16, _pow2(m)))
    block_k = min(_GRAM_BLOCK_K, max(16, _pow2(K)))
    tiles = triton.cdiv(m, block)
    launch(_gram_kernel, (N * tiles * tiles,), src, scale, mu, mat, m, K, D, tiles, src.stride(0), stride_i, stride_k,
           MU_ON_ROWS=mu_on_rows, BLOCK=block, BLOCK_K=block_k, num_warps=_GRAM_WARPS)

    block_m = _pow2(m)
    basis = torch.empty((N, m, m), dtype=torch.float32, device=device)
    tri = torch.empty((N, 2, block_m), dtype=torch.float64, device=device)
    theta_work = torch.empty((N, _LANES), dtype=torch.float64, device=device)
    vectors = torch.empty((N, _LANES, block_m), dtype=torch.float64, device=device)
    elim = torch.empty((N, 4, block_m, _LANES), dtype=torch.float64, device=device)
    axes = torch.empty((N, _LANES, m), dtype=torch.float32, device=device)
    theta = torch.empty((N, _LANES), dtype=torch.float64, device=device)
    launch(_lanczos_kernel, (N,), mat, energy, basis, tri, theta_work, vectors, elim, axes, theta, m, D,
           DIMS=dims, BLOCK_M=block_m, ROWS=max(1, min(block_m, _TILE // block_m)),
           BLOCK_E=min(_pow2(D), 1024), SHIFTS=_SHIFTS, ROUNDS=_ROUNDS,
           # Wide vectors (and the (L, BLOCK_M) float64 block) need more threads to stay in registers.
           num_warps=min(16, max(4, block_m // 128)))

    proj = torch.empty((N, _LANES, K), dtype=torch.float32, device=device)
    block_k = min(_pow2(K), 128)
    block_i = max(1, min(_pow2(m), 1024 // block_k))
    tiles = triton.cdiv(K, block_k)
    launch(_project_kernel, (N * tiles,), src, scale, mu, axes, proj, m, K, D, tiles, src.stride(0),
           stride_i, stride_k, MU_ON_ROWS=mu_on_rows, BLOCK_I=block_i, BLOCK_K=block_k)
    return axes, theta, proj, 2 if gram else 3, m, K


def _density(src: torch.Tensor, stride_c: int, stride_p: int, dims: int, grids: int):
    """(cell (N, C), counts (N, G)) int64 of a src with N >= 1 and C >= 1."""
    N, C = src.shape[:2]
    D = _positions(src)
    counts = torch.zeros((N, grids**dims), dtype=torch.int64, device=src.device)
    cell = torch.empty((N, C), dtype=torch.int64, device=src.device)
    if src.dim() == 2 or D == 0:
        # No PCA: the values themselves (2-D), or no positions at all (every channel in
        # cell 0). The axis pointers are never read; cell stands in for them (and for
        # an empty src, whose data pointer may be null).
        axes = theta = proj = cell
        mode, m, K = (1, 0, 0) if src.dim() == 2 else (0, 0, 0)
    else:
        axes, theta, proj, mode, m, K = _principal_axes(src, stride_c, stride_p, dims)
    values = src if mode == 1 else cell  # only 2-D x is read here
    launch(_bins_kernel, (N,), values, axes, theta, proj, cell, counts, C, m, K, grids**dims, grids,
           src.stride(0), stride_c,
           MODE=mode, BLOCK_C=min(_pow2(C), 1024), BLOCK_O=min(_pow2(max(m, K, 1)), 1024))
    return cell, counts


def _drop(cell, counts, seed, kappa, alpha, rescale):
    """(mask (N, ceil(C/8)) uint8, scale) from the cells: launch 6."""
    N, C = cell.shape
    row_bytes = (C + 7) // 8
    mask = torch.empty((N, row_bytes), dtype=torch.uint8, device=cell.device)
    if rescale:
        scale = torch.empty((N, C), dtype=torch.float32, device=cell.device)
    else:
        scale = torch.ones((), dtype=torch.float32, device=cell.device)
    launch(_drop_kernel, (N,), cell, counts, mask, scale, C, counts.shape[1], row_bytes, seed,
           _float64_bits(kappa), _float64_bits(alpha),
           RESCALE=rescale, BLOCK_C=min(max(8, _pow2(C)), 1024))
    return mask, scale


def _apply(src: torch.Tensor, channels_inner: bool, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Launches _apply_kernel: keep ? src * s : 0 in src's layout, for a non-empty src."""
    N, C = src.shape[:2]
    D = _positions(src)
    out = torch.empty_like(src)
    rows, inner = (N * D, C) if channels_inner else (N * C, D)
    cols = min(_pow2(inner), _APPLY_BLOCK)
    block_rows = max(1, _APPLY_BLOCK // cols)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(inner, cols))
    launch(_apply_kernel, grid, src, out, mask, scale, rows, inner, C, D, mask.shape[1],
           CHANNELS_INNER=channels_inner, PER_CHANNEL=scale.dim() == 2, WIDE=src.dtype == torch.float64,
           BFLOAT16=src.dtype == torch.bfloat16, BR=block_rows, BC=cols, num_warps=_APPLY_WARPS)
    return out


# --------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------


@register_op("robustdrop::feature_density_triton", _apply_kernel)
def feature_density(x: torch.Tensor, dims: int, grids: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cell, counts)`` as ``robustdrop::feature_density``.

    x: (N, C, H, W) float16/bfloat16/float32/float64, contiguous or
    channels_last (other strides are copied to contiguous first), dims in
    {1, 2, 3}; or (N, F) with dims 1. grids >= 1, grids**dims <= 65536.
    Returns cell (N, C) int64 in [0, grids**dims) and counts (N, grids**dims)
    int64 (each row sums to C).
    """
    _check_density_args(x, dims, grids)
    src, _, stride_c, stride_p = _layout(x)
    N, C = src.shape[:2]
    if N == 0 or C == 0:
        empty = torch.empty((N, C), dtype=torch.int64, device=x.device)
        return empty, torch.zeros((N, grids**dims), dtype=torch.int64, device=x.device)
    return _density(src, stride_c, stride_p, dims, grids)


@register_op("robustdrop::feature_density_forward_triton", _apply_kernel)
def feature_density_forward(
    x: torch.Tensor, dims: int, grids: int, seed: int, kappa: float, alpha: float, rescale: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FDD forward: ``(y, mask, scale)`` as ``robustdrop::feature_density_forward``.

    x, dims, grids: as feature_density. seed: signed 64-bit. kappa, alpha:
    finite. Returns y (x's shape, dtype and layout), mask (N, ceil(C/8)) uint8
    (keep bit of channel c at bit c % 8 of byte c // 8) and scale: a 0-d
    float32 1.0, or (N, C) float32 with rescale.
    """
    _check_forward_args(x, dims, grids, kappa, alpha)
    src, channels_inner, stride_c, stride_p = _layout(x)
    N, C = src.shape[:2]
    if N == 0 or C == 0:
        mask = torch.zeros((N, (C + 7) // 8), dtype=torch.uint8, device=x.device)
        if rescale:
            scale = torch.empty((N, C), dtype=torch.float32, device=x.device)
        else:
            scale = torch.ones((), dtype=torch.float32, device=x.device)
        return torch.empty_like(src), mask, scale
    cell, counts = _density(src, stride_c, stride_p, dims, grids)
    mask, scale = _drop(cell, counts, seed, kappa, alpha, rescale)
    if src.numel() == 0:
        return torch.empty_like(src), mask, scale
    return _apply(src, channels_inner, mask, scale), mask, scale


@register_op("robustdrop::channel_mask_backward_triton", _apply_kernel)
def channel_mask_backward(grad_y: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad_x = keep ? grad_y * s : 0`` per channel, as ``robustdrop::channel_mask_backward``.

    grad_y: (N, C, H, W) or (N, C) floating point; mask: (N, ceil(C/8)) uint8
    and scale: one float32 value or (N, C) float32, from the forward pass.
    Returns grad_x in grad_y's dtype and layout.
    """
    _check_backward_args(grad_y, mask, scale)
    src, channels_inner, _, _ = _layout(grad_y)
    if src.numel() == 0:
        return torch.empty_like(src)
    if scale.dim() != 2:
        scale = scale.reshape(())
    return _apply(src, channels_inner, mask.contiguous(), scale.contiguous())
