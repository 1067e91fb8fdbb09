"""Random Mask's apply (DESIGN.md 4.4): one fixed, bit-packed keep mask (C, H, W)
applied to every sample of a batch; the functional API, its autograd and fake
implementations, and the dispatch to the four backends.

The compiled ops ``robustdrop::fixed_mask_apply`` and ``fixed_mask_apply_`` (in
place; CPU and CUDA kernels) and their Triton twins ``..._triton`` compute
``keep[c, h, w] ? x[n, c, h, w] : 0``. The op is linear and self-adjoint, so
the backward is the same op on dy and only the packed mask, C*H*W bits shared
by the batch, is kept for it.
"""
import torch

from robustdrop import _backend, _checks
from robustdrop.ops.block_mask import output_memory_format
from robustdrop.reference import block_mask as block_reference
from robustdrop.reference import fixed_mask as reference

__all__ = ["fixed_mask2d", "pack_fixed_mask"]


def fixed_mask2d(x: torch.Tensor, mask: torch.Tensor, *, inplace: bool = False, backend: str = "auto") -> torch.Tensor:
    """Zero the positions a fixed keep mask drops, in every sample: ``y = keep ? x : 0``.

    No rescale: the mask is part of the architecture (Random Mask), applied in
    training and evaluation alike.

    Args:
        x: (N, C, H, W) floating-point input, any memory format.
        mask: the keep mask, bool (C, H, W), or already packed by
            ``pack_fixed_mask`` as uint8 (C, H, ceil(W/8)); on x's device.
        inplace: write y into x (and return x). Autograd allows it wherever it
            allows an in-place op: the backward needs only the mask.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        y (N, C, H, W) with x's dtype; the same bits on every backend. NaN and
        Inf in x stay out of dropped positions (a select, not a multiply).
    """
    _checks.check_feature_map(x)
    packed = _packed_mask(mask, x)
    inplace = _checks.check_bool(inplace, "inplace")
    name = _backend.resolve_backend(backend, x)
    if inplace and _checks.in_func_transform():
        # A torch.func transform cannot run _FixedMaskInPlace (an autograd.Function that writes its input):
        # the same values, written into x by a copy.
        return x.copy_(_FORWARD[name](x, packed))
    if inplace and not _checks.in_onnx_export():  # an ONNX graph has no in-place op: its output is y
        return _FixedMaskInPlace.apply(x, packed, name)
    return _FORWARD[name](x, packed)


def pack_fixed_mask(keep: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool keep mask (C, H, W) into the op's (C, H, ceil(W/8)) uint8."""
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 3:
        raise TypeError("keep must be a bool tensor (C, H, W)")
    return block_reference.pack_keep_mask(keep)


def _packed_mask(mask, x: torch.Tensor) -> torch.Tensor:
    """The packed (C, H, ceil(W/8)) uint8 form of mask, checked against x (N, C, H, W)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    channels, height, width = x.shape[1:]
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != (channels, height, width):
            raise ValueError(f"mask must have shape (C, H, W) = {(channels, height, width)} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(mask.shape)}")
        mask = block_reference.pack_keep_mask(mask)
    elif mask.dtype != torch.uint8:
        raise TypeError(f"mask must be a bool keep mask (C, H, W) or a packed uint8 mask (C, H, ceil(W/8)), "
                        f"got {mask.dtype}")
    row_bytes = (width + 7) // 8
    if tuple(mask.shape) != (channels, height, row_bytes):
        raise ValueError(f"mask must have shape (C, H, ceil(W/8)) = {(channels, height, row_bytes)} for x of shape "
                         f"{tuple(x.shape)}, got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask must be on x's device {x.device}, got {mask.device}")
    return mask


def _reference_in_place(x: torch.Tensor, mask: torch.Tensor) -> None:
    x.copy_(reference.fixed_mask_apply(x, mask))


_FORWARD = _backend.forward_table("fixed_mask_apply", reference.fixed_mask_apply, adjoint="fixed_mask_apply")
_IN_PLACE = {
    "cpu": lambda x, mask: torch.ops.robustdrop.fixed_mask_apply_(x, mask),
    "cuda": lambda x, mask: torch.ops.robustdrop.fixed_mask_apply_(x, mask),
    "triton": lambda x, mask: torch.ops.robustdrop.fixed_mask_apply_triton_(x, mask),
    "reference": _reference_in_place,
}


class _FixedMaskInPlace(torch.autograd.Function):
    """The in-place apply with autograd: x is marked dirty, dx = mask applied to dy."""

    @staticmethod
    def forward(ctx, x, mask, backend):
        _IN_PLACE[backend](x, mask)
        ctx.mark_dirty(x)
        ctx.save_for_backward(mask)
        ctx.backend = backend
        return x

    @staticmethod
    def backward(ctx, grad_y):
        (mask,) = ctx.saved_tensors
        return _FORWARD[ctx.backend](grad_y, mask), None, None


def _fake_apply(x, mask):
    return torch.empty_like(x, memory_format=output_memory_format(x))


def _fake_apply_(x, mask):
    return None


def _setup_context(ctx, inputs, output):
    _, mask = inputs
    ctx.save_for_backward(mask)


def _make_backward(apply_op):
    # Linear and self-adjoint: every order of backward is the same op.
    def backward(ctx, grad_y):
        (mask,) = ctx.saved_tensors
        return apply_op(grad_y, mask), None

    return backward


def register(apply_name: str, *, autograd: bool) -> None:
    """Fake implementations of the (apply, in-place apply) pair and, with ``autograd`` (False for
    the compiled op: csrc/autograd has it), autograd of the apply."""
    torch.library.register_fake(f"robustdrop::{apply_name}", _fake_apply)
    torch.library.register_fake(f"robustdrop::{apply_name}_", _fake_apply_)
    if not autograd:
        return
    apply_op = getattr(torch.ops.robustdrop, apply_name)
    torch.library.register_autograd(f"robustdrop::{apply_name}", _make_backward(apply_op),
                                    setup_context=_setup_context)
