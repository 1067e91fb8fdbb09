"""DropBlock (DESIGN.md 4.1) on every backend against the single reference."""
import os
import subprocess
import sys

import pytest
import torch

import robustdrop
from robustdrop.nn import DropBlock2d
from robustdrop.reference import block_mask as reference
from conftest import (COMPILED_DEVICES, DEVICES, DEVICE_BACKENDS, EMULATED_CUDA, KERNEL_BACKENDS,
                      assert_compiled_follows_map_sizes, assert_compiled_matches_eager, assert_gradients_check,
                      assert_drawn_seed_variant, assert_in_place_rate_runs_one_graph, assert_same_bits,
                      available_backends, memory_layouts, python_calls_in_autograd)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def backend_ops(backend: str):
    """(forward, backward) of a backend: (x, seed, gamma, bs, couple, normalize, eps) -> (y, mask, scale)
    and (grad_y, mask, scale) -> grad_x."""
    if backend == "reference":
        return reference.block_mask_forward, reference.block_mask_backward
    suffix = "_triton" if backend == "triton" else ""
    return (getattr(torch.ops.robustdrop, "block_mask_forward" + suffix),
            getattr(torch.ops.robustdrop, "block_mask_backward" + suffix))


def forward_op(backend: str):
    return backend_ops(backend)[0]


def backward_op(backend: str):
    return backend_ops(backend)[1]


def run_with_grad(x, backend, **kwargs):
    """y and dL/dx for L = sum(y * g) with a fixed g, through the public API."""
    x = x.detach().clone().requires_grad_(True)
    y = robustdrop.drop_block2d(x, backend=backend, **kwargs)
    g = torch.linspace(-2, 3, y.numel(), device=x.device).view(y.shape).to(y.dtype)
    (grad,) = torch.autograd.grad(y, x, g)
    return y.detach(), grad


