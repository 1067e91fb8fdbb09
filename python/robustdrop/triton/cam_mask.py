"""CamDrop's block mask in Triton (DESIGN.md 4.2), bit-identical to the reference.

Shapes: x (N, C, H, W); weight (K, C') with C' = g*C; target (N,) int64;
guided None or one bool; bs = block_size <= min(H, W); Hs, Ws = H-bs+1, W-bs+1.

    a[n, c]        = sum_{j=0..g-1} float32(weight[t_n, c*g + j])      (N, C) float32, in order j = 0, 1, ...
    cam[n, h*W+w]  = sum_c a[n, c] * float32(x[n, c, h, w])            (N, H*W) float32
    spatial[n, p]  = p is among the spatial_topk largest cam[n, :]     (N, H*W) uint8
    channel[n, c]  = c is among the channel_topk largest a[n, :]       (N, C) uint8
    seed[n, c, i, j] = uniform(seed, ((n*C + c)*Hs + i)*Ws + j) < float32(gamma)
                       and spatial[n, i*W + j] and channel[n, c]
    then keep mask, count, scale and y exactly as DropBlock (block_mask.py),
    so that guided = False (every position and channel a candidate) is DropBlock.

t_n = target[n] clamped into [0, K-1] so that no value can read out of bounds
(the Python API checks the values in eager mode). "Largest" orders float32
values by a uint32 key (NaN above +inf, -0.0 equal to +0.0) and breaks ties
toward the lower index; a guided of False makes every element a candidate.

Five launches, no host synchronisation:

1. ``_cam_kernel``, a flat grid of N * cdiv(H*W, BLOCK_P) programs: one tile
   of cam, looping over C in chunks of BLOCK_C. Every tile recomputes a from
   the class row (g*C values that stay in cache) rather than waiting on
   another launch; tile 0 stores it. x is contiguous or channels_last: either
   way position p = h*W + w sits at p * stride_p, so one (stride_c, stride_p)
   pair, (H*W, 1) or (1, C), walks both, coalesced along positions or along
   channels.
2. ``_select_kernel``, grid (N, 2): program (n, 0) ranks cam[n], (n, 1) ranks
   a[n]. A radix select over the 32-bit keys (four 8-bit digits, one
   histogram pass each) finds the k-th largest key T and r = k - #(keys > T),
   the number of keys equal to T to take; a fifth pass writes the flags,
   taking the first r ties in index order (a cumsum per tile plus a running
   count). Every pass streams the row in tiles from memory, so any H*W or C
   works; nothing is sorted.
3. ``_seed_bits_kernel`` (block_mask.py) with FILTER: DropBlock's seed bitmap
   with the seeds off the candidates cleared.
4. ``_dilate_pack_kernel`` and 5. ``_apply_kernel`` (block_mask.py), unchanged.

Passes over x-sized data: two reads of x and one write of y. The CAM needs
every channel of a sample before any position can be ranked, so it reads x
once on its own; selection and seeds touch only the N*H*W + N*C flags and the
seed bits. The apply must read x again and write y because the scale depends
on the kept count of the whole batch, known only after every mask is built.
DropBlock needs 1 read + 1 write. With guided False the CAM's x loads are
masked off, so that call reads x once.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import block_mask
from .philox import launch, register_op, sample_and_tile

# The top-k selections count a row's elements in int32: rows (H*W positions, C channels) stay below this.
_MAX_ROW = 2**31

# CAM tile: at most this many elements of x per step (channels x positions),
# and along the axis that is contiguous in memory at most 256 positions
# (contiguous x) or 64 channels (channels_last x): whole 128-byte lines.
_CAM_TILE = 4096
_CAM_RUN = {False: 256, True: 64}
_CAM_WARPS = 4
# Elements per tile of the selection passes, and its warps.
_SELECT_BLOCK = 1024
_SELECT_WARPS = 4


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _class_weights(w_row, c, c_ok, groups, stride_wc):
    """a (BLOCK_C,) float32 = sum_{j < groups} float32(w_row[(c*groups + j) * stride_wc]), in order of j."""
    col = c * groups
    a = tl.load(w_row + col * stride_wc, mask=c_ok, other=0.0).to(tl.float32)
    for j in range(1, groups):
        a += tl.load(w_row + (col + j) * stride_wc, mask=c_ok, other=0.0).to(tl.float32)
    return a


@triton.jit
def _guided(guided_ptr, HAS_GUIDED: tl.constexpr):
    """Whether the candidates follow the CAM: guided's value, True when it is absent."""
    if HAS_GUIDED:
        return tl.load(guided_ptr) != 0
    else:
        return True


