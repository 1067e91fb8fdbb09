"""DropBlock (DESIGN.md 4.1): the functional API, its autograd and fake
implementations, and the dispatch to the four backends.

The compiled op ``robustdrop::block_mask_forward`` (CPU and CUDA kernels) and
its Triton twin ``robustdrop::block_mask_forward_triton`` both return
``(y, mask, scale)``: the bit-packed keep mask (N, Cm, H, ceil(W/8)) uint8 and
the float32 scale are all that the backward keeps (one bit per element).
The compiled op's autograd is in C++ (csrc/autograd/block_mask_autograd.cpp); the
Triton op's is registered here, with the same formulas.
"""
import re

import torch

from robustdrop import _backend, _checks, _seed
from robustdrop.reference import block_mask as reference

__all__ = ["drop_block2d", "block_drop"]

NORMALIZE_MODES = ("batch", "sample", "none")


def drop_block2d(x: torch.Tensor, p, block_size: int, *, training: bool = True, couple_channels: bool = False,
                 normalize: str = "batch", eps: float = 1e-6, seed: int | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """DropBlock: drop contiguous bs x bs squares of each feature map.

    Seeds are drawn on the grid (N, Cm, H-bs+1, W-bs+1) with probability
    ``gamma = p*H*W / (bs**2 (H-bs+1)(W-bs+1))``, ``bs = min(block_size, H, W)``;
    each seed at (i, j) drops rows i..i+bs-1 and columns j..j+bs-1. With
    ``normalize="batch"`` kept values are scaled by ``numel / (eps + kept)``
    (torchvision's rule); with ``"sample"`` each sample by its own
    ``C*H*W / (eps + kept_n)``; with ``"none"`` they are left as they are.

    Args:
        x: (N, C, H, W) floating-point input, any memory format.
        p: drop rate in [0, 1]; ``p == 0`` returns x unchanged. A tensor (N,)
            gives each sample its own rate (checking its values reads them: one
            synchronisation for a CUDA tensor; under torch.compile they are
            not read, so the graph holds, and not checked; nor are those of
            a rate that a torch.func transform wraps, vmapped or
            differentiated). A 0-d tensor, on
            x's device or the CPU, is one rate for every sample, the same bits
            as the float: under torch.compile it is a graph input, so a rate
            changed in place (a schedule) does not recompile, where a float
            is a constant that does. A tensor rate always runs the op, 0
            included.
        block_size: side of the dropped squares, >= 1 (clamped to min(H, W)).
        training: when False, returns x unchanged.
        couple_channels: one mask (N, 1, H, W) shared by all channels.
        normalize: "batch", "sample" or "none".
        eps: added to the kept count in the scale.
        seed: 64-bit seed of the shared RNG; None draws one from torch's
            default CPU generator (``torch.manual_seed`` makes it repeatable).
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        y (N, C, H, W) with x's dtype and memory format. Every backend returns
        the same bits for the same seed.
    """
    _checks.check_feature_map(x)
    p, block_size, eps = check_rate_args(p, x, block_size, normalize, eps, seed, normalize_modes=NORMALIZE_MODES)
    training = _checks.check_bool(training, "training")
    couple_channels = _checks.check_bool(couple_channels, "couple_channels")
    name = _backend.resolve_backend(backend, x)
    if not training or (isinstance(p, float) and p == 0.0):
        return x
    groups = x.shape[0] if normalize == "sample" and x.shape[0] > 0 else 1
    return block_drop(x, p, block_size, couple_channels=couple_channels, normalize=normalize != "none", eps=eps,
                      normalize_groups=groups, seed=seed, backend=name)


def check_rate_args(p, x: torch.Tensor, block_size, normalize, eps, seed,
                    normalize_modes: tuple = _checks.NORMALIZE_MODES) -> tuple:
    """The checked (p, block_size, eps) of a block-dropping op on x (N, C, H, W): p as a float, or,
    given as a tensor, as float64 rates of its shape (0-d, or (N,) on x's device)."""
    if not isinstance(p, torch.Tensor):
        return _checks.check_block_drop_args(p, block_size, normalize, eps, seed, normalize_modes)
    rates = _checks.check_sample_rates(p, x.shape[0], x.device)
    _, block_size, eps = _checks.check_block_drop_args(0.0, block_size, normalize, eps, seed, normalize_modes)
    return rates, block_size, eps


def block_drop(x: torch.Tensor, p, block_size: int, *, couple_channels: bool, normalize: bool, eps: float,
               normalize_groups: int = 1, seed: int | None, backend: str) -> torch.Tensor:
    """DropBlock on checked arguments and a resolved backend: the op call behind drop_block2d.

    p is a float, or a float tensor of drop rates: (N,), one per sample, or 0-d,
    one for every sample (not checked again). The N samples form
    ``normalize_groups`` consecutive groups, each normalised by its own kept
    count (Active DropBlock's batched step gives each policy's copy of the batch
    its own group).
    """
    height, width = x.shape[-2:]
    bs = reference.effective_block_size(block_size, height, width)
    if bs == 0:  # an empty map has nothing to drop
        return x.clone()
    gamma, sample_gamma = seed_probabilities(p, x, bs)
    args = (x, _seed.op_seed(seed, x.device), gamma, bs, couple_channels, normalize, eps, sample_gamma,
            normalize_groups)
    return _FORWARD[backend](*args)[0]


def seed_probabilities(p, x: torch.Tensor, bs: int) -> tuple:
    """The (gamma, sample_gamma) arguments of a block-mask forward op on x (N, C, H, W) for drop
    rate p: (float64 gamma, None) for a float p, or (0.0, float32 (N,) per-sample gamma on x's
    device) for a tensor p, (N,) or 0-d (``rate_per_sample``).

    Under torch.compile (and export) a float p takes the tensor path too. With a dynamic H or W,
    gamma would be a symbolic float, which the op's float argument specialises with a float-equality
    guard that torch evaluates with its factors in another order, so for some sizes (7x9) the guard
    fails on the very call that made it. (Dynamo cannot tell here whether H and W are dynamic.) The
    tensor path computes the same float64 products in the same order, and the kernels compare
    against the same float32 value, so the masks are those of eager mode.
    """
    height, width = x.shape[-2:]
    if not isinstance(p, torch.Tensor):
        if not torch.compiler.is_compiling():
            return reference.drop_rate_to_gamma(p, height, width, bs), None
        p = torch.tensor(p, dtype=torch.float64)
    rates = rate_per_sample(p, x) if p.dim() == 0 else p
    return 0.0, reference.drop_rate_to_gamma(rates, height, width, bs).to(torch.float32)


def rate_per_sample(rate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The drop rate ``rate``, a () float64 tensor on the CPU or x's device, given to each of x's N
    samples: (N,) float64 on x's device.

    An elementwise op reads a 0-d CPU tensor as a host scalar, on a GPU as well: no copy to the
    device and no synchronisation, in eager and under Inductor (which passes such a tensor to its
    GPU kernels as a scalar argument). ``0 + rate`` is exact, so the rates equal the float.
    """
    return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device) + rate


_FORWARD = _backend.forward_table("block_mask_forward", reference.block_mask_forward, adjoint="block_mask_backward")


def _fake_forward(x, seed, gamma, block_size, couple_channels, normalize, eps, sample_gamma=None,
                  normalize_groups=1):
    return fake_outputs(x, 1 if couple_channels else x.shape[1], normalize_groups)


def _fake_backward(grad_y, mask, scale):
    return torch.empty_like(grad_y, memory_format=output_memory_format(grad_y))


output_memory_format = reference.output_memory_format


def _setup_context(ctx, inputs, output):
    _, mask, scale = output
    ctx.save_for_backward(mask, scale)
    ctx.mark_non_differentiable(mask, scale)


def _make_backward(backward_op, num_inputs: int):
    """dx from the saved mask and scale; every input but x (the first) gets no gradient."""
    def backward(ctx, grad_y, _grad_mask, _grad_scale):
        mask, scale = ctx.saved_tensors
        grad_x = backward_op(grad_y, mask, scale) if ctx.needs_input_grad[0] else None
        return (grad_x,) + (None,) * (num_inputs - 1)

    return backward


def register(forward_name: str, backward_name: str, *, autograd: bool) -> None:
    """Fake implementations of DropBlock's (forward, backward) op pair and, with ``autograd``, their autograd.

    ``autograd=False`` is for the compiled ops, whose autograd csrc/autograd
    registers in C++ with the same formulas (no Python on their forward or backward).
    """
    register_backward(backward_name, autograd=autograd)
    register_forward(forward_name, backward_name, _fake_forward, num_inputs=9, autograd=autograd)


def register_forward(forward_name: str, backward_name: str, fake_forward, *, num_inputs: int, autograd: bool) -> None:
    """Fake implementation and, with ``autograd``, autograd of a forward op that returns (y, mask, scale).

    Any block-mask op whose backward is ``backward_name`` (keep ? dy * scale : 0)
    registers through here; x must be its first input. A seeded op (an argument
    named ``seed``) also gets its ``_drawn_seed`` variant (``register_drawn_seed``).
    """
    torch.library.register_fake(f"robustdrop::{forward_name}", fake_forward)
    backward = _make_backward(getattr(torch.ops.robustdrop, backward_name), num_inputs)
    if autograd:
        torch.library.register_autograd(f"robustdrop::{forward_name}", backward, setup_context=_setup_context)
    op = getattr(torch.ops.robustdrop, forward_name).default
    if any(argument.name == "seed" for argument in op._schema.arguments):
        register_drawn_seed(op, fake_forward, backward)


# Holds the registrations of the _drawn_seed variants for the life of the process.
_DRAWN_SEED_LIBRARY = torch.library.Library("robustdrop", "FRAGMENT")
# The tag came with Inductor's graph partitioning (torch 2.8); an older torch has neither.
_CUDAGRAPH_UNSAFE = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def register_drawn_seed(op, fake_forward, backward) -> None:
    """``robustdrop::<name>_drawn_seed``: the seeded forward op ``op`` with its seed passed as a
    0-d int64 CPU tensor instead of an int; its one kernel reads the seed on the host and calls ``op``.

    This is what a drawn seed (``seed=None``) goes through under torch.compile: the draw stays
    a traced ``torch.randint``, and no ``.item()`` in the graph breaks it in two (Dynamo breaks
    there unless ``fullgraph=True``). The variant is opaque to the compiler and has the same
    fake implementation as ``op`` and, in Python, the same autograd as the Triton ops. Under
    ``torch.vmap`` the seed is a vmapped input when ``randomness="different"`` (robustdrop._vmap).

    It is tagged ``cudagraph_unsafe``: its host read of the seed would happen once, when a CUDA
    graph is recorded, and every replay would reuse that seed and so drop the same positions.
    Under ``torch.compile(mode="reduce-overhead")`` Inductor runs it outside its CUDA graphs.
    """
    name = f"robustdrop::{op._schema.name.split('::')[1]}{_backend.DRAWN_SEED_SUFFIX}"
    signature = str(op._schema).split("(", 1)[1]
    signature, replaced = re.subn(r"\b(?:SymInt|int) seed\b", "Tensor seed", signature)
    if replaced != 1:
        raise RuntimeError(f"{op._schema.name} has no single int seed argument: {op._schema}")
    seed_position = [argument.name for argument in op._schema.arguments].index("seed")

    def kernel(*args):
        args = list(args)
        args[seed_position] = int(args[seed_position])
        return op(*args)

    torch.library.define(name, "(" + signature, lib=_DRAWN_SEED_LIBRARY, tags=_CUDAGRAPH_UNSAFE)
    torch.library.impl(name, "default", kernel, lib=_DRAWN_SEED_LIBRARY)
    torch.library.register_fake(name, fake_forward, lib=_DRAWN_SEED_LIBRARY)
    torch.library.register_autograd(name, backward, setup_context=_setup_context, lib=_DRAWN_SEED_LIBRARY)


def register_backward(backward_name: str, *, autograd: bool) -> None:
    """Fake implementation and, with ``autograd``, autograd (a double backward) of a block-mask backward op."""
    torch.library.register_fake(f"robustdrop::{backward_name}", _fake_backward)
    if not autograd:
        return
    backward_op = getattr(torch.ops.robustdrop, backward_name)
    # A double backward goes through the same op: the backward is linear in grad_y.
    torch.library.register_autograd(f"robustdrop::{backward_name}", _make_double_backward(backward_op),
                                    setup_context=_setup_backward_context)


def fake_outputs(x, mask_channels: int, normalize_groups: int = 1):
    """Fake (y, mask, scale) of a block-mask forward on x (N, C, H, W)."""
    n, _, h, w = x.shape
    mask = x.new_empty((n, mask_channels, h, (w + 7) // 8), dtype=torch.uint8)
    y = torch.empty_like(x, memory_format=output_memory_format(x))
    scale_shape = () if normalize_groups == 1 else (normalize_groups,)
    return y, mask, x.new_empty(scale_shape, dtype=torch.float32)


def _setup_backward_context(ctx, inputs, output):
    _, mask, scale = inputs
    ctx.save_for_backward(mask, scale)


def _make_double_backward(backward_op):
    def double_backward(ctx, grad_grad_x):
        mask, scale = ctx.saved_tensors
        return backward_op(grad_grad_x, mask, scale), None, None

    return double_backward