# Small shapes: the Triton interpreter is slow.
CASES = [
    # (shape, block_size, p)
    ((2, 3, 13, 11), 3, 0.3),
    ((2, 3, 13, 11), 4, 0.3),  # even block
    ((1, 1, 7, 7), 7, 0.5),  # block equal to the map
    ((2, 2, 6, 9), 11, 0.4),  # block larger than the map: clamped to 6
    ((3, 2, 9, 17), 1, 0.2),  # block of 1 is plain dropout
    ((1, 4, 1, 10), 2, 0.3),  # H of 1
    ((2, 1, 20, 3), 2, 0.6),  # C of 1, W of 3
]


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("couple_channels", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_op_matches_reference_bit_for_bit(device, backend, couple_channels, normalize):
    generator = torch.Generator().manual_seed(1)
    for case_index, (shape, block_size, p) in enumerate(CASES):
        x = torch.randn(shape, generator=generator).to(device)
        bs = reference.effective_block_size(block_size, shape[2], shape[3])
        gamma = reference.drop_rate_to_gamma(p, shape[2], shape[3], bs)
        seed = 1000 + case_index
        args = (x, seed, gamma, bs, couple_channels, normalize, 1e-6)
        y, mask, scale = forward_op(backend)(*args)
        y_ref, mask_ref, scale_ref = reference.block_mask_forward(*args)
        assert_same_bits(mask, mask_ref)
        assert_same_bits(scale, scale_ref)
        assert_same_bits(y, y_ref)
        grad_y = torch.randn(shape, generator=generator).to(device)
        assert_same_bits(backward_op(backend)(grad_y, mask, scale), reference.block_mask_backward(grad_y, mask_ref, scale_ref))


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in KERNEL_BACKENDS if b != "triton" or d == "cuda"])
@pytest.mark.parametrize("shape", [(3, 40, 16, 16), (4, 96, 4, 4), (2, 33, 14, 14), (3, 5, 70, 100)])
@pytest.mark.parametrize("couple_channels", [False, True])
def test_apply_of_large_masks_matches_reference(device, backend, shape, couple_channels):
    """The apply pass (the backward) at sizes where the CPU kernel works in batches of rows that cross
    planes and samples, on widths of whole and partial mask bytes, with dirty padding bits."""
    generator = torch.Generator().manual_seed(4)
    n, c, h, w = shape
    mask_shape = (n, 1 if couple_channels else c, h, (w + 7) // 8)
    mask = torch.randint(0, 256, mask_shape, generator=generator, dtype=torch.int64).to(torch.uint8).to(device)
    scale = (torch.rand(n, generator=generator) + 0.5).to(device)
    grad_y = torch.randn(shape, generator=generator).to(device)
    assert_same_bits(backward_op(backend)(grad_y, mask, scale), reference.block_mask_backward(grad_y, mask, scale))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_large_seeds_and_gamma_edges(device, backend):
    x = torch.randn(2, 3, 10, 12, device=device)
    for seed in (0, 2**63 - 1, -(2**63), -1):
        for gamma in (0.0, 1e-3, 0.25, 1.0, 3.0):
            args = (x, seed, gamma, 3, False, True, 1e-6)
            for actual, expected in zip(forward_op(backend)(*args), reference.block_mask_forward(*args)):
                assert_same_bits(actual, expected)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_public_api_forward_and_backward_match_reference(device, backend, dtype):
    x = torch.randn(2, 4, 12, 10, device=device).to(dtype)
    kwargs = dict(p=0.35, block_size=3, seed=77)
    y, grad = run_with_grad(x, backend, **kwargs)
    y_ref, grad_ref = run_with_grad(x, "reference", **kwargs)
    assert_same_bits(y, y_ref)
    assert_same_bits(grad, grad_ref)
    assert y.dtype == dtype


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 11, 14), (2, 5, 11, 1), (1, 5, 1, 14)])
def test_channels_last_and_non_contiguous(device, backend, shape):
    for name, x in memory_layouts(torch.randn(shape, device=device)).items():
        for couple in (False, True):
            kwargs = dict(p=0.3, block_size=3, seed=5, couple_channels=couple)
            y, grad = run_with_grad(x, backend, **kwargs)
            y_ref, grad_ref = run_with_grad(x.contiguous(), "reference", **kwargs)
            assert torch.equal(y.contiguous(), y_ref) and torch.equal(grad.contiguous(), grad_ref), name
            if name == "channels_last":
                assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_batch_and_empty_maps(device, backend):
    for shape in [(0, 3, 8, 8), (2, 0, 8, 8), (2, 3, 0, 8), (2, 3, 8, 0)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        y = robustdrop.drop_block2d(x, 0.2, 3, seed=1, backend=backend)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradcheck_float64(device, backend):
    x = torch.randn(1, 2, 5, 6, device=device, dtype=torch.float64, requires_grad=True)
    for couple in (False, True):
        def fn(inp):
            return robustdrop.drop_block2d(inp, 0.3, 3, seed=9, couple_channels=couple, backend=backend)
        assert_gradients_check(fn, x, backend=backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_opcheck(device, backend):
    forward, backward = backend_ops(backend)
    x = torch.randn(2, 3, 9, 10, device=device, requires_grad=True)
    for couple in (False, True):
        torch.library.opcheck(forward, (x, 3, 0.2, 3, couple, True, 1e-6))
        assert_drawn_seed_variant(forward, (x, 3, 0.2, 3, couple, True, 1e-6), seed_position=1)
    _, mask, scale = forward(x.detach(), 3, 0.2, 3, False, True, 1e-6)
    torch.library.opcheck(backward, (torch.randn_like(x), mask, scale))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(device, backend):
    torch._dynamo.reset()

    def step(x, seed):
        y = robustdrop.drop_block2d(x, 0.25, 3, seed=seed, backend=backend)
        return (y * y).sum()

    assert_compiled_matches_eager(step, torch.randn(2, 3, 12, 12, device=device, requires_grad=True))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_compile_with_dynamic_map_sizes(device, backend):
    assert_compiled_follows_map_sizes(
        lambda x: robustdrop.drop_block2d(x, 0.4, 3, seed=4, backend=backend), device)


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in DEVICE_BACKENDS if b != "triton" or d == "cuda"])
def test_drop_rate_statistics(device, backend):
    """As timm tests its DropBlock: the dropped fraction within 0.03 of p at p = 0.1."""
    x = torch.ones(32, 16, 56, 56, device=device)
    for block_size in (3, 7):
        for couple in (False, True):
            y = robustdrop.drop_block2d(x, 0.1, block_size, seed=block_size, couple_channels=couple, backend=backend)
            dropped = (y == 0).double().mean().item()
            assert abs(dropped - 0.1) < 0.03, (block_size, couple, dropped)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_large_tensor_keeps_the_right_scale(device):
    """The kept count is an integer, so the scale does not overflow float16 (torchvision's sum does)."""
    x = torch.ones(16, 64, 128, 128, device=device, dtype=torch.float16)
    backend = "cuda" if device == "cuda" and robustdrop.backends()["cuda"].available else "auto"
    y = robustdrop.drop_block2d(x, 0.1, 5, seed=3, backend=backend)
    kept = (y != 0).sum().item()
    assert torch.isfinite(y).all()
    expected_scale = x.numel() / (1e-6 + kept)
    assert abs(y.max().item() - expected_scale) <= expected_scale * 2**-10


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nothing_kept_with_zero_eps_gives_zero_gradients(device, backend):
    """eps = 0 and a batch, or a sample group, with nothing kept: its scale numel / 0 = inf multiplies no
    kept value, and y and dx are 0 there (keep ? dy * scale : 0), never 0 * inf = NaN; the reference,
    whose gradient is autograd's, once gave NaN."""
    x = torch.randn(4, 2, 5, 5, device=device)
    for p, normalize in ((1.0, "batch"), (torch.tensor([1.0, 0.2, 1.0, 0.1], device=device), "sample")):
        kwargs = dict(p=p, block_size=1, eps=0.0, normalize=normalize, seed=3)
        y, grad = run_with_grad(x, backend, **kwargs)
        y_ref, grad_ref = run_with_grad(x, "reference", **kwargs)
        assert not bool(grad.isnan().any()) and bool((grad[0] == 0).all())
        assert_same_bits(y, y_ref)
        assert_same_bits(grad, grad_ref)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_and_inf_reach_kept_outputs_only(device, backend):
    x = torch.randn(2, 3, 10, 10, device=device)
    x[0, 0] = float("nan")
    x[1, 2] = float("inf")
    y = robustdrop.drop_block2d(x, 0.5, 3, seed=11, backend=backend)
    keep = reference.block_keep_mask((2, 3, 10, 10), robustdrop._seed.op_seed(11),
                                     reference.drop_rate_to_gamma(0.5, 10, 10, 3), 3, False).to(device)
    assert (y[~keep] == 0).all()
    assert torch.isnan(y[0, 0][keep[0, 0]]).all() and torch.isinf(y[1, 2][keep[1, 2]]).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_eval_mode_and_zero_rate_are_identity(device, backend):
    x = torch.randn(2, 3, 8, 8, device=device)
    assert robustdrop.drop_block2d(x, 0.5, 3, training=False, backend=backend) is x
    assert robustdrop.drop_block2d(x, 0.0, 3, backend=backend) is x
    layer = DropBlock2d(0.5, 3, backend=backend).eval()
    assert torch.equal(layer(x), x)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_seeds(device, backend):
    x = torch.randn(2, 3, 16, 16, device=device)
    a = robustdrop.drop_block2d(x, 0.3, 3, seed=1, backend=backend)
    b = robustdrop.drop_block2d(x, 0.3, 3, seed=1, backend=backend)
    c = robustdrop.drop_block2d(x, 0.3, 3, seed=2, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a == 0, c == 0)
    # A seed is taken modulo 2**64.
    assert torch.equal(robustdrop.drop_block2d(x, 0.3, 3, seed=-1, backend=backend),
                       robustdrop.drop_block2d(x, 0.3, 3, seed=2**64 - 1, backend=backend))
    torch.manual_seed(123)
    d = robustdrop.drop_block2d(x, 0.3, 3, backend=backend)
    e = robustdrop.drop_block2d(x, 0.3, 3, backend=backend)
    torch.manual_seed(123)
    assert torch.equal(robustdrop.drop_block2d(x, 0.3, 3, backend=backend), d)
    assert not torch.equal(d == 0, e == 0)