@triton.jit
def _cam_kernel(
    x_ptr, weight_ptr, target_ptr, guided_ptr, cam_ptr, a_ptr,
    C, HW, K, groups, tiles,
    stride_xc, stride_xp, stride_wk, stride_wc, stride_t,
    HAS_GUIDED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """cam[n, p] for one tile of BLOCK_P positions p of sample n; tiles per sample.

    x: (N, C, H*W), sample n at n*C*HW, element (c, p) at c*stride_xc +
    p*stride_xp; weight: (K, groups*C) at strides (stride_wk, stride_wc);
    target: (N,) int64 at stride_t. cam_ptr: (N, HW) float32; a_ptr: (N, C)
    float32, written by tile 0.
    """
    n, tile = sample_and_tile(tiles)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    # With guided False the cam is never ranked: read no x at all.
    read_x = p < tl.where(_guided(guided_ptr, HAS_GUIDED), HW, 0)
    # Clamped so that a bad class index cannot read outside weight.
    row = tl.minimum(tl.maximum(tl.load(target_ptr + n * stride_t), 0), K - 1)
    w_row = weight_ptr + row * stride_wk
    x_row = x_ptr + n * C * HW
    # Partial sums per (channel lane, position); one cross-thread reduction at the end.
    partial = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        a = _class_weights(w_row, c, c_ok, groups, stride_wc)
        if tile == 0:
            tl.store(a_ptr + n * C + c, a, mask=c_ok)
        # int64: one sample may hold more than 2**31 elements.
        offs = c.to(tl.int64)[:, None] * stride_xc + p.to(tl.int64)[None, :] * stride_xp
        x = tl.load(x_row + offs, mask=c_ok[:, None] & read_x[None, :], other=0.0)
        partial += a[:, None] * x.to(tl.float32)
    tl.store(cam_ptr + n * HW + p, tl.sum(partial, axis=0), mask=p_ok)


@triton.jit
def _ordered_key(value):
    """uint32 keys whose unsigned order is the float32 order of value.

    -0.0 maps to +0.0's key and every NaN to 0xFFFFFFFF, above +inf. Positive
    floats get the sign bit set, negatives all bits flipped (their bit
    patterns grow as the value falls).
    """
    bits = value.to(tl.uint32, bitcast=True)
    bits = tl.where(value == 0.0, 0, bits)
    key = bits ^ tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000)
    return tl.where(value != value, 0xFFFFFFFF, key)


@triton.jit
def _load_keys(values_ptr, start, length, BLOCK: tl.constexpr):
    """(offs, ok, key) of the tile [start, start + BLOCK) of a float32 row of length elements."""
    offs = start + tl.arange(0, BLOCK)
    ok = offs < length
    return offs, ok, _ordered_key(tl.load(values_ptr + offs, mask=ok, other=0.0))


@triton.jit
def _kth_largest_key(values_ptr, length, k, BLOCK: tl.constexpr):
    """(T, r): T the k-th largest key of the row, r = k - #(keys > T) >= 1 ties to take.

    Radix select, most significant byte first: among the keys that share the
    digits found so far, histogram the next byte and keep the highest digit at
    or above which at least r keys remain. For 0 < k <= length (the caller
    skips the search for k = 0 and k = length).
    """
    prefix = tl.full((), 0, dtype=tl.uint32)
    remaining = tl.full((), 0, dtype=tl.int32) + k
    digits = tl.arange(0, 256)
    for d in tl.static_range(4):
        shift = 24 - 8 * d  # a constexpr: d is one
        hist = tl.zeros((256,), dtype=tl.int32)
        for start in range(0, length, BLOCK):
            offs, ok, key = _load_keys(values_ptr, start, length, BLOCK)
            # Same digits as prefix above this byte (prefix is zero from here down).
            match = ok & (((key ^ prefix) >> shift) < 256)
            hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=match)
        at_or_above = tl.cumsum(hist, 0, reverse=True)
        digit = tl.max(tl.where(at_or_above >= remaining, digits, 0))
        remaining -= tl.sum(tl.where(digits > digit, hist, 0))
        prefix |= digit.to(tl.uint32) << shift
    return prefix, remaining


