"""Random Mask's fixed-mask apply (DESIGN.md 4.4) on every backend against its reference."""
import pytest
import torch

import robustdrop
from robustdrop.reference import fixed_mask as reference
from robustdrop.reference.block_mask import pack_keep_mask
from conftest import (COMPILED_DEVICES, DEVICE_BACKENDS, KERNEL_BACKENDS, assert_backend_matches_reference,
                      assert_compiled_matches_eager, assert_gradients_check, assert_same_bits, memory_layouts,
                      nan_payloads, python_calls_in_autograd)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (N, C, H, W): W below, at and above a byte of mask bits; C and N of 1.
SHAPES = [(2, 3, 5, 7), (3, 2, 4, 8), (1, 4, 3, 13), (2, 1, 6, 1), (4, 3, 1, 17)]


def apply_ops(backend: str):
    """(out of place, in place) apply of a kernel backend."""
    suffix = "_triton" if backend == "triton" else ""
    return (getattr(torch.ops.robustdrop, "fixed_mask_apply" + suffix),
            getattr(torch.ops.robustdrop, "fixed_mask_apply" + suffix + "_"))


def packed_mask(shape, device, ratio=0.4, seed=7):
    keep = reference.random_keep_mask(shape[1:], ratio, seed=seed)
    return keep.to(device), pack_keep_mask(keep).to(device)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_op_matches_reference_bit_for_bit(device, backend, dtype):
    apply, apply_ = apply_ops(backend)
    generator = torch.Generator().manual_seed(2)
    for index, shape in enumerate(SHAPES):
        x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        _, mask = packed_mask(shape, device, seed=index)
        expected = reference.fixed_mask_apply(x, mask)
        assert_same_bits(apply(x, mask), expected)
        written = x.clone()
        assert apply_(written, mask) is None
        assert_same_bits(written, expected)


# Larger maps (compiled kernels only, the Triton interpreter is slow): samples of
# more than 32768 elements, which the CPU kernel splits into chunks, and widths
# of whole and partial mask bytes, with dirty padding bits.
LARGE_SHAPES = [(3, 5, 70, 100), (2, 64, 16, 16), (5, 96, 4, 4), (2, 33, 14, 14), (3, 7, 9, 56)]


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in KERNEL_BACKENDS if b != "triton" or d == "cuda"])
@pytest.mark.parametrize("shape", LARGE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_maps_match_reference_bit_for_bit(device, backend, shape, dtype):
    apply, apply_ = apply_ops(backend)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    _, mask = packed_mask(shape, device, ratio=0.3, seed=11)
    expected = reference.fixed_mask_apply(x, mask)
    if shape[3] % 8:  # set the padding bits of each row's last byte
        mask[..., -1] |= (0xFF << (shape[3] % 8)) & 0xFF
    assert_same_bits(apply(x, mask), expected)
    written = x.clone()
    apply_(written, mask)
    assert_same_bits(written, expected)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_padding_bits_of_the_mask_are_ignored(device, backend):
    apply, _ = apply_ops(backend)
    x = torch.randn(2, 3, 4, 5, device=device)
    _, mask = packed_mask(x.shape, device)
    dirty = mask | torch.tensor(0b11100000, dtype=torch.uint8, device=device)  # W = 5: bits 5..7 are padding
    assert_same_bits(apply(x, dirty), apply(x, mask))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_public_api_forward_and_backward_match_reference(device, backend, dtype):
    keep, _ = packed_mask((2, 3, 6, 11), device)
    x = torch.randn(2, 3, 6, 11, device=device).to(dtype).requires_grad_(True)
    assert_backend_matches_reference(lambda inp, name: robustdrop.fixed_mask2d(inp, keep, backend=name), x, backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_every_sample_gets_the_same_mask_and_no_rescale(device, backend):
    keep, mask = packed_mask((5, 4, 6, 9), device, ratio=0.5)
    x = torch.rand(5, 4, 6, 9, device=device) + 1.0
    y = robustdrop.fixed_mask2d(x, mask, backend=backend)
    for n in range(5):
        assert torch.equal(y[n] != 0, keep)
        assert torch.equal(y[n][keep], x[n][keep])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bool_and_packed_masks_give_the_same_result(device, backend):
    keep, mask = packed_mask((2, 3, 7, 10), device)
    x = torch.randn(2, 3, 7, 10, device=device)
    assert torch.equal(robustdrop.fixed_mask2d(x, keep, backend=backend), robustdrop.fixed_mask2d(x, mask, backend=backend))
    assert torch.equal(robustdrop.pack_fixed_mask(keep), mask)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 9, 12), (2, 5, 9, 1), (2, 5, 1, 12)])