BAD_CALLS = [
    (dict(x=torch.randn(3, 8, 8)), ValueError, "x must be 4-D"),
    (dict(x=torch.randint(0, 5, (2, 3, 8, 8))), TypeError, "x must be a floating-point"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(p=1.5), ValueError, "p must be in"),
    (dict(p=-0.1), ValueError, "p must be in"),
    (dict(p=10**400), ValueError, "p must be in"),
    (dict(p="0.1"), TypeError, "p must be a real"),
    (dict(block_size=0), ValueError, "block_size must be >= 1"),
    (dict(block_size=2.5), TypeError, "block_size must be an int"),
    (dict(normalize="sum"), ValueError, "normalize must be one of"),
    (dict(eps=-1.0), ValueError, "eps must be >= 0"),
    (dict(eps=float("inf")), ValueError, "eps must be finite, got inf"),
    (dict(eps=float("nan")), ValueError, "eps must be finite, got nan"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(couple_channels="yes"), TypeError, "couple_channels must be a bool"),
    (dict(couple_channels=None), TypeError, "couple_channels must be a bool"),
    (dict(couple_channels=1), TypeError, "couple_channels must be a bool"),
    (dict(training="no"), TypeError, "training must be a bool"),
    (dict(training=torch.tensor(False)), TypeError, "training must be a bool"),
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bad,error,message", BAD_CALLS)
def test_bad_input_is_a_clear_error(device, backend, bad, error, message):
    args = dict(x=torch.randn(2, 3, 8, 8), p=0.1, block_size=3)
    args.update(bad)
    if isinstance(args["x"], torch.Tensor):
        args["x"] = args["x"].to(device)
    x, p, block_size = args.pop("x"), args.pop("p"), args.pop("block_size")
    with pytest.raises(error, match=message):
        robustdrop.drop_block2d(x, p, block_size, backend=backend, **args)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_ops_called_directly_reject_bad_input(device, backend):
    forward, backward = forward_op(backend), backward_op(backend)
    x = torch.randn(2, 3, 8, 8, device=device)
    with pytest.raises(ValueError, match="x must be 4-D"):
        forward(x[0], 1, 0.1, 3, False, True, 1e-6)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        forward(x.long(), 1, 0.1, 3, False, True, 1e-6)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        forward(x, 1, 0.1, 0, False, True, 1e-6)
    with pytest.raises(ValueError, match="block_size must be <="):
        forward(x, 1, 0.1, 9, False, True, 1e-6)
    for eps in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            forward(x, 1, 0.1, 3, False, True, eps)
    _, mask, scale = forward(x, 1, 0.1, 3, False, True, 1e-6)
    with pytest.raises(ValueError, match="mask must have shape"):
        backward(x, mask[:, :, :4], scale)
    with pytest.raises(TypeError, match="mask must be uint8"):
        backward(x, mask.float(), scale)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", [name for name in ("cuda", "triton") if robustdrop.backends()[name].available])
def test_second_gpu_without_set_device(backend):
    """x on cuda:1 while cuda:0 is the current device (several GPUs in one process, no set_device): the
    kernels run on x's device and give what they give on cuda:0, forward and backward."""
    assert torch.cuda.current_device() == 0
    x = torch.randn(2, 3, 13, 11, device="cuda:0")
    expected = run_with_grad(x, backend, p=0.3, block_size=3, seed=11)
    actual = run_with_grad(x.to("cuda:1"), backend, p=0.3, block_size=3, seed=11)
    for got, want in zip(actual, expected):
        assert got.device == torch.device("cuda:1")
        assert_same_bits(got.cpu(), want.cpu())


def test_backend_selection(monkeypatch):
    status = robustdrop.backends()
    assert set(status) == {"cuda", "triton", "cpu", "reference"}
    for name, entry in status.items():
        assert isinstance(entry.available, bool) and (entry.available or entry.reason), name
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        robustdrop.drop_block2d(x, 0.1, 3, backend="gpu")
    if not status["cuda"].available:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            robustdrop.drop_block2d(x, 0.1, 3, backend="cuda")
    else:
        with pytest.raises(ValueError, match="runs on CUDA tensors"):
            robustdrop.drop_block2d(x, 0.1, 3, backend="cuda")
    # ROBUSTDROP_BACKEND overrides auto; the result is the same function either way.
    monkeypatch.setenv("ROBUSTDROP_BACKEND", "reference")
    via_env = robustdrop.drop_block2d(x, 0.3, 3, seed=4)
    monkeypatch.setenv("ROBUSTDROP_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="ROBUSTDROP_BACKEND must be one of"):
        robustdrop.drop_block2d(torch.randn(1, 1, 9, 9), 0.3, 3, seed=4)
    monkeypatch.delenv("ROBUSTDROP_BACKEND")
    assert torch.equal(via_env, robustdrop.drop_block2d(x, 0.3, 3, seed=4))


def test_cpu_parametrisations_name_triton_only_under_its_interpreter(monkeypatch):
    """On a GPU machine Triton is available but its interpreter is off, and the triton backend refuses
    CPU tensors: the tests' CPU parametrisations must leave it out there, and keep it here."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in available_backends("cpu")
    with pytest.raises(ValueError, match=r"runs on CUDA tensors \(or CPU tensors under TRITON_INTERPRET=1\)"):
        robustdrop._backend._check_device("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if robustdrop.backends()["triton"].available and not EMULATED_CUDA:
        assert "triton" in available_backends("cpu")


def test_import_without_extension_or_triton():
    """Only the reference then: one warning at import, ops still work."""
    script = r"""
import sys, warnings
sys.modules["triton"] = None  # makes `import triton` fail as if it were not installed
sys.modules["robustdrop._C"] = None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import robustdrop, torch
    status = robustdrop.backends()
    y = robustdrop.drop_block2d(torch.ones(1, 2, 8, 8), 0.3, 3, seed=1)
assert not status["cpu"].available and not status["triton"].available, status
assert status["reference"].available
assert len(caught) == 1, [str(w.message) for w in caught]
print("ok", (y == 0).any().item())
"""
    env = dict(os.environ)
    env.pop("ROBUSTDROP_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok True"


def test_module_is_a_drop_in_for_torchvision():
    layer = DropBlock2d(0.2, 5, False, 1e-5)  # torchvision's positional order
    assert (layer.p, layer.block_size, layer.inplace, layer.eps) == (0.2, 5, False, 1e-5)
    assert "p=0.2" in repr(layer) and "block_size=5" in repr(layer)
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    assert torch.equal(y, robustdrop.drop_block2d(x, 0.2, 5, eps=1e-5))
    inplace = DropBlock2d(0.2, 5, inplace=True)
    x2 = x.clone()
    torch.manual_seed(0)
    out = inplace(x2)
    assert out is x2
    torch.manual_seed(0)
    assert torch.equal(x2, robustdrop.drop_block2d(x, 0.2, 5))
    assert not torch.equal(x2, x)


MODULE_BAD_ARGUMENTS = [
    (dict(p=1.5), ValueError, r"p must be in \[0, 1\], got 1.5"),
    (dict(p="0.1"), TypeError, "p must be a real number"),
    (dict(p=True), TypeError, "p must be a real number"),
    (dict(p=torch.tensor([0.1, 1.2])), ValueError, r"p must hold drop rates in \[0, 1\]"),
    (dict(p=torch.tensor([[0.1]])), ValueError, r"p must be a float, a 0-d tensor or a tensor \(N,\)"),
    (dict(p=torch.tensor(1)), TypeError, "p must be a float or a floating-point tensor"),
    (dict(block_size=0), ValueError, "block_size must be >= 1"),
    (dict(block_size=2.5), TypeError, "block_size must be an int"),
    (dict(inplace="no"), TypeError, "inplace must be a bool"),
    (dict(eps=-1.0), ValueError, "eps must be >= 0"),
    (dict(eps=float("inf")), ValueError, "eps must be finite"),
    (dict(couple_channels="yes"), TypeError, "couple_channels must be a bool"),
    (dict(normalize="x"), ValueError, "normalize must be one of"),
    (dict(backend="gpu"), ValueError, r"backend must be one of \('auto', 'cuda', 'triton', 'cpu', 'reference'\), "
                                      r"got 'gpu'"),
]


@pytest.mark.parametrize("bad,error,message", MODULE_BAD_ARGUMENTS)
def test_module_bad_arguments_are_clear_errors(bad, error, message):
    """Refused where the layer is built, with the functional op's messages (torchvision's DropBlock2d
    checks its p there too)."""
    args = dict(p=0.1, block_size=3)
    args.update(bad)
    with pytest.raises(error, match=message):
        DropBlock2d(args.pop("p"), args.pop("block_size"), **args)


def test_module_takes_every_valid_rate_and_backend_name():
    """A float, a 0-d or an (N,) tensor rate; a valid backend name not available here (it may be moved to a
    device that has it later)."""
    for p in (0, 1, 0.25):
        assert DropBlock2d(p, 3).p == p
    for p in (torch.tensor(0.25), torch.tensor([0.1, 0.2])):
        assert DropBlock2d(p, 3).p is p
    for backend in ("auto",) + robustdrop._backend.BACKEND_NAMES:
        assert DropBlock2d(0.1, 3, backend=backend).backend == backend


def test_saved_for_backward_is_one_bit_per_element():
    status = robustdrop.backends()
    if not status["cpu"].available:
        pytest.skip("the compiled extension is not built")
    x = torch.randn(4, 8, 32, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        robustdrop.drop_block2d(x, 0.1, 3, seed=1, backend="cpu")
    total_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert total_bytes <= x.numel() // 8 + 4


# Per-sample drop rates and normalisation groups (Active DropBlock's batched step).
SAMPLE_RATES = [0.0, 0.1, 0.35, 0.05, 0.225, 0.6]


def sample_gamma(rates, height, width, bs, device):
    return reference.drop_rate_to_gamma(torch.tensor(rates, device=device), height, width, bs).to(torch.float32)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("couple_channels", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_per_sample_rates_and_groups_match_reference_bit_for_bit(device, backend, couple_channels, normalize):
    generator = torch.Generator().manual_seed(3)
    for shape, block_size in [((6, 3, 11, 9), 3), ((6, 2, 7, 16), 4), ((6, 1, 5, 5), 5)]:
        x = torch.randn(shape, generator=generator).to(device)
        gamma = sample_gamma(SAMPLE_RATES, shape[2], shape[3], block_size, device)
        for groups in (1, 2, 3, 6):
            args = (x, 41 + groups, 0.0, block_size, couple_channels, normalize, 1e-6, gamma, groups)
            y, mask, scale = forward_op(backend)(*args)
            y_ref, mask_ref, scale_ref = reference.block_mask_forward(*args)
            assert_same_bits(mask, mask_ref)
            assert_same_bits(scale, scale_ref)
            assert_same_bits(y, y_ref)
            assert scale.shape == (() if groups == 1 else (groups,))
            grad_y = torch.randn(shape, generator=generator).to(device)
            assert_same_bits(backward_op(backend)(grad_y, mask, scale),
                             reference.block_mask_backward(grad_y, mask_ref, scale_ref))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_nan_or_negative_sample_probability_draws_no_seeds(device, backend):
    """The ops do not read sample_gamma's values (no device sync; the public API checks the rates in eager
    mode only): a NaN or negative probability draws no seeds on every backend, as uniform < NaN is false."""
    x = torch.rand(4, 3, 10, 9, device=device) + 1.0
    gamma = torch.tensor([float("nan"), 0.08, -0.5, float("-inf")], device=device)
    args = (x, 7, 0.0, 3, False, False, 1e-6, gamma, 1)
    y, mask, scale = forward_op(backend)(*args)
    y_ref, mask_ref, scale_ref = reference.block_mask_forward(*args)
    assert_same_bits(mask, mask_ref)
    assert_same_bits(y, y_ref)
    for n in (0, 2, 3):
        assert_same_bits(y[n], x[n])
    assert (y[1] == 0).any()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_each_sample_gets_the_mask_of_its_own_rate(device, backend):
    """Sample n of a per-sample call is sample n of a plain call at rate p[n] with the same seed."""
    x = torch.rand(6, 3, 12, 10, device=device) + 1.0
    rates = torch.tensor(SAMPLE_RATES, device=device)
    y = robustdrop.drop_block2d(x, rates, 3, seed=8, normalize="none", backend=backend)
    for n, rate in enumerate(SAMPLE_RATES):
        plain = robustdrop.drop_block2d(x, rate, 3, seed=8, normalize="none", backend=backend)
        assert torch.equal(y[n], plain[n]), n


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_equal_per_sample_rates_are_the_scalar_rate(device, backend):
    x = torch.randn(4, 3, 9, 11, device=device)
    for couple in (False, True):
        scalar = robustdrop.drop_block2d(x, 0.3, 3, seed=12, couple_channels=couple, backend=backend)
        per_sample = robustdrop.drop_block2d(x, torch.full((4,), 0.3, device=device), 3, seed=12,
                                             couple_channels=couple, backend=backend)
        assert_same_bits(per_sample, scalar)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sample_normalization_scales_each_sample_by_its_own_count(device, backend):
    x = torch.ones(6, 2, 10, 10, device=device)
    y = robustdrop.drop_block2d(x, torch.tensor(SAMPLE_RATES, device=device), 3, seed=5, normalize="sample",
                                backend=backend)
    for n in range(6):
        kept = (y[n] != 0).sum().item()
        expected = torch.tensor(200 / (1e-6 + kept), dtype=torch.float64).float().item()
        assert torch.equal(y[n][y[n] != 0], torch.full((kept,), expected, device=device)), n
    plain = robustdrop.drop_block2d(x, 0.2, 3, seed=5, normalize="sample", backend=backend)
    assert torch.equal(plain != 0, robustdrop.drop_block2d(x, 0.2, 3, seed=5, normalize="none", backend=backend) != 0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_per_sample_public_api_forward_and_backward_match_reference(device, backend):
    for dtype in FLOAT_DTYPES:
        x = torch.randn(6, 3, 8, 9, device=device).to(dtype)
        for normalize in ("batch", "sample"):
            kwargs = dict(p=torch.tensor(SAMPLE_RATES, device=device), block_size=3, seed=21, normalize=normalize)
            y, grad = run_with_grad(x, backend, **kwargs)
            y_ref, grad_ref = run_with_grad(x, "reference", **kwargs)
            assert_same_bits(y, y_ref)
            assert_same_bits(grad, grad_ref)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_per_sample_gradcheck_float64(device, backend):
    x = torch.randn(4, 2, 5, 6, device=device, dtype=torch.float64, requires_grad=True)
    rates = torch.tensor([0.1, 0.4, 0.0, 0.3], device=device)

    def fn(inp):
        return robustdrop.ops.block_mask.block_drop(inp, rates, 3, couple_channels=False, normalize=True, eps=1e-6,
                                                    normalize_groups=2, seed=9, backend=backend)

    assert_gradients_check(fn, x, backend=backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_per_sample_opcheck(device, backend):
    forward, backward = backend_ops(backend)
    x = torch.randn(4, 3, 9, 10, device=device, requires_grad=True)
    gamma = sample_gamma([0.1, 0.0, 0.3, 0.2], 9, 10, 3, device)
    for groups in (1, 2):
        torch.library.opcheck(forward, (x, 3, 0.0, 3, False, True, 1e-6, gamma, groups))
    _, mask, scale = forward(x.detach(), 3, 0.0, 3, False, True, 1e-6, gamma, 4)
    torch.library.opcheck(backward, (torch.randn_like(x), mask, scale))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_per_sample_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    rates = torch.tensor([0.0, 0.1, 0.2, 0.3], device=device)

    def step(x, rates, seed):
        y = robustdrop.ops.block_mask.block_drop(x, rates, 3, couple_channels=False, normalize=True, eps=1e-6,
                                                 normalize_groups=2, seed=seed, backend=backend)
        return (y * y).sum()

    assert_compiled_matches_eager(step, torch.randn(4, 3, 10, 10, device=device, requires_grad=True), rates)


@pytest.mark.parametrize("fullgraph", [True, False])
@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_per_sample_public_op_torch_compile(device, backend, fullgraph):
    """drop_block2d with per-sample rates under torch.compile: the rates' values are not read while
    tracing (that would be a graph break, or an error with fullgraph=True), so the call stays in one
    graph and gives eager's bits, drawn seed included."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def call(x, rates):
        return robustdrop.drop_block2d(x, rates, 3, normalize="sample", backend=backend)

    compiled = torch.compile(call, fullgraph=fullgraph, backend="aot_eager")
    x = torch.randn(4, 3, 10, 10, device=device, requires_grad=True)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device)
    for rates in ([0.0, 0.1, 0.2, 0.3], [0.3, 0.0, 0.05, 0.1]):
        rates = torch.tensor(rates, device=device)
        torch.manual_seed(8)
        y = compiled(x, rates)
        (grad,) = torch.autograd.grad(y, x, grad_y)
        torch.manual_seed(8)
        y_eager = call(x, rates)
        (grad_eager,) = torch.autograd.grad(y_eager, x, grad_y)
        assert_same_bits(y, y_eager)
        assert_same_bits(grad, grad_eager)
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in DEVICE_BACKENDS if b != "triton" or d == "cuda"])
def test_per_sample_drop_rate_statistics(device, backend):
    """Each group of samples loses its own rate, within 0.03, as the plain statistics test."""
    rates = [0.0, 0.1, 0.2, 0.05]
    x = torch.ones(32, 16, 56, 56, device=device)
    p = torch.tensor(rates, device=device).repeat_interleave(8)
    y = robustdrop.drop_block2d(x, p, 5, seed=17, normalize="none", backend=backend)
    dropped = (y == 0).double().view(4, -1).mean(1).tolist()
    for rate, fraction in zip(rates, dropped):
        assert abs(fraction - rate) < 0.03, (rates, dropped)