@triton.jit
def _top_k_flags(values_ptr, flags_ptr, length, k, BLOCK: tl.constexpr):
    """flags[i] = 1 iff element i is among the k largest of the row (ties to the lower index).

    values_ptr: (length,) float32; flags_ptr: (length,) uint8.
    """
    if (k > 0) & (k < length):
        threshold, ties = _kth_largest_key(values_ptr, length, k, BLOCK)
    else:  # none or all: no key is above 0xFFFFFFFF, every key is above 0 (-inf's is 0x007FFFFF)
        threshold = tl.where(k > 0, 0, 0xFFFFFFFF).to(tl.uint32)
        ties = tl.full((), 0, dtype=tl.int32)
    seen = tl.full((), 0, dtype=tl.int32)  # ties in earlier tiles
    for start in range(0, length, BLOCK):
        offs, ok, key = _load_keys(values_ptr, start, length, BLOCK)
        tied = ok & (key == threshold)
        rank = seen + tl.cumsum(tied.to(tl.int32), 0)  # 1-based among ties
        take = (key > threshold) | (tied & (rank <= ties))
        tl.store(flags_ptr + offs, take.to(tl.uint8), mask=ok)
        seen += tl.sum(tied.to(tl.int32))


@triton.jit
def _select_kernel(
    cam_ptr, a_ptr, guided_ptr, spatial_ptr, channel_ptr,
    HW, C, spatial_topk, channel_topk,
    HAS_GUIDED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Candidate flags of sample n = program_id(0): spatial (axis 1 = 0) or channel (1).

    cam_ptr, spatial_ptr: (N, HW) float32 / uint8; a_ptr, channel_ptr: (N, C).
    With guided False k is the whole row: everything is a candidate.
    """
    n = tl.program_id(0).to(tl.int64)
    guided = _guided(guided_ptr, HAS_GUIDED)
    if tl.program_id(1) == 0:
        k = tl.where(guided, spatial_topk, HW)
        _top_k_flags(cam_ptr + n * HW, spatial_ptr + n * HW, HW, k, BLOCK)
    else:
        k = tl.where(guided, channel_topk, C)
        _top_k_flags(a_ptr + n * C, channel_ptr + n * C, C, k, BLOCK)


# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------


def _check_forward_args(x, weight, target, guided, gamma, block_size, spatial_topk, channel_topk, eps) -> None:
    """The checks of csrc/checks.h check_cam_mask_forward_args, with its messages."""
    block_mask._check_forward_args(x, gamma, block_size, eps)
    N, C, H, W = x.shape
    if C < 1:
        raise ValueError(f"x must have at least one channel, got shape {list(x.shape)}")
    if H * W >= _MAX_ROW or C >= _MAX_ROW:
        raise ValueError(f"x must have fewer than 2**31 positions per map (H*W) and channels (C), got shape {list(x.shape)}")
    block_mask._check_float(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (K, C'), the classifier's weight, got {weight.dim()} dimensions")
    if weight.shape[1] < C or weight.shape[1] % C != 0:
        raise ValueError(f"weight must have a width C' that is a multiple of x's channels C = {C}, got C' = {weight.shape[1]}")
    if N > 0 and weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one class (row), got shape {list(weight.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 (torch.long), got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != N:
        raise ValueError(f"target must have shape (N,) = ({N},), one class index per sample, got {list(target.shape)}")
    if weight.device != x.device or target.device != x.device:
        raise ValueError(f"weight and target must be on x's device {x.device}, got {weight.device} and {target.device}")
    if guided is not None:
        if guided.dtype != torch.bool:
            raise TypeError(f"guided must be a bool tensor, got {guided.dtype}")
        if guided.numel() != 1 or guided.device != x.device:
            raise ValueError("guided must be one bool on x's device")
    if not 0 <= spatial_topk <= H * W:
        raise ValueError(f"spatial_topk must be in [0, H*W] = [0, {H * W}], got {spatial_topk}")
    if not 0 <= channel_topk <= C:
        raise ValueError(f"channel_topk must be in [0, C] = [0, {C}], got {channel_topk}")


def _guided_arg(guided, stand_in: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(pointer argument, HAS_GUIDED): guided's byte, or stand_in (never read) when absent."""
    if guided is None:
        return stand_in, False
    return guided.view(torch.uint8), True


def _cam_tiling(C: int, HW: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of _cam_kernel: the contiguous axis first, the other filling the tile.

    Small maps (7x7) then take more channels per step, and channels_last x with
    few channels more positions, instead of leaving most of the tile masked.
    """
    pow2 = block_mask._next_pow2
    if channels_last:
        block_c = min(pow2(C), _CAM_RUN[True])
        return min(pow2(HW), _CAM_TILE // block_c), block_c
    block_p = min(pow2(HW), _CAM_RUN[False])
    return block_p, min(pow2(C), _CAM_TILE // block_p)


def _class_activation_map(src, channels_last, weight, target, guided) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches _cam_kernel: cam (N, H*W) and a (N, C), both float32, for a non-empty src."""
    N, C, H, W = src.shape
    cam = torch.empty((N, H * W), dtype=torch.float32, device=src.device)
    a = torch.empty((N, C), dtype=torch.float32, device=src.device)
    guided_ptr, has_guided = _guided_arg(guided, target)
    block_p, block_c = _cam_tiling(C, H * W, channels_last)
    tiles = triton.cdiv(H * W, block_p)
    # The strides follow from the layout: a size-1 dimension's stride in src is arbitrary.
    stride_c, stride_p = (1, C) if channels_last else (H * W, 1)
    launch(
        _cam_kernel, (N * tiles,), src, weight, target, guided_ptr, cam, a,
        C, H * W, weight.shape[0], weight.shape[1] // C, tiles,
        stride_c, stride_p, weight.stride(0), weight.stride(1), target.stride(0),
        HAS_GUIDED=has_guided, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_CAM_WARPS,
    )
    return cam, a


def _select_candidates(cam, a, guided, spatial_topk, channel_topk) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches _select_kernel: spatial (N, H*W) and channel (N, C) uint8 candidate flags."""
    (N, HW), C = cam.shape, a.shape[1]
    spatial = torch.empty((N, HW), dtype=torch.uint8, device=cam.device)
    channel = torch.empty((N, C), dtype=torch.uint8, device=cam.device)
    guided_ptr, has_guided = _guided_arg(guided, spatial)
    block = min(block_mask._next_pow2(max(HW, C)), _SELECT_BLOCK)
    launch(
        _select_kernel, (N, 2), cam, a, guided_ptr, spatial, channel,
        HW, C, spatial_topk, channel_topk,
        HAS_GUIDED=has_guided, BLOCK=block, num_warps=_SELECT_WARPS,
    )
    return spatial, channel


@register_op("robustdrop::cam_mask_forward_triton", _cam_kernel)
def cam_mask_forward(
    x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, guided: Optional[torch.Tensor], seed: int,
    gamma: float, block_size: int, spatial_topk: int, channel_topk: int, normalize: bool, eps: float,
    sample_gamma: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CamDrop forward: ``(y, mask, scale)`` as ``robustdrop::cam_mask_forward``.

    x: (N, C, H, W) float16/bfloat16/float32/float64, contiguous or
    channels_last (other strides are copied to contiguous first). weight:
    (K, g*C) floating point, any strides; target: (N,) int64; guided: None or
    one bool on x's device (False: plain DropBlock). seed: signed 64-bit;
    gamma: seed probability (rounded to float32 once), ignored when
    sample_gamma, (N,) float32 on x's device, gives each sample its own;
    block_size: bs, already
    <= min(H, W); 0 <= spatial_topk <= H*W; 0 <= channel_topk <= C. Returns y
    (x's shape, dtype and layout), mask (N, C, H, ceil(W/8)) uint8 and scale,
    a 0-d float32 tensor on x's device.
    """
    _check_forward_args(x, weight, target, guided, gamma, block_size, spatial_topk, channel_topk, eps)
    block_mask._check_sample_gamma_args(x, sample_gamma, 1)
    src, channels_last = block_mask._walkable(x)
    C = src.shape[1]
    if src.numel() == 0:
        return block_mask._empty_forward(src, C, normalize, eps)
    cam, a = _class_activation_map(src, channels_last, weight, target, guided)
    candidates = _select_candidates(cam, a, guided, spatial_topk, channel_topk)
    return block_mask._drop_blocks(src, channels_last, seed, gamma, block_size, C, normalize, eps, candidates,
                                   sample_gamma=sample_gamma)
