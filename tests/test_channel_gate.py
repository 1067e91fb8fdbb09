"""The per-sample channel gate of EWS subnets (robustdrop.ews.channel_gate) on every backend against
its reference, torch.where: y[n, c] = keep[n, c] ? x[n, c] : 0."""
import pytest
import torch

import robustdrop
from robustdrop.ews import channel_gate
from robustdrop.reference import channel_gate as reference
from conftest import (COMPILED_DEVICES, DEVICE_BACKENDS, KERNEL_BACKENDS, assert_backend_matches_reference,
                      assert_compiled_matches_eager, assert_gradients_check, assert_same_bits, memory_layouts,
                      nan_payloads, python_calls_in_autograd)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (N, C) and (N, C, ...): C below, at and above a byte of mask bits; N and C of 1; 3-D and 5-D.
SHAPES = [(3, 5), (2, 8), (4, 13), (1, 1), (2, 3, 5, 7), (3, 9, 4, 4), (1, 17, 2, 3), (2, 10, 6), (2, 3, 2, 3, 4)]


def random_keep(shape, device, seed=7, ratio=0.5):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape[:2], generator=generator) < ratio).to(device)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_reference_bit_for_bit(device, backend, dtype):
    generator = torch.Generator().manual_seed(2)
    for index, shape in enumerate(SHAPES):
        x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        keep = random_keep(shape, device, seed=index)
        expected = reference.channel_gate(x, keep)
        assert_same_bits(channel_gate(x, keep, backend=backend), expected)
        assert_same_bits(channel_gate(x, reference.pack_channel_keep(keep), backend=backend), expected)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(4, 11), (2, 10, 3, 5)])
def test_forward_and_backward_match_reference_backend(device, backend, dtype, shape):
    keep = random_keep(shape, device)
    x = torch.randn(shape, device=device).to(dtype).requires_grad_(True)
    assert_backend_matches_reference(lambda inp, name: channel_gate(inp, keep, backend=name), x, backend)
    # and the reference backend is torch.where itself, forward and backward
    y = channel_gate(x, keep, backend="reference")
    g = torch.randn(shape, device=device).to(dtype)
    (grad,) = torch.autograd.grad(y, x, g)
    assert_same_bits(y, reference.channel_gate(x.detach(), keep))
    assert_same_bits(grad, reference.channel_gate(g, keep))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gates_per_sample_and_channel_without_rescale(device, backend):
    x = torch.rand(6, 19, 3, 3, device=device) + 1.0
    keep = random_keep(x.shape, device, ratio=0.3)
    y = channel_gate(x, keep, backend=backend)
    assert torch.equal((y != 0).all(-1).all(-1), keep) and torch.equal((y == 0).all(-1).all(-1), ~keep)
    assert torch.equal(y[keep], x[keep])


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_padding_bits_of_the_packed_mask_are_ignored(device, backend):
    x = torch.randn(3, 13, 2, 2, device=device)
    keep = random_keep(x.shape, device)
    packed = reference.pack_channel_keep(keep)
    dirty = packed.clone()
    dirty[:, -1] |= torch.tensor(0b11100000, dtype=torch.uint8, device=device)  # C = 13: bits 5..7 of byte 1 pad
    assert_same_bits(channel_gate(x, dirty, backend=backend), channel_gate(x, packed, backend=backend))
    assert torch.equal(reference.unpack_channel_keep(dirty, 13), keep)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 10, 5, 6), (3, 10, 5, 1), (1, 10, 1, 6)])