PER_SAMPLE_BAD_CALLS = [
    (torch.tensor([0.1, 0.2]), ValueError, r"p must be a float, a 0-d tensor or a tensor \(N,\) = \(3,\)"),
    (torch.tensor([[0.1, 0.2, 0.3]]), ValueError, r"p must be a float, a 0-d tensor or a tensor \(N,\)"),
    (torch.tensor([0, 1, 0]), TypeError, "p must be a float or a floating-point tensor"),
    (torch.tensor([0.1, 1.2, 0.3]), ValueError, r"p must hold drop rates in \[0, 1\]"),
    (torch.tensor([0.1, float("nan"), 0.3]), ValueError, r"p must hold drop rates in \[0, 1\]"),
    (torch.tensor(1), TypeError, "p must be a float or a floating-point tensor"),
    (torch.tensor(-0.1), ValueError, r"p must hold drop rates in \[0, 1\]"),
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("p,error,message", PER_SAMPLE_BAD_CALLS)
def test_per_sample_bad_rates_are_clear_errors(device, backend, p, error, message):
    with pytest.raises(error, match=message):
        robustdrop.drop_block2d(torch.randn(3, 2, 8, 8, device=device), p.to(device), 3, backend=backend)


def test_zero_dim_rate_on_another_device_is_a_clear_error():
    with pytest.raises(ValueError, match=r"p as a 0-d tensor must be on x's device cpu or the CPU, got meta"):
        robustdrop.drop_block2d(torch.randn(3, 2, 8, 8), torch.tensor(0.1, device="meta"), 3)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_zero_dim_rate_is_the_float_rate(device, backend):
    """A 0-d tensor p, on the CPU (read as a host scalar by a GPU op) or on x's device, gives the float
    p's output and gradient, to the bit. At p == 0 it still runs the op, whose scale is exactly 1 at
    this size (numel / (eps + numel) rounds to 1 in float32 from 34 elements on)."""
    x = torch.randn(4, 3, 9, 11, device=device)
    for rate in (0.0, 0.25, 0.3):
        tensor_rates = [torch.tensor(rate, dtype=torch.float64), torch.tensor(rate, dtype=torch.float64, device=device)]
        if float(torch.tensor(rate, dtype=torch.float32)) == rate:
            tensor_rates.append(torch.tensor(rate, dtype=torch.float32, device=device))
        for normalize in ("batch", "sample"):
            kwargs = dict(block_size=3, seed=12, normalize=normalize)
            y, grad = run_with_grad(x, backend, p=rate, **kwargs)
            for tensor_rate in tensor_rates:
                y_tensor, grad_tensor = run_with_grad(x, backend, p=tensor_rate, **kwargs)
                assert_same_bits(y_tensor, y)
                assert_same_bits(grad_tensor, grad)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_zero_dim_rate_changed_in_place_does_not_recompile(device, backend):
    """A 0-d CPU rate under torch.compile(fullgraph=True) is a graph input: a schedule that changes it in
    place runs one graph, and each step gives the float rate's eager bits."""
    def call(x, p):
        return robustdrop.drop_block2d(x, p, 3, backend=backend)

    # At p == 0 too: the op's scale is exactly 1 here.
    assert_in_place_rate_runs_one_graph(call, torch.randn(4, 3, 10, 10, device=device))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_per_sample_ops_called_directly_reject_bad_input(device, backend):
    forward, backward = backend_ops(backend)
    x = torch.randn(4, 3, 8, 8, device=device)
    gamma = torch.full((4,), 0.05, device=device)
    with pytest.raises(TypeError, match="sample_gamma must be float32"):
        forward(x, 1, 0.0, 3, False, True, 1e-6, gamma.double(), 1)
    with pytest.raises(ValueError, match=r"sample_gamma must have shape \(N,\) = \(4,\)"):
        forward(x, 1, 0.0, 3, False, True, 1e-6, gamma[:3], 1)
    for groups in (0, 3):
        with pytest.raises(ValueError, match="normalize_groups must be >= 1 and divide N = 4"):
            forward(x, 1, 0.0, 3, False, True, 1e-6, gamma, groups)
    _, mask, _ = forward(x, 1, 0.0, 3, False, True, 1e-6, gamma, 2)
    with pytest.raises(ValueError, match=r"scale must hold one value or have shape \(G,\) with G dividing N = 4"):
        backward(x, mask, torch.ones(3, device=device))


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_compiled_ops_autograd_runs_no_python(device):
    x = torch.randn(2, 3, 9, 10, device=device, requires_grad=True)
    forward = torch.ops.robustdrop.block_mask_forward
    assert python_calls_in_autograd(lambda t: forward(t, 3, 0.2, 3, False, True, 1e-6)[0], x) == []
    gamma = torch.full((2,), 0.2, device=device)
    assert python_calls_in_autograd(lambda t: forward(t, 3, 0.0, 3, True, True, 1e-6, gamma, 2)[0], x) == []