def test_channels_last_and_non_contiguous(device, backend, shape):
    keep, _ = packed_mask(shape, device)
    base = torch.randn(shape, device=device)
    expected = reference.fixed_mask_apply(base, pack_keep_mask(keep.cpu()).to(device))
    for name, x in memory_layouts(base).items():
        y = robustdrop.fixed_mask2d(x, keep, backend=backend)
        assert torch.equal(y, expected), name
        if name == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        written = x.clone(memory_format=torch.preserve_format) if name != "strided" else x
        strides = written.stride()
        out = robustdrop.fixed_mask2d(written, keep, inplace=True, backend=backend)
        assert out is written and written.stride() == strides and torch.equal(written, expected), name


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_in_place_keeps_autograd_right(device, backend):
    keep, _ = packed_mask((2, 3, 5, 9), device)
    leaf = torch.randn(2, 3, 5, 9, device=device, requires_grad=True)
    g = torch.randn(2, 3, 5, 9, device=device)
    hidden = leaf * 2.0  # a non-leaf may be written in place
    y = robustdrop.fixed_mask2d(hidden, keep, inplace=True, backend=backend)
    assert y is hidden
    (grad,) = torch.autograd.grad(y, leaf, g)
    assert torch.equal(grad, torch.where(keep, g * 2.0, torch.zeros((), device=device)))
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        robustdrop.fixed_mask2d(leaf, keep, inplace=True, backend=backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_tensors(device, backend):
    for shape in [(0, 3, 4, 9), (2, 0, 4, 9), (2, 3, 0, 9), (2, 3, 4, 0)]:
        keep = torch.ones(shape[1:], dtype=torch.bool, device=device)
        x = torch.randn(shape, device=device, requires_grad=True)
        y = robustdrop.fixed_mask2d(x, keep, backend=backend)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_and_inf_reach_kept_outputs_only(device, backend):
    keep, _ = packed_mask((2, 3, 6, 6), device, ratio=0.5)
    x = torch.full((2, 3, 6, 6), float("nan"), device=device)
    x[1] = float("-inf")
    y = robustdrop.fixed_mask2d(x, keep, backend=backend)
    dropped = ~keep.expand_as(y)
    assert (y[dropped] == 0).all() and not torch.signbit(y[dropped]).any()
    assert torch.isnan(y[0][keep]).all() and torch.isinf(y[1][keep]).all()


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kept_values_keep_their_bits(device, backend, dtype):
    """A select, no multiply: kept NaNs keep their sign and payload, signalling ones included, on every
    backend, out of place and in place, in both layouts."""
    apply, apply_ = apply_ops(backend)
    keep, mask = packed_mask((2, 3, 5, 11), device, ratio=0.5)
    for x in memory_layouts(nan_payloads((2, 3, 5, 11), dtype, device)).values():
        expected = torch.where(keep, x, torch.zeros((), dtype=dtype, device=device))
        assert_same_bits(apply(x, mask), expected)
        copy = x.clone()
        apply_(copy, mask)
        assert_same_bits(copy, expected)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradcheck_float64(device, backend):
    keep, _ = packed_mask((2, 2, 4, 5), device)
    x = torch.randn(2, 2, 4, 5, device=device, dtype=torch.float64, requires_grad=True)

    def fn(inp):
        return robustdrop.fixed_mask2d(inp, keep, backend=backend)

    assert_gradients_check(fn, x, backend=backend)

    def fn_in_place(inp):
        return robustdrop.fixed_mask2d(inp * 1.0, keep, inplace=True, backend=backend)

    assert torch.autograd.gradcheck(fn_in_place, (x,))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_opcheck(device, backend):
    apply, apply_ = apply_ops(backend)
    _, mask = packed_mask((2, 3, 5, 11), device)
    x = torch.randn(2, 3, 5, 11, device=device, requires_grad=True)
    torch.library.opcheck(apply, (x, mask))
    torch.library.opcheck(apply_, (x.detach().clone(), mask))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(device, backend):
    torch._dynamo.reset()
    keep, mask = packed_mask((2, 3, 8, 10), device)

    def step(x, mask, seed):
        hidden = robustdrop.fixed_mask2d(x * 1.5, mask, backend=backend)
        written = robustdrop.fixed_mask2d(hidden + float(seed), mask, inplace=True, backend=backend)
        return (written * written).sum()

    assert_compiled_matches_eager(step, torch.randn(2, 3, 8, 10, device=device, requires_grad=True), mask)


def test_saved_for_backward_is_the_packed_mask_only():
    if not robustdrop.backends()["cpu"].available:
        pytest.skip("the compiled extension is not built")
    keep, mask = packed_mask((8, 16, 32, 32), "cpu")
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        robustdrop.fixed_mask2d(x, mask, backend="cpu")
    assert sum(t.numel() * t.element_size() for t in saved) == mask.numel()


BAD_CALLS = [
    (dict(x=torch.randn(3, 8, 8)), ValueError, "x must be 4-D"),
    (dict(x=torch.randint(0, 5, (2, 3, 8, 8))), TypeError, "x must be a floating-point"),
    (dict(mask=torch.ones(3, 8, 7, dtype=torch.bool)), ValueError, r"mask must have shape \(C, H, W\)"),
    (dict(mask=torch.ones(3, 8, 2, dtype=torch.uint8)), ValueError, r"mask must have shape \(C, H, ceil\(W/8\)\)"),
    (dict(mask=torch.ones(3, 8, 8)), TypeError, "mask must be a bool keep mask"),
    (dict(mask=[1, 0]), TypeError, "mask must be a torch.Tensor"),
    (dict(inplace="no"), TypeError, "inplace must be a bool"),
    (dict(inplace=0), TypeError, "inplace must be a bool"),
    (dict(inplace=None), TypeError, "inplace must be a bool"),
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bad,error,message", BAD_CALLS)
def test_bad_input_is_a_clear_error(device, backend, bad, error, message):
    args = dict(x=torch.randn(2, 3, 8, 8), mask=torch.ones(3, 8, 8, dtype=torch.bool))
    args.update(bad)
    args = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    x, mask = args.pop("x"), args.pop("mask")
    before = x.clone() if isinstance(x, torch.Tensor) else None
    with pytest.raises(error, match=message):
        robustdrop.fixed_mask2d(x, mask, backend=backend, **args)
    assert before is None or torch.equal(x, before)  # nothing written into x


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_ops_called_directly_reject_bad_input(device, backend):
    x = torch.randn(2, 3, 8, 9, device=device)
    _, mask = packed_mask(x.shape, device)
    for op in apply_ops(backend):
        with pytest.raises(ValueError, match="x must be 4-D"):
            op(x[0], mask)
        with pytest.raises(TypeError, match="x must be a floating-point"):
            op(x.long(), mask)
        with pytest.raises(TypeError, match="mask must be uint8"):
            op(x, mask.bool())
        with pytest.raises(ValueError, match=r"mask must have shape \(C, H, ceil\(W/8\)\)"):
            op(x, mask[:, :, :1])
        with pytest.raises(ValueError, match=r"mask must have shape \(C, H, ceil\(W/8\)\)"):
            op(x, mask[:2])


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_compiled_op_autograd_runs_no_python(device):
    x = torch.randn(2, 3, 5, 11, device=device, requires_grad=True)
    mask = pack_keep_mask(torch.rand(3, 5, 11, device=device) < 0.5)
    assert python_calls_in_autograd(lambda t: torch.ops.robustdrop.fixed_mask_apply(t, mask), x) == []
