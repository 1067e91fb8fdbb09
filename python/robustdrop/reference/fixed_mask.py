"""Random Mask (DESIGN.md 4.4), the naive way: how the fixed keep mask is drawn
from the shared RNG, and how it is applied.

Shapes: x (N, C, H, W); keep (C, H, W) bool, the same for every sample; its
packed form (C, H, ceil(W/8)) uint8 holds keep[c, h, w] in bit w % 8 of byte
w // 8 (reference.block_mask.pack_keep_mask).
"""
import torch

from robustdrop.reference.block_mask import output_memory_format, unpack_keep_mask
from robustdrop.reference.philox import philox_uniform

__all__ = ["MODES", "dropped_count", "random_keep_mask", "fixed_mask_apply", "naive_fixed_mask"]

MODES = ("random", "same", "channel")


def dropped_count(ratio: float, size: int) -> int:
    """round(ratio * size), Python's round (half to even, as numpy's)."""
    return round(ratio * size)


def _keep_all_but_lowest(uniform: torch.Tensor, count: int) -> torch.Tensor:
    """False at the ``count`` smallest values of each row of uniform (R, L), ties to the lower index."""
    order = torch.argsort(uniform, dim=1, stable=True)
    keep = torch.ones_like(uniform, dtype=torch.bool)
    keep.scatter_(1, order[:, :count], False)
    return keep


def random_keep_mask(shape: tuple, ratio: float, *, mode: str = "random", per_channel: bool = True,
                     seed: int, uniform=philox_uniform) -> torch.Tensor:
    """The Random Mask keep mask (C, H, W) bool for seed ``seed``, on the CPU.

    ``uniform(index, seed)`` is the RNG of DESIGN.md section 3; the default is
    the reference's, and any backend's (the compiled ``philox_uniform`` op) gives
    the same bits, faster.

    u(i) = uniform(seed, i) (DESIGN.md section 3), and the positions of smallest u are dropped:

    - ``random``, per_channel: u over (C, H, W) flat indices; in every channel the
      round(ratio*H*W) smallest are dropped.
    - ``random``, not per_channel: round(ratio*C*H*W) dropped over the whole tensor
      (the authors' code).
    - ``same``: u over (H, W) flat indices; round(ratio*H*W) positions dropped in every channel.
    - ``channel``: u over (C,); round(ratio*C) whole channels dropped.
    """
    channels, height, width = shape
    plane = height * width
    if mode == "channel":
        values = uniform(torch.arange(channels, dtype=torch.int64), seed).view(1, channels)
        keep = _keep_all_but_lowest(values, dropped_count(ratio, channels))
        return keep.view(channels, 1, 1).expand(channels, height, width).clone()
    if mode == "same":
        values = uniform(torch.arange(plane, dtype=torch.int64), seed).view(1, plane)
        keep = _keep_all_but_lowest(values, dropped_count(ratio, plane))
        return keep.view(1, height, width).expand(channels, height, width).clone()
    values = uniform(torch.arange(channels * plane, dtype=torch.int64), seed)
    if per_channel:
        keep = _keep_all_but_lowest(values.view(channels, plane), dropped_count(ratio, plane))
    else:
        keep = _keep_all_but_lowest(values.view(1, -1), dropped_count(ratio, channels * plane))
    return keep.view(channels, height, width)


def fixed_mask_apply(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference of robustdrop::fixed_mask_apply: keep[c, h, w] ? x[n, c, h, w] : 0.

    x (N, C, H, W); mask (C, H, ceil(W/8)) uint8. A select, so NaN and Inf never
    reach dropped positions; y has x's dtype and layout and is differentiable through torch ops.
    """
    layout = output_memory_format(x)
    # keep (1, C, H, W) in x's layout, so that autograd's gradient keeps that layout as well.
    keep = unpack_keep_mask(mask, x.shape[-1]).to(x.device).unsqueeze(0).contiguous(memory_format=layout)
    y = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return y.contiguous(memory_format=layout)


def naive_fixed_mask(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The benchmark's naive baseline: ``x * keep`` with keep a (C, H, W) tensor of x's dtype."""
    return x * keep