def test_layouts(device, backend, shape):
    base = torch.randn(shape, device=device)
    keep = random_keep(base.shape, device)
    expected = reference.channel_gate(base, keep)
    for name, x in memory_layouts(base).items():
        y = channel_gate(x, keep, backend=backend)
        assert_same_bits(y, expected)
        if name == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
    features = torch.randn(10, 4, device=device).t()  # (4, 10), not contiguous
    keep = random_keep(features.shape, device)
    assert_same_bits(channel_gate(features, keep, backend=backend), reference.channel_gate(features, keep))
    assert_same_bits(channel_gate(features, keep.t().contiguous().t(), backend=backend),
                     reference.channel_gate(features, keep))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_inf_and_signed_zero(device, backend):
    keep = torch.tensor([[True, False, True, False]], device=device).repeat(2, 1)
    x = torch.tensor([[float("nan"), float("nan"), float("-inf"), float("inf")],
                      [-0.0, float("nan"), -0.0, -0.0]], device=device)
    y = channel_gate(x, keep, backend=backend)
    assert torch.isnan(y[0, 0]) and y[0, 2] == float("-inf")
    assert (y[:, 1] == 0).all() and (y[:, 3] == 0).all() and not torch.signbit(y[:, [1, 3]]).any()
    assert torch.signbit(y[1, [0, 2]]).all()  # a kept -0.0 stays -0.0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_kept_values_keep_their_bits(device, backend, dtype):
    """A select, no multiply: kept NaNs keep their sign and payload, signalling ones included, on every
    backend, for features and maps in both layouts; the gradient likewise."""
    keep = random_keep((2, 6), device)
    maps = memory_layouts(nan_payloads((2, 6, 3, 5), dtype, device))
    for x in [nan_payloads((2, 6), dtype, device), nan_payloads((2, 6, 7), dtype, device), *maps.values()]:
        assert_same_bits(channel_gate(x, keep, backend=backend), reference.channel_gate(x, keep))
        x = x.clone().requires_grad_()
        grad_y = nan_payloads(x.shape, dtype, device).flip(0)
        (grad,) = torch.autograd.grad(channel_gate(x, keep, backend=backend), x, grad_y)
        assert_same_bits(grad, reference.channel_gate(grad_y, keep))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_tensors(device, backend):
    for shape in [(0, 3), (2, 0), (0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (2, 3, 0)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        y = channel_gate(x, torch.ones(shape[:2], dtype=torch.bool, device=device), backend=backend)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 10), (2, 9, 3, 4), (2, 5, 3)])
def test_gradcheck_float64(device, backend, shape):
    keep = random_keep(shape, device)
    x = torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True)

    def fn(inp):
        return channel_gate(inp, keep, backend=backend)

    assert_gradients_check(fn, x, backend=backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(device, backend):
    torch._dynamo.reset()
    keep = random_keep((3, 12), device)

    def step(x, keep, seed):
        hidden = channel_gate(x * 1.5 + float(seed), keep, backend=backend)
        # elementwise only up to the loss (no reduction whose order inductor may change): the gradient
        # is the same bits compiled and eager
        features = channel_gate(hidden[:, :, 0, 0] * 2.0, keep, backend=backend)
        return (features * features).sum() + (hidden * hidden).sum()

    assert_compiled_matches_eager(step, torch.randn(3, 12, 4, 5, device=device, requires_grad=True), keep)


def test_saved_for_backward_is_the_packed_mask_and_a_scalar():
    if not robustdrop.backends()["cpu"].available:
        pytest.skip("the compiled extension is not built")
    x = torch.randn(8, 64, 16, 16, requires_grad=True)
    keep = random_keep(x.shape, "cpu")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        channel_gate(x, keep, backend="cpu")
    assert sum(t.numel() * t.element_size() for t in saved) == 8 * 64 // 8 + 4


BAD_CALLS = [
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randint(0, 5, (2, 3, 4, 4))), TypeError, "x must be a floating-point"),
    (dict(x=torch.randn(3)), ValueError, r"x must be \(N, C\) features or \(N, C, \*spatial\) maps"),
    (dict(keep=[[True]]), TypeError, "keep must be a torch.Tensor"),
    (dict(keep=torch.ones(2, 3)), TypeError, "keep must be a bool keep mask"),
    (dict(keep=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"keep must have shape \(N, C\) = \(2, 3\)"),
    (dict(keep=torch.ones(3, 3, dtype=torch.bool)), ValueError, r"keep must have shape \(N, C\)"),
    (dict(keep=torch.ones(2, 2, dtype=torch.uint8)), ValueError, r"keep must have shape \(N, ceil\(C/8\)\) = \(2, 1\)"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bad,error,message", BAD_CALLS)
def test_bad_input_is_a_clear_error(device, backend, bad, error, message):
    args = dict(x=torch.randn(2, 3, 4, 4), keep=torch.ones(2, 3, dtype=torch.bool), backend=backend)
    args.update(bad)
    args = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    with pytest.raises(error, match=message):
        channel_gate(args["x"], args["keep"], backend=args["backend"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_keep_on_another_device_is_a_clear_error():
    x = torch.randn(2, 3, 4, 4, device="cuda")
    for keep in (torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 1, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="keep must be on x's device"):
            channel_gate(x, keep)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_compiled_op_autograd_runs_no_python(device):
    x = torch.randn(4, 10, 3, 3, device=device, requires_grad=True)
    mask = torch.randint(0, 256, (4, 2), dtype=torch.uint8, device=device)
    scale = torch.ones((), device=device)
    assert python_calls_in_autograd(lambda t: torch.ops.robustdrop.channel_mask_backward(t, mask, scale), x) == []
