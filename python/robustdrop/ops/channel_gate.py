"""Per-sample channel gates (EWS subnets, robustdrop.ews): the functional API and
the dispatch to the four backends.

No kernel of its own: ``y[n, c] = keep[n, c] ? x[n, c] : 0`` is the channel-mask
apply of feature-density dropout, ``robustdrop::channel_mask_backward(x, mask,
scale)`` (CPU and CUDA kernels; ``channel_mask_backward_triton``), called with
the keep mask bit-packed to (N, ceil(C/8)) uint8 (bit c % 8 of byte c // 8) and
a 0-d float32 scale of 1.0, which every backend's apply takes as a plain
select (no multiply: a multiply by 1.0 would quiet a signalling NaN, and a
float32 round trip would canonicalise a bfloat16 NaN), so kept values keep
their bits, NaN payloads included, and all backends agree with the
reference's torch.where exactly. The op is linear and
self-adjoint in x and its autograd (every order of backward, the same op on the
packed mask) is registered with feature-density dropout's ops; only the packed
mask, N*C bits, and the 0-d scale are saved for the backward.
"""
import math

import torch

from robustdrop import _backend
from robustdrop.reference import channel_gate as reference

__all__ = ["channel_gate"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def channel_gate(x: torch.Tensor, keep: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Zero the channels a per-sample keep mask drops: ``y[n, c, ...] = keep[n, c] ? x[n, c, ...] : 0``.

    No rescale (a subnet's channels are removed, not dropped out). A select,
    not a multiply: NaN and Inf in x never reach a dropped channel.

    Args:
        x: (N, C) features or (N, C, *spatial) maps, floating point (float16,
            bfloat16, float32, float64), any strides. 4-D maps go to the kernels
            as they are (contiguous or channels_last; other strides are copied);
            3-D and 5-D and more are viewed as (N, C, prod(spatial), 1).
        keep: bool (N, C), or already packed by
            ``robustdrop.reference.channel_gate.pack_channel_keep`` as uint8
            (N, ceil(C/8)) (its padding bits are ignored); on x's device.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        y with x's shape and dtype (a 4-D channels_last x gives a channels_last
        y on the kernel backends), the same bits on every backend. The gradient
        is the upstream gradient gated by the same mask.
    """
    _check_input(x)
    mask = _packed_keep(keep, x)
    name = _backend.resolve_backend(backend, x)
    scale = torch.ones((), dtype=torch.float32, device=x.device)
    if x.dim() in (2, 4):
        return _FORWARD[name](x, mask, scale)
    shape = x.shape
    flat = x.reshape(shape[0], shape[1], math.prod(shape[2:]), 1)
    return _FORWARD[name](flat, mask, scale).reshape(shape)


def _check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating-point tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be (N, C) features or (N, C, *spatial) maps, got {x.dim()} dimensions with shape "
                         f"{tuple(x.shape)}")


def _packed_keep(keep, x: torch.Tensor) -> torch.Tensor:
    """The packed (N, ceil(C/8)) uint8 form of keep, checked against x (N, C, ...)."""
    if not isinstance(keep, torch.Tensor):
        raise TypeError(f"keep must be a torch.Tensor, got {type(keep).__name__}")
    batch, channels = x.shape[:2]
    if keep.dtype == torch.bool:
        if tuple(keep.shape) != (batch, channels):
            raise ValueError(f"keep must have shape (N, C) = {(batch, channels)} for x of shape {tuple(x.shape)}, "
                             f"got {tuple(keep.shape)}")
        if keep.device != x.device:
            raise ValueError(f"keep must be on x's device {x.device}, got {keep.device}")
        return reference.pack_channel_keep(keep)
    if keep.dtype != torch.uint8:
        raise TypeError(f"keep must be a bool keep mask (N, C) or a packed uint8 mask (N, ceil(C/8)), got {keep.dtype}")
    row_bytes = (channels + 7) // 8
    if tuple(keep.shape) != (batch, row_bytes):
        raise ValueError(f"keep must have shape (N, ceil(C/8)) = {(batch, row_bytes)} for x of shape "
                         f"{tuple(x.shape)}, got {tuple(keep.shape)}")
    if keep.device != x.device:
        raise ValueError(f"keep must be on x's device {x.device}, got {keep.device}")
    return keep


_FORWARD = _backend.forward_table("channel_mask_backward", reference.channel_gate_packed,
                                  adjoint="channel_mask_backward")
