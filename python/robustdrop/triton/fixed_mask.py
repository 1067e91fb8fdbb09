"""Random Mask's apply in Triton (DESIGN.md 4.4), bit-identical to the reference.

For x (N, C, H, W) and one packed keep mask (C, H, ceil(W/8)) uint8 shared by
every sample (bit w & 7 of byte w >> 3 of row (c, h) is keep[c, h, w]):

    y[n, c, h, w] = keep[c, h, w] ? x[n, c, h, w] : 0

a select in x's dtype, no scale: x's bits pass unchanged (NaN payloads
included) and dropped elements are +0.0. This is DropBlock's apply kernel
(block_mask._apply_kernel) with a mask that has no rows per sample and no
scale: one read of x, one of the mask bytes (C*H*W bits, reread from cache
for every sample) and one write of y. Contiguous and channels_last x are
walked directly; other strides go through a contiguous copy.
"""

import torch

from . import block_mask
from .philox import register_op


def _check_args(x: torch.Tensor, mask: torch.Tensor) -> None:
    """csrc/checks.h check_fixed_mask_args, with its messages."""
    block_mask._check_feature_map(x, "x")
    if mask.dtype != torch.uint8:
        raise TypeError(f"mask must be uint8, got {mask.dtype}")
    C, H, W = x.shape[1:]
    row_bytes = (W + 7) // 8
    if tuple(mask.shape) != (C, H, row_bytes):
        raise ValueError(f"mask must have shape (C, H, ceil(W/8)) = ({C}, {H}, {row_bytes}) for x of shape "
                         f"{list(x.shape)}, got {list(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask must be on x's device {x.device}, got {mask.device}")


def _select_kept(src: torch.Tensor, channels_last: bool, mask: torch.Tensor, out=None) -> torch.Tensor:
    """keep ? src : 0 for a non-empty src in its layout, into out (a new tensor when None; src itself in place)."""
    return block_mask._apply(src, channels_last, mask.contiguous(), None, None, block_mask.NO_SCALE, out=out)


@register_op("robustdrop::fixed_mask_apply_triton", block_mask._apply_kernel)
def fixed_mask_apply(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Random Mask apply: ``y[n] = keep ? x[n] : 0`` as ``robustdrop::fixed_mask_apply``.

    x: (N, C, H, W) float16/bfloat16/float32/float64, any strides; mask:
    (C, H, ceil(W/8)) uint8 on x's device, the same for every sample. Returns
    y with x's dtype, channels_last when x is, else contiguous.
    """
    _check_args(x, mask)
    src, channels_last = block_mask._walkable(x)
    if src.numel() == 0:
        return torch.empty_like(src)
    return _select_kept(src, channels_last, mask)


@register_op("robustdrop::fixed_mask_apply_triton_", block_mask._apply_kernel, mutates_args=("x",))
def fixed_mask_apply_(x: torch.Tensor, mask: torch.Tensor) -> None:
    """In-place Random Mask apply: every element of x becomes ``keep ? x : 0``.

    Same arguments as ``fixed_mask_apply``. Contiguous and channels_last x are
    written directly (each element is read and written by the same program);
    other strides are computed on a contiguous copy and copied back.
    """
    _check_args(x, mask)
    if x.numel() == 0:
        return
    src, channels_last = block_mask._walkable(x)
    _select_kept(src, channels_last, mask, out=src)
    if src is not x:
        x.copy_(src)
