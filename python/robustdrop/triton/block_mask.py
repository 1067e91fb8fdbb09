"""DropBlock's block mask in Triton (DESIGN.md 4.1), bit-identical to the CPU op.

Forward, for x of shape (N, C, H, W), bs = block_size <= min(H, W):

    Hs, Ws = H - bs + 1, W - bs + 1;  Cm = 1 if couple_channels else C
    seed[n, cm, i, j] = uniform(seed, ((n*Cm + cm)*Hs + i)*Ws + j) < gamma_n
    keep[n, c, h, w]  = no seed at (i, j) with h-bs+1 <= i <= h, w-bs+1 <= j <= w
    scale[g] = float32((numel/G) / (eps + kept_g)) in float64 if normalize else 1
    y[n] = keep ? x * scale[n // (N/G)] : 0   (float32 maths; float64 for float64 x)

gamma_n is float32(gamma), or sample_gamma[n] when per-sample seed
probabilities are given. The N samples form G = normalize_groups consecutive
groups of N/G; kept_g counts the kept elements of group g over all C channels.

Three kernels, none of which reads x until the last:

1. ``_seed_bits_kernel`` draws the seed grid as a flat bitmap, one Philox call
   per four seeds (bit f & 7 of byte f >> 3 is seed f). Drawing per group of
   four is what the flat layout buys: a 2-D tile's rows start at arbitrary
   offsets mod 4, so a tile-wise draw would run Philox once per seed, four
   times the integer work (by a rough count, comparable to the apply pass).
   With ``FILTER`` it also clears seeds off CamDrop's candidates (cam_mask.py),
   so that op reuses the next two kernels unchanged.
2. ``_dilate_pack_kernel`` turns seeds into keep bits, one program per output
   tile. The number of seeds in each bs x bs window is a band-matrix product,
   ``hits = A @ S @ B`` with A[r, s] = 1 iff 0 <= h_r - i_s < bs and
   B[t, c] = 1 iff 0 <= w_c - j_t < bs, so it runs on tensor cores as two
   ``tl.dot``s per seed chunk (0/1 operands in float16, exact float32 sums).
   Short planes are stacked several to a tile (A is then block diagonal) so
   that 7x7 feature maps do not leave most of a 16x16 dot tile empty. The keep
   bits are packed eight to a byte and the kept counts added atomically to
   their group's (one atomic per tile when G = 1).
3. ``_apply_kernel`` streams x: one read of x, one of the mask bytes, one
   write of y. In the forward pass it turns each group's kept count into its
   scale (one program stores each), so no host sync or extra launch is
   needed. The backward pass is the same kernel on grad_y with the stored
   scale.

Shapes: mask (N, Cm, H, ceil(W/8)) uint8, padding bits zero; scale float32,
() for G = 1 and (G,) otherwise. The apply kernel also serves Random Mask
(fixed_mask.py): one mask (C, H, ceil(W/8)) for the whole batch, no scale.
"""

import math
import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from .philox import launch, register_op, to_uniform

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Seeds drawn per program of _seed_bits_kernel, in bytes of the bitmap (8 seeds each).
_SEED_BYTES = 512
# Elements per program of _apply_kernel, and its warps (8 elements a thread).
_APPLY_BLOCK = 2048
_APPLY_WARPS = 8
# Channels per channels_last tile: more rows per tile means more of each
# channel's mask bytes (8 columns per byte) read per cache sector.
_CL_CHANNELS = 32
# Output tile of _dilate_pack_kernel: at most this many rows and columns.
_TILE = 64
_MASK_WARPS = 8


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _seed_bits_kernel(
    bits_ptr, count_ptr, seed, gamma, n_bytes, n_counts,
    sample_gamma_ptr, sample_seeds, spatial_ptr, channel_ptr, N, C, H, W, Hs, Ws,
    BYTES: tl.constexpr, SAMPLE_GAMMA: tl.constexpr, FILTER: tl.constexpr,
):
    """bits[f >> 3] bit (f & 7) = uniform(seed, f) < gamma_n, for f < 8 * n_bytes.

    bits_ptr: (n_bytes,) uint8. count_ptr: (n_counts,) int64 kept counts, one
    per normalisation group, zeroed here so that the next kernel can count
    into them without a separate memset launch. Byte b holds Philox groups 2b
    and 2b + 1 (four seeds each); seeds past the grid are drawn too but never
    read. gamma_n is gamma, or with SAMPLE_GAMMA sample_gamma_ptr[n] (N,)
    float32 for the seeds f of sample n = f // sample_seeds. FILTER (CamDrop)
    also requires the seed's position and channel to be candidates: the grid
    is then (N, C, Hs, Ws), spatial_ptr (N, H*W) and channel_ptr (N, C) uint8
    flags. Pointers a flag leaves off are never read.
    """
    pid = tl.program_id(0)
    if pid == 0:
        _zero_counts(count_ptr, n_counts, BYTES)
    byte = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
    half = tl.arange(0, 2)
    group = 2 * byte[:, None] + half[None, :]  # (BYTES, 2)
    # Seed 4 * group + lane, as an int32 offset from the program's first seed.
    offset = 8 * tl.arange(0, BYTES)[:, None] + 4 * half[None, :]
    first_seed = pid.to(tl.int64) * (8 * BYTES)
    w0, w1, w2, w3 = tl.randint4x(seed, group)
    nibble = _is_seed(w0, first_seed + offset, gamma, sample_gamma_ptr, sample_seeds, N, SAMPLE_GAMMA)
    nibble |= _is_seed(w1, first_seed + offset + 1, gamma, sample_gamma_ptr, sample_seeds, N, SAMPLE_GAMMA) << 1
    nibble |= _is_seed(w2, first_seed + offset + 2, gamma, sample_gamma_ptr, sample_seeds, N, SAMPLE_GAMMA) << 2
    nibble |= _is_seed(w3, first_seed + offset + 3, gamma, sample_gamma_ptr, sample_seeds, N, SAMPLE_GAMMA) << 3
    if FILTER:
        nibble &= _candidate_nibble(first_seed, offset, spatial_ptr, channel_ptr, N, C, H, W, Hs, Ws)
    packed = tl.sum(nibble << (4 * half)[None, :], axis=1)
    tl.store(bits_ptr + byte, packed.to(tl.uint8), mask=byte < n_bytes)


