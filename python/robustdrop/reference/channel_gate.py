"""Per-sample channel gates (EWS subnets), the plain way: the executable
specification that every backend of ``robustdrop.ews.channel_gate`` is tested
against.

Shapes: x (N, C) or (N, C, *spatial); keep (N, C) bool; the packed form of
keep is (N, ceil(C/8)) uint8, channel c in bit c % 8 of byte c // 8 (the
channel mask of robustdrop::channel_mask_backward, see feature_density.py)::

    y[n, c, ...] = keep[n, c] ? x[n, c, ...] : 0

A select, not a multiply: NaN and Inf in x never reach a dropped channel, and
a kept value is returned to the bit (its sign, -0.0 included).
"""
import torch

from robustdrop.reference import block_mask

__all__ = ["channel_gate", "pack_channel_keep", "unpack_channel_keep", "channel_gate_packed"]


def channel_gate(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """keep[n, c] ? x[n, c, ...] : 0 for x (N, C, ...) and keep (N, C) bool, in x's dtype and layout."""
    extra = (1,) * (x.dim() - 2)
    y = torch.where(keep.to(x.device).view(*keep.shape, *extra), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return y.contiguous(memory_format=block_mask.output_memory_format(x))


def pack_channel_keep(keep: torch.Tensor) -> torch.Tensor:
    """Bit-pack keep (N, C) bool into (N, ceil(C/8)) uint8: bit c % 8 of byte c // 8; padding bits 0."""
    return block_mask.pack_keep_mask(keep)


def unpack_channel_keep(mask: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of pack_channel_keep: (N, ceil(C/8)) uint8 -> (N, C) bool; padding bits are ignored."""
    return block_mask.unpack_keep_mask(mask, channels)


def channel_gate_packed(x: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference of the fused call ``robustdrop::channel_mask_backward(x, mask, scale)`` with the
    0-d float32 scale 1.0 that channel_gate passes: channel_gate on the unpacked mask (scale is
    not read; a scale of 1.0 leaves every kept value as it is)."""
    return channel_gate(x, unpack_channel_keep(mask, x.shape[1]))