@triton.jit
def _zero_counts(count_ptr, n_counts, BLOCK: tl.constexpr):
    """count[0 .. n_counts) = 0, in blocks of BLOCK (one program: G may exceed the grid)."""
    for start in range(0, n_counts, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(count_ptr + offs, tl.zeros((BLOCK,), dtype=tl.int64), mask=offs < n_counts)


@triton.jit
def _is_seed(word, seed_index, gamma, sample_gamma_ptr, sample_seeds, N, SAMPLE_GAMMA: tl.constexpr):
    """1 (int32) where uniform(word) < the seed probability of seed_index (int64), else 0.

    The probability is gamma (float32), or with SAMPLE_GAMMA the float32
    sample_gamma[n] of the seed's sample n = seed_index // sample_seeds; seeds
    past the grid (n >= N) get 0, no seed. A NaN or negative probability draws
    no seed, as the float32 compare gives.
    """
    if SAMPLE_GAMMA:
        n = seed_index // sample_seeds
        threshold = tl.load(sample_gamma_ptr + n, mask=n < N, other=0.0)
    else:
        threshold = gamma
    return (to_uniform(word) < threshold).to(tl.int32)


@triton.jit
def _candidate_nibble(first_seed, offset, spatial_ptr, channel_ptr, N, C, H, W, Hs, Ws):
    """Bit l set iff seed first_seed + offset + l (l < 4) lies on a candidate.

    Seed f of the grid (N, C, Hs, Ws) sits at plane n*C + c, row i, column j;
    it is allowed iff spatial[n, i*W + j] and channel[n, c] are nonzero. The
    int64 division runs once per program on the scalar first_seed; per seed
    only int32 divisions by the kernel-wide sizes remain. Seeds past the grid
    (n >= N) read as not allowed.
    """
    plane_size = Hs * Ws
    first_plane = first_seed // plane_size
    first_pos = (first_seed - first_plane * plane_size).to(tl.int32)
    first_n = first_plane // C
    first_c = (first_plane - first_n * C).to(tl.int32)
    nibble = tl.zeros(offset.shape, dtype=tl.int32)
    for lane in tl.static_range(4):
        pos = first_pos + offset + lane  # may run past the first plane
        planes_on = pos // plane_size
        pos -= planes_on * plane_size
        i = pos // Ws
        j = pos - i * Ws
        c = first_c + planes_on
        samples_on = c // C
        c -= samples_on * C
        n = first_n + samples_on
        inside = n < N
        spatial = tl.load(spatial_ptr + n * (H * W) + (i * W + j), mask=inside, other=0)
        channel = tl.load(channel_ptr + n * C + c, mask=inside, other=0)
        nibble |= ((spatial != 0) & (channel != 0)).to(tl.int32) << lane
    return nibble


@triton.jit
def _load_seeds(bits_ptr, plane, i, j, planes, Hs, Ws):
    """Seed bits S[s, t] at plane[s], row i[s], column j[t] as 0/1 float16.

    plane, i: (KR,) int64; j: (KC,). Positions outside the grid read as 0.
    """
    inside = ((plane < planes) & (i < Hs))[:, None] & (j < Ws)[None, :]
    flat = ((plane * Hs + i) * Ws)[:, None] + j[None, :]
    byte = tl.load(bits_ptr + (flat >> 3), mask=inside, other=0)
    return ((byte.to(tl.int32) >> (flat & 7).to(tl.int32)) & 1).to(tl.float16)


@triton.jit
def _band(offset, bs):
    """1 where 0 <= offset < bs, as float16: the dot operands of the dilation.

    offset = output position - seed position along one axis; a seed at
    position p covers outputs p .. p + bs - 1.
    """
    return ((offset >= 0) & (offset < bs)).to(tl.float16)


@triton.jit
def _dilate_pack_kernel(
    bits_ptr, mask_ptr, count_ptr,
    planes, H, W, Hs, Ws, row_bytes, bs, tiles_h, tiles_w, planes_per_group,
    PLANES: tl.constexpr, ROWS: tl.constexpr, SEED_ROWS: tl.constexpr,
    COLS: tl.constexpr, SEED_COLS: tl.constexpr, COUNT: tl.constexpr, GROUPED: tl.constexpr,
):
    """Writes the keep bits of one tile: PLANES planes x ROWS rows x COLS columns.

    bits_ptr: the seed bitmap of _seed_bits_kernel over (planes, Hs, Ws).
    mask_ptr: (planes, H, row_bytes) uint8. count_ptr: int64 kept counts, (1,)
    or with GROUPED one per run of planes_per_group planes (see _count_kept).
    Tile row r is row h0 + r % ROWS of plane p0 + r // ROWS (PLANES > 1 only
    when one tile spans a whole plane's height, so then h0 = 0); seed chunk row
    s is row sr + s % SEED_ROWS of plane p0 + s // SEED_ROWS. COLS is a
    multiple of 8 and w0 = COLS * tile, so every mask byte has one writer.
    """
    TR: tl.constexpr = PLANES * ROWS
    KR: tl.constexpr = PLANES * SEED_ROWS
    pid = tl.program_id(0)
    tile_w = pid % tiles_w
    tile_h = (pid // tiles_w) % tiles_h
    p0 = (pid // tiles_w // tiles_h).to(tl.int64) * PLANES
    h0 = tile_h * ROWS
    w0 = tile_w * COLS

    r = tl.arange(0, TR)
    out_plane = p0 + r // ROWS
    out_h = h0 + r % ROWS
    out_w = w0 + tl.arange(0, COLS)
    s = tl.arange(0, KR)
    seed_plane = p0 + s // SEED_ROWS
    t = tl.arange(0, SEED_COLS)
    # Row mixing never crosses planes: A is block diagonal over stacked planes.
    same_plane = (r // ROWS)[:, None] == (s // SEED_ROWS)[None, :]

    # Only seeds at rows h0-bs+1 .. h0+ROWS-1 (and likewise columns) reach the tile.
    row_lo = tl.maximum(h0 - bs + 1, 0)
    row_hi = tl.minimum(h0 + ROWS, Hs)
    col_lo = tl.maximum(w0 - bs + 1, 0)
    col_hi = tl.minimum(w0 + COLS, Ws)
    hits = tl.zeros((TR, COLS), dtype=tl.float32)
    for sr in range(row_lo, row_hi, SEED_ROWS):
        seed_i = sr + s % SEED_ROWS
        # Seeds per (seed row, output column): S @ B, summed over column chunks.
        row_hits = tl.zeros((KR, COLS), dtype=tl.float32)
        for sc in range(col_lo, col_hi, SEED_COLS):
            seed_j = sc + t
            seeds = _load_seeds(bits_ptr, seed_plane, seed_i, seed_j, planes, Hs, Ws)
            cols_band = _band(out_w[None, :] - seed_j[:, None], bs)  # (SEED_COLS, COLS)
            row_hits = tl.dot(seeds, cols_band, row_hits)
        # Clamp to 0/1 so the float16 operand is exact however large bs is.
        any_hit = (row_hits > 0).to(tl.float16)
        rows_band = _band(out_h[:, None] - seed_i[None, :], bs) * same_plane.to(tl.float16)  # (TR, KR)
        hits = tl.dot(rows_band, any_hit, hits)

    row_ok = (out_plane < planes) & (out_h < H)
    keep = (hits == 0) & row_ok[:, None] & (out_w < W)[None, :]
    _store_bits(mask_ptr, keep, out_plane, out_h, w0 // 8, H, row_bytes, row_ok, TR, COLS)
    if COUNT:
        _count_kept(count_ptr, keep, p0, planes, planes_per_group, PLANES, ROWS, GROUPED)


@triton.jit
def _count_kept(count_ptr, keep, p0, planes, planes_per_group,
                PLANES: tl.constexpr, ROWS: tl.constexpr, GROUPED: tl.constexpr):
    """Adds the kept bits of a tile (PLANES * ROWS rows from plane p0 on) to their group's count.

    Without GROUPED one atomic adds the tile to count[0]. With it plane p
    counts into count[p // planes_per_group]; stacked planes may belong to
    different groups, so each plane of the tile adds its own sum.
    """
    kept_rows = tl.sum(keep.to(tl.int32), axis=1)
    if GROUPED:
        kept_planes = tl.sum(tl.reshape(kept_rows, (PLANES, ROWS)), axis=1)
        plane = p0 + tl.arange(0, PLANES)
        tl.atomic_add(count_ptr + plane // planes_per_group, kept_planes.to(tl.int64), mask=plane < planes,
                      sem="relaxed")
    else:
        tl.atomic_add(count_ptr, tl.sum(kept_rows).to(tl.int64), sem="relaxed")


@triton.jit
def _store_bits(mask_ptr, keep, plane, h, byte0, H, row_bytes, row_ok, TR: tl.constexpr, COLS: tl.constexpr):
    """Packs keep (TR, COLS) eight columns to a byte (column w -> bit w & 7)."""
    shift = tl.arange(0, COLS) % 8
    bits = keep.to(tl.int32) << shift[None, :]
    packed = tl.sum(tl.reshape(bits, (TR, COLS // 8, 8)), axis=2)
    byte = byte0 + tl.arange(0, COLS // 8)
    offs = ((plane * H + h) * row_bytes)[:, None] + byte[None, :]
    ok = row_ok[:, None] & (byte < row_bytes)[None, :]
    tl.store(mask_ptr + offs, packed.to(tl.uint8), mask=ok)


@triton.jit
def _round_to_bfloat16(value):
    """float32 -> bfloat16, round to nearest even, in integer ops (NaN -> 0x7FC0).

    The same rule as c10::BFloat16 and cvt.rn.bf16.f32, written out because
    the interpreter's ``.to(tl.bfloat16)`` truncates; on a GPU it costs a few
    integer ops in a memory-bound loop.
    """
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(value != value, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_kept(x_ptr, y_ptr, offs, ok, keep, scale, WIDE: tl.constexpr, BFLOAT16: tl.constexpr):
    """y[offs] = keep ? x[offs] * scale : 0, in float32 (float64 when WIDE), rounded to y's dtype.
    A select, not a multiply, so NaN and Inf never reach dropped elements.
    scale None: y = keep ? x : 0 in x's dtype, x's bits untouched (NaN payloads included)."""
    x = tl.load(x_ptr + offs, mask=ok, other=0)
    if scale is None:
        y = tl.where(keep, x, tl.zeros_like(x))
    else:
        if WIDE:
            value = x.to(tl.float64) * scale.to(tl.float64)
        else:
            value = x.to(tl.float32) * scale
        y = tl.where(keep, value, 0.0)
        if BFLOAT16:
            y = _round_to_bfloat16(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _keep_bits(mask_ptr, row, col, rows, inner, C, H, W, row_bytes, mask_sample_rows,
               CHANNELS_LAST: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """(keep, ok) of a (BR, BC) tile of x viewed as (rows, inner), see _apply_kernel.

    Mask byte = (n * mask_sample_rows + cm * H + h) * row_bytes + (w >> 3) with
    cm = c if PER_CHANNEL else 0; mask_sample_rows 0 shares one mask across the
    batch. The index maths runs per row or per column, never per element.
    """
    if CHANNELS_LAST:  # row = (n * H + h) * W + w, col = c
        w = row % W
        nh = row // W
        row_byte = (nh // H * mask_sample_rows + nh % H) * row_bytes + (w >> 3)
        if PER_CHANNEL:
            col_byte = col.to(tl.int64) * H * row_bytes
        else:
            col_byte = tl.zeros_like(col).to(tl.int64)
        byte = row_byte[:, None] + col_byte[None, :]
        bit = (w & 7).to(tl.int32)[:, None]
    else:  # row = (n * C + c) * H + h, col = w
        n = row // H // C
        if PER_CHANNEL:
            plane_row = row - n * C * H  # c * H + h, in int64
        else:
            plane_row = row % H
        mask_row = n * mask_sample_rows + plane_row
        byte = (mask_row * row_bytes)[:, None] + (col >> 3)[None, :]
        bit = (col & 7)[None, :]
    ok = (row < rows)[:, None] & (col < inner)[None, :]
    keep = ((tl.load(mask_ptr + byte, mask=ok, other=0).to(tl.int32) >> bit) & 1) != 0
    return keep, ok


@triton.jit
def _group_scale(scale_ptr, count_ptr, group, numel, kept_per_count, eps_bits, SCALE_MODE: tl.constexpr):
    """The float32 scale of normalisation group(s) ``group`` (an int64 scalar or block).

    SCALE_MODE 0 reads scale[group]; 1 gives 1.0; 2 gives numel / (eps +
    kept_per_count * count[group]) in float64, numel being one group's elements.
    """
    if SCALE_MODE == 0:
        scale = tl.load(scale_ptr + group)
    elif SCALE_MODE == 1:
        scale = tl.full(group.shape, 1.0, tl.float32)
    else:
        kept = (tl.load(count_ptr + group) * kept_per_count).to(tl.float64)
        eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
        scale = (numel.to(tl.float64) / (eps + kept)).to(tl.float32)
    return scale


@triton.jit
def _store_scale(scale_ptr, scale, group, row, rows, rows_per_group, GROUPED: tl.constexpr):
    """Stores the scales an apply computed, each by one program: with GROUPED
    the column-0 program holding a group's first row, else program (0, 0)."""
    if tl.program_id(1) == 0:
        if GROUPED:
            tl.store(scale_ptr + group, scale, mask=(row % rows_per_group == 0) & (row < rows))
        elif tl.program_id(0) == 0:
            tl.store(scale_ptr, scale)


# These scalars are used once per program; do not let a value of 1 become a constexpr.
@triton.jit(do_not_specialize=["numel", "kept_per_count", "eps_bits"])
def _apply_kernel(
    x_ptr, y_ptr, mask_ptr, scale_ptr, count_ptr,
    rows, inner, C, H, W, row_bytes, mask_sample_rows, rows_per_group,
    numel, kept_per_count, eps_bits,
    CHANNELS_LAST: tl.constexpr, PER_CHANNEL: tl.constexpr, SCALE_MODE: tl.constexpr, GROUPED: tl.constexpr,
    WIDE: tl.constexpr, BFLOAT16: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):
    """y = keep ? x * scale : 0 on a (BR, BC) tile of x viewed as (rows, inner).

    x and y share one layout: contiguous NCHW (rows = N*C*H, inner = W) or
    channels_last (rows = N*H*W, inner = C); y may be x (in place). mask: (N,
    C if PER_CHANNEL else 1, H, row_bytes) uint8 with mask_sample_rows = its
    C*H or H, or one (C, H, row_bytes) mask for every sample with 0.
    SCALE_MODE 0 reads scale_ptr (backward); 1 uses 1.0 and 2 computes it from
    the kept counts (see _group_scale), both stored to scale_ptr; 3 is a plain
    select y = keep ? x : 0 in x's dtype (Random Mask). Without GROUPED one
    scale serves the batch; with it row r belongs to group r // rows_per_group
    and scale_ptr, count_ptr hold one value per group. eps_bits: eps's float64
    bits (Triton float arguments are float32). WIDE computes in float64
    (float64 x); BFLOAT16 rounds the result explicitly (bfloat16 x).
    """
    row = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    col = tl.program_id(1) * BC + tl.arange(0, BC)
    keep, ok = _keep_bits(mask_ptr, row, col, rows, inner, C, H, W, row_bytes, mask_sample_rows,
                          CHANNELS_LAST, PER_CHANNEL)
    offs = row[:, None] * inner + col[None, :]
    if SCALE_MODE == 3:
        store_kept(x_ptr, y_ptr, offs, ok, keep, None, WIDE, BFLOAT16)
    else:
        if GROUPED:
            # Rows past the end take the last group, so that no scale or count is read out of bounds.
            group = tl.minimum(row, rows - 1) // rows_per_group
        else:
            group = tl.full((), 0, tl.int64)
        scale = _group_scale(scale_ptr, count_ptr, group, numel, kept_per_count, eps_bits, SCALE_MODE)
        if SCALE_MODE != 0:
            _store_scale(scale_ptr, scale, group, row, rows, rows_per_group, GROUPED)
        if GROUPED:
            scale = scale[:, None]
        store_kept(x_ptr, y_ptr, offs, ok, keep, scale, WIDE, BFLOAT16)


# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _float32(value: float) -> float:
    """value rounded once to float32 (the contract's comparison threshold)."""
    # Uniforms are < 1, so any threshold >= 1 acts alike; clamping avoids overflow.
    return struct.unpack("<f", struct.pack("<f", min(float(value), 2.0)))[0]


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _walkable(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(t or a contiguous copy, whether it is channels_last): the layouts the apply kernel walks."""
    if t.is_contiguous():
        return t, False
    if t.is_contiguous(memory_format=torch.channels_last):
        return t, True
    return t.contiguous(), False


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}")


def _check_feature_map(t: torch.Tensor, name: str) -> None:
    """A floating-point (N, C, H, W) tensor, with the messages of csrc/checks.h."""
    _check_float(t, name)
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got {t.dim()} dimensions")


def _check_forward_args(x: torch.Tensor, gamma: float, block_size: int, eps: float) -> None:
    """The checks of csrc/checks.h, so every backend rejects the same input."""
    _check_feature_map(x, "x")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    limit = min(x.shape[2], x.shape[3])
    if x.numel() > 0 and block_size > limit:
        raise ValueError(f"block_size must be <= min(H, W) = {limit}, got {block_size} (the Python API clamps it)")
    if not gamma >= 0.0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def _check_sample_gamma_args(x: torch.Tensor, sample_gamma: Optional[torch.Tensor], normalize_groups: int) -> None:
    """csrc/checks.h check_sample_gamma_args. The values are not read (no device sync)."""
    N = x.shape[0]
    if sample_gamma is not None:
        if sample_gamma.dtype != torch.float32:
            raise TypeError(f"sample_gamma must be float32, got {sample_gamma.dtype}")
        if sample_gamma.dim() != 1 or sample_gamma.shape[0] != N:
            raise ValueError(f"sample_gamma must have shape (N,) = ({N},), one seed probability per sample, "
                             f"got {list(sample_gamma.shape)}")
        if sample_gamma.device != x.device:
            raise ValueError(f"sample_gamma must be on x's device {x.device}, got {sample_gamma.device}")
    if normalize_groups < 1 or (N > 0 and N % normalize_groups != 0):
        raise ValueError(f"normalize_groups must be >= 1 and divide N = {N}, got {normalize_groups}")


def _check_backward_args(grad_y: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> None:
    _check_feature_map(grad_y, "grad_y")
    if mask.dtype != torch.uint8:
        raise TypeError(f"mask must be uint8, got {mask.dtype}")
    N, C, H, W = grad_y.shape
    if mask.dim() != 4 or mask.shape[0] != N or mask.shape[1] not in (1, C) or mask.shape[2] != H or mask.shape[3] != (W + 7) // 8:
        raise ValueError(
            f"mask must have shape (N, 1 or C, H, ceil(W/8)) for grad_y of shape {tuple(grad_y.shape)}, got {tuple(mask.shape)}"
        )
    if scale.dtype != torch.float32:
        raise TypeError(f"scale must be float32, got {scale.dtype}")
    groups = scale.numel()
    if groups != 1 and not (scale.dim() == 1 and groups >= 1 and (N == 0 or N % groups == 0)):
        raise ValueError(f"scale must hold one value or have shape (G,) with G dividing N = {N}, got {list(scale.shape)}")
    if mask.device != grad_y.device or scale.device != grad_y.device:
        raise ValueError("grad_y, mask and scale must be on one device")


def _draw_seeds(x: torch.Tensor, seed: int, gamma: float, planes: int, Hs: int, Ws: int,
                candidates=None, sample_gamma=None, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches _seed_bits_kernel: the seed bitmap (ceil(planes*Hs*Ws/8),) uint8 and zeroed (groups,) int64 counters.

    candidates: None (DropBlock), or CamDrop's (spatial (N, H*W), channel
    (N, C)) uint8 flags for x (N, C, H, W), with planes = N*C: seeds off them
    are cleared. sample_gamma: None (gamma for every seed) or (N,) float32, the
    seed probability of each sample's planes.
    """
    n_bytes = triton.cdiv(planes * Hs * Ws, 8)
    bits = torch.empty(n_bytes, dtype=torch.uint8, device=x.device)
    count = torch.empty(groups, dtype=torch.int64, device=x.device)
    # Pointers a flag leaves off are never read; bits stands in for them.
    spatial, channel = (bits, bits) if candidates is None else candidates
    per_sample = bits if sample_gamma is None else sample_gamma.contiguous()
    N, C, H, W = x.shape
    sample_seeds = planes // N * Hs * Ws  # Cm * Hs * Ws
    grid = (triton.cdiv(n_bytes, _SEED_BYTES),)
    launch(
        _seed_bits_kernel, grid, bits, count, seed, _float32(gamma), n_bytes, groups,
        per_sample, sample_seeds, spatial, channel, N, C, H, W, Hs, Ws,
        BYTES=_SEED_BYTES, SAMPLE_GAMMA=sample_gamma is not None, FILTER=candidates is not None,
    )
    return bits, count


def _mask_tiling(H: int, W: int, Hs: int, Ws: int) -> dict:
    """Tile shape of _dilate_pack_kernel (all powers of two, dot operands >= 16).

    Planes at most 32 rows high are stacked _TILE // next_pow2(H) to a tile;
    taller ones are cut into _TILE-row tiles. Seed chunks are just big enough
    for a plane's seed grid, up to _TILE.
    """
    rows = _next_pow2(H)
    if rows <= _TILE // 2:
        planes_per_tile = _TILE // rows
        seed_rows = max(_next_pow2(Hs), 16 // planes_per_tile)
    else:
        planes_per_tile, rows = 1, _TILE
        seed_rows = min(_TILE, max(16, _next_pow2(Hs)))
    return dict(
        PLANES=planes_per_tile,
        ROWS=rows,
        SEED_ROWS=seed_rows,
        COLS=min(_TILE, max(16, _next_pow2(W))),
        SEED_COLS=min(_TILE, max(16, _next_pow2(Ws))),
    )


def _build_mask(bits, count, mask, planes, H, W, bs, normalize) -> None:
    """Launches _dilate_pack_kernel over mask (planes, H, ceil(W/8)) uint8, counting into count (G,)."""
    Hs, Ws = H - bs + 1, W - bs + 1
    tiling = _mask_tiling(H, W, Hs, Ws)
    tiles_h = triton.cdiv(H, tiling["ROWS"])
    tiles_w = triton.cdiv(W, tiling["COLS"])
    grid = (triton.cdiv(planes, tiling["PLANES"]) * tiles_h * tiles_w,)
    groups = count.numel()
    launch(
        _dilate_pack_kernel, grid, bits, mask, count,
        planes, H, W, Hs, Ws, mask.shape[-1], bs, tiles_h, tiles_w, planes // groups,
        COUNT=normalize, GROUPED=groups > 1, num_warps=_MASK_WARPS, **tiling,
    )


# _apply_kernel's SCALE_MODE: where the scale comes from.
SCALE_READ, SCALE_ONE, SCALE_FROM_COUNT, NO_SCALE = 0, 1, 2, 3


def _mask_layout(mask: torch.Tensor, C: int, H: int) -> tuple[bool, int]:
    """(PER_CHANNEL, mask_sample_rows) of _apply_kernel for a block mask (N, Cm, H, B)
    or for one mask (C, H, B) shared by the batch (no rows per sample)."""
    if mask.dim() == 3:
        return True, 0
    return mask.shape[1] == C, mask.shape[1] * H


def _apply(src, channels_last, mask, scale, count, scale_mode, kept_per_count=1, eps=0.0, out=None) -> torch.Tensor:
    """Launches _apply_kernel: keep ? src * scale : 0 in src's layout (contiguous or channels_last).

    mask: contiguous, (N, Cm, H, ceil(W/8)) or (C, H, ceil(W/8)) for every
    sample. scale: () or (G,) float32 (G groups of N/G samples), written
    unless scale_mode is SCALE_READ; None with NO_SCALE. count: (G,) int64 kept
    counts for SCALE_FROM_COUNT, else unused (None). out: y, a new tensor when
    None; src itself applies in place.
    """
    N, C, H, W = src.shape
    out = torch.empty_like(src) if out is None else out
    # Pointers the scale mode leaves unread get a stand-in.
    scale = mask if scale is None else scale
    count = scale if count is None else count
    groups = 1 if scale_mode == NO_SCALE else scale.numel()
    if channels_last:
        rows, inner, max_cols = N * H * W, C, _CL_CHANNELS
    else:
        rows, inner, max_cols = N * C * H, W, _APPLY_BLOCK
    cols = min(_next_pow2(inner), max_cols)
    block_rows = max(1, _APPLY_BLOCK // cols)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(inner, cols))
    per_channel, mask_sample_rows = _mask_layout(mask, C, H)
    launch(
        _apply_kernel, grid, src, out, mask, scale, count,
        rows, inner, C, H, W, mask.shape[-1], mask_sample_rows, rows // groups,
        src.numel() // groups, kept_per_count, _float64_bits(eps),
        CHANNELS_LAST=channels_last, PER_CHANNEL=per_channel, SCALE_MODE=scale_mode, GROUPED=groups > 1,
        WIDE=src.dtype == torch.float64, BFLOAT16=src.dtype == torch.bfloat16,
        BR=block_rows, BC=cols, num_warps=_APPLY_WARPS,
    )
    return out


def _scale_shape(groups: int) -> tuple:
    """The forward's scale: 0-d for one group (as before groups existed), else (groups,)."""
    return () if groups == 1 else (groups,)


def _empty_scale(x: torch.Tensor, normalize: bool, eps: float, groups: int = 1) -> torch.Tensor:
    """The scale when x has no elements: 0 / (eps + 0) as the CPU op computes it."""
    value = (0.0 if eps > 0 else float("nan")) if normalize else 1.0
    return torch.full(_scale_shape(groups), value, dtype=torch.float32, device=x.device)


def _empty_forward(src: torch.Tensor, mask_channels: int, normalize: bool, eps: float, groups: int = 1):
    """(y, mask, scale) of an x with no elements: an all-zero mask (N, Cm, H, ceil(W/8))."""
    N, _, H, W = src.shape
    mask = torch.zeros((N, mask_channels, H, (W + 7) // 8), dtype=torch.uint8, device=src.device)
    return torch.empty_like(src), mask, _empty_scale(src, normalize, eps, groups)


def _drop_blocks(src, channels_last, seed, gamma, bs, mask_channels, normalize, eps, candidates=None,
                 sample_gamma=None, groups=1):
    """Seeds, keep mask, counts and apply on a non-empty src: (y, mask, scale).

    src (N, C, H, W) contiguous or channels_last; mask (N, mask_channels, H,
    ceil(W/8)) uint8; scale () float32, or (groups,) for groups consecutive
    runs of N/groups samples each normalised by its own kept count.
    candidates, sample_gamma: see _draw_seeds. Three launches, no host
    synchronisation.
    """
    N, C, H, W = src.shape
    planes = N * mask_channels
    mask = torch.empty((N, mask_channels, H, (W + 7) // 8), dtype=torch.uint8, device=src.device)
    scale = torch.empty(_scale_shape(groups), dtype=torch.float32, device=src.device)
    bits, count = _draw_seeds(src, seed, gamma, planes, H - bs + 1, W - bs + 1, candidates, sample_gamma, groups)
    _build_mask(bits, count, mask, planes, H, W, bs, normalize)
    # Coupled: one mask plane serves all C channels, so each kept bit counts C times.
    scale_mode = SCALE_FROM_COUNT if normalize else SCALE_ONE
    y = _apply(src, channels_last, mask, scale, count, scale_mode, C // mask_channels, eps)
    return y, mask, scale


@register_op("robustdrop::block_mask_forward_triton", _apply_kernel)
def block_mask_forward(
    x: torch.Tensor, seed: int, gamma: float, block_size: int, couple_channels: bool, normalize: bool, eps: float,
    sample_gamma: Optional[torch.Tensor] = None, normalize_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DropBlock forward: ``(y, mask, scale)`` as ``robustdrop::block_mask_forward``.

    x: (N, C, H, W) float16/bfloat16/float32/float64, contiguous or
    channels_last (other strides are copied to contiguous first).
    seed: signed 64-bit. gamma: seed probability (rounded to float32 once),
    ignored when sample_gamma, (N,) float32 on x's device, gives each sample
    its own. block_size: bs, already <= min(H, W). normalize_groups G divides
    N: consecutive runs of N/G samples are normalised by their own kept count.
    Returns y (x's shape, dtype and layout), mask (N, 1 if couple_channels
    else C, H, ceil(W/8)) uint8 and scale, float32 on x's device: 0-d for
    G = 1, else (G,).
    """
    _check_forward_args(x, gamma, block_size, eps)
    _check_sample_gamma_args(x, sample_gamma, normalize_groups)
    src, channels_last = _walkable(x)
    mask_channels = 1 if couple_channels else src.shape[1]
    if src.numel() == 0:
        return _empty_forward(src, mask_channels, normalize, eps, normalize_groups)
    return _drop_blocks(src, channels_last, seed, gamma, block_size, mask_channels, normalize, eps,
                        sample_gamma=sample_gamma, groups=normalize_groups)


@register_op("robustdrop::block_mask_backward_triton", _apply_kernel)
def block_mask_backward(grad_y: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DropBlock backward: ``grad_x[n] = keep ? grad_y[n] * scale[n // (N/G)] : 0``.

    grad_y: (N, C, H, W) floating point; mask: (N, 1 or C, H, ceil(W/8))
    uint8 and scale: one float32 value or (G,) with G dividing N, both from
    the forward pass. The scale is read on the device, so nothing waits for
    the GPU. Returns grad_x in grad_y's dtype and layout.
    """
    _check_backward_args(grad_y, mask, scale)
    src, channels_last = _walkable(grad_y)
    if src.numel() == 0:
        return torch.empty_like(src)
    scale = scale.reshape(()) if scale.numel() == 1 else scale.contiguous()
    return _apply(src, channels_last, mask.contiguous(), scale, None, SCALE_READ)
