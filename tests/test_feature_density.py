"""Feature-density dropout (DESIGN.md 4.3) on every backend against the single reference.

The cross-backend contract: every backend's float32 PCA may put a channel in
the neighbouring cell only when the reference's float64 coordinate lies within
EDGE_BOUND (relative to the axis range) of a bin edge. On inputs with that
margin (and a clear spectral gap, so the axes themselves are well defined)
cells, counts, masks, scales and outputs are identical, to the bit.
"""
import math

import pytest
import torch

import robustdrop
from robustdrop.nn import FeatureDensityDropout1d, FeatureDensityDropout2d
from robustdrop.reference import block_mask as block_reference
from robustdrop.reference import feature_density as reference
from conftest import (COMPILED_DEVICES, DEVICE_BACKENDS, KERNEL_BACKENDS, assert_backend_matches_reference,
                      assert_compiled_matches_eager, assert_gradients_check, assert_drawn_seed_variant,
                      assert_same_bits, memory_layouts, nan_payloads, python_calls_in_autograd)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EDGE_BOUND = 1e-4  # DESIGN.md 4.3


def op(name: str, backend: str):
    if backend == "reference":
        return getattr(reference, name)
    return getattr(torch.ops.robustdrop, name + ("_triton" if backend == "triton" else ""))


def low_rank_input(shape, generator, rank=4, noise=0.05):
    """x (N, C, H, W) whose channels mix `rank` random maps with strengths 8, 4, 2, 1, ... plus noise:
    clear gaps between the top eigenvalues, as real feature maps have."""
    n, c, h, w = shape
    maps = torch.randn(n, rank, h * w, generator=generator)
    strengths = 8.0 / 2.0 ** torch.arange(rank, dtype=torch.float32)
    mixing = torch.randn(n, c, rank, generator=generator) * strengths
    x = mixing @ maps + noise * torch.randn(n, c, h * w, generator=generator)
    return x.view(shape)


def has_margin(x: torch.Tensor, dims: int, grids: int) -> bool:
    """No channel within 10 * EDGE_BOUND of a bin edge, and each axis's orientation decided by a margin."""
    f = reference.feature_coordinates(x, dims)
    if not bool((reference.bin_edge_distance(f, grids) > 10 * EDGE_BOUND).all()):
        return False
    if x.dim() == 4:
        for sample in x:
            _, axes = reference.principal_axes(sample.reshape(sample.shape[0], -1), dims)
            top2 = axes.abs().topk(min(2, axes.shape[0]), dim=0).values
            if axes.shape[0] > 1 and bool((top2[1] > 0.99 * top2[0]).any()):
                return False
    return True


def margin_input(shape, dims, grids, first_seed):
    """A low-rank input (or (N, F) features) with the contract's margin."""
    for attempt in range(200):
        generator = torch.Generator().manual_seed(first_seed + attempt)
        x = low_rank_input(shape, generator) if len(shape) == 4 else torch.randn(shape, generator=generator)
        if has_margin(x, dims, grids):
            return x
    raise AssertionError("no input with a margin found")


# (shape, dims, grids): both sides of C vs H*W (Gram and covariance), FC features, odd sizes.
CASES = [
    ((3, 12, 5, 5), 2, 5),   # C < H*W: the Gram side
    ((2, 20, 3, 3), 2, 5),   # C > H*W: the covariance side
    ((2, 37, 3, 5), 2, 5),   # the covariance side, C and H*W past whole 8 x 8 blocks
    ((2, 16, 4, 4), 3, 3),   # C = H*W
    ((3, 10, 2, 7), 1, 25),
    ((2, 9, 6, 5), 3, 2),
    ((4, 30), 1, 25),        # FC features
    ((2, 13), 1, 4),
    ((1, 64, 8, 8), 2, 5),   # 64 x 64 tiles, as in SmallCNN: the widest the suite sends the Triton kernels
]


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,dims,grids", CASES)
def test_density_matches_reference_on_inputs_with_a_margin(device, backend, shape, dims, grids):
    x = margin_input(shape, dims, grids, 10 * len(shape) + dims)
    cell, counts = op("feature_density", backend)(x.to(device), dims, grids)
    cell_ref, counts_ref = reference.feature_density(x, dims, grids)
    assert cell.dtype == torch.int64 and counts.shape == (shape[0], grids**dims)
    assert torch.equal(cell.cpu(), cell_ref) and torch.equal(counts.cpu(), counts_ref)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_channel_mask_apply_of_a_unit_scale_keeps_the_bits(device, backend, dtype):
    """channel_mask_backward with a 0-d scale of exactly 1 (FDD without rescale, EWS's gates) multiplies
    nothing: kept NaNs keep their sign and payload, as the reference's select; with a 0-d scale of 2 or
    per-channel scales it multiplies, as the reference does."""
    generator = torch.Generator().manual_seed(4)
    keep = torch.rand(3, 10, generator=generator) < 0.5
    mask = block_reference.pack_keep_mask(keep).to(device)
    maps = memory_layouts(nan_payloads((3, 10, 2, 5), dtype, device))
    for x in [nan_payloads((3, 10), dtype, device), *maps.values()]:
        one = torch.ones((), dtype=torch.float32, device=device)
        assert_same_bits(op("channel_mask_backward", backend)(x, mask, one),
                         reference.channel_mask_backward(x, mask, one))
        finite = torch.randn(x.shape, generator=generator).to(device=device, dtype=dtype)
        per_channel = torch.where(keep, torch.tensor([1.0, 1.25]).repeat(3, 5), 0.0).to(device)
        for scale in (torch.full((), 2.0, device=device), per_channel):
            assert_same_bits(op("channel_mask_backward", backend)(finite, mask, scale),
                             reference.channel_mask_backward(finite, mask, scale))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("shape,dims,grids", CASES[:2] + CASES[6:7])
def test_forward_matches_reference_bit_for_bit(device, backend, rescale, shape, dims, grids):
    x = margin_input(shape, dims, grids, 20 + dims).to(device)
    args = (x, dims, grids, 1234567, -0.8, 0.9, rescale)
    outputs = op("feature_density_forward", backend)(*args)
    expected = reference.feature_density_forward(*args)
    for actual, wanted in zip(outputs, expected):
        assert_same_bits(actual, wanted)
    grad = torch.linspace(-1, 2, x.numel(), device=device).view(x.shape)
    assert_same_bits(op("channel_mask_backward", backend)(grad, *outputs[1:]),
                     reference.channel_mask_backward(grad, *expected[1:]))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_cells_differ_only_near_a_bin_edge(device, backend):
    """On random inputs without a chosen margin, a channel's cell may differ from the reference's
    only if its reference coordinate is within EDGE_BOUND of a bin edge; such channels are rare."""
    generator = torch.Generator().manual_seed(3)
    x = low_rank_input((8, 24, 5, 5), generator)
    for dims, grids in [(1, 25), (2, 5), (3, 3)]:
        f = reference.feature_coordinates(x, dims)
        near_edge = reference.bin_edge_distance(f, grids) <= EDGE_BOUND
        cell, counts = op("feature_density", backend)(x.to(device), dims, grids)
        cell_ref, counts_ref = reference.feature_density(x, dims, grids)
        assert not bool(((cell.cpu() != cell_ref) & ~near_edge).any()), (dims, grids)
        clean = ~near_edge.any(1)
        assert torch.equal(counts.cpu()[clean], counts_ref[clean])
        assert near_edge.double().mean().item() <= 0.01


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,dims,grids", [CASES[0], CASES[1], CASES[6]])
def test_density_does_not_depend_on_the_magnitude_of_x(device, backend, shape, dims, grids):
    """Cells are invariant to a positive scale of x. The kernels' float32 PCA once overflowed
    from |x| ~ 1e9 (||M q||^2) and underflowed below ~1e-11, silently binning by garbage; they
    now scale each sample, and each axis before binning, by a power of two (exact), so x * 2**k
    has the cells of x, to the bit, for every k that keeps x in float32's normal range. With
    max |x| in [1, 2), 2**126 also overflows a plain float32 sum over the channels, and 2**127
    puts FC features of both signs so near FLT_MAX that hi - lo overflows."""
    x = margin_input(shape, dims, grids, 10 * len(shape) + dims)
    if x.dim() == 2:  # each sample's features spread over [-1.99, 1.99]: the same bins
        low, high = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        x = ((x - low) / (high - low) * 2.0 - 1.0) * 1.99
        assert has_margin(x, dims, grids)
    x = x * 2.0 ** -math.floor(math.log2(x.abs().max().item()))  # exact: the margin stays
    cell_ref, counts_ref = reference.feature_density(x, dims, grids)
    for k in (-100, -64, -36, 0, 30, 64, 100, 126) + ((127,) if x.dim() == 2 else ()):
        scaled = x * 2.0**k
        assert bool(torch.isfinite(scaled).all()) and bool((scaled.abs() >= torch.finfo(torch.float32).tiny).all())
        cell, counts = op("feature_density", backend)(scaled.to(device), dims, grids)
        assert torch.equal(cell.cpu(), cell_ref) and torch.equal(counts.cpu(), counts_ref), k


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_float64_beyond_float32_range_is_read_as_float32(device, backend):
    """Cells are a function of float32(x): float64 values past float32's range are Inf (every channel
    in cell 0), below its smallest subnormal 0, for the reference and the kernels alike; one sample
    per magnitude, the last keeping its cells in float32."""
    for shape, dims, grids in (CASES[0], CASES[6]):
        x = margin_input(shape, dims, grids, 10 * len(shape) + dims).to(torch.float64)
        magnitudes = torch.tensor([1e40, 1e-50, 1.0, 2.0], dtype=torch.float64)[:x.shape[0]]
        x = x * magnitudes.view(-1, *[1] * (x.dim() - 1))
        cell_ref, counts_ref = reference.feature_density(x, dims, grids)
        assert bool((cell_ref[:2] == 0).all()) and bool((cell_ref[2:] != 0).any()), shape
        cell, counts = op("feature_density", backend)(x.to(device), dims, grids)
        assert torch.equal(cell.cpu(), cell_ref) and torch.equal(counts.cpu(), counts_ref), shape


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_counts_sum_to_the_channels_over_grids_power_dims_cells(device, backend):
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(3, 17, 4, 6, generator=generator).to(device)
    for dims, grids in [(1, 25), (2, 5), (3, 3), (2, 1), (3, 7)]:
        cell, counts = robustdrop.feature_density(x, dims, grids, backend=backend)
        assert counts.shape == (3, grids**dims) and cell.shape == (3, 17)
        assert torch.equal(counts.sum(1).cpu(), torch.full((3,), 17))
        assert int(cell.min()) >= 0 and int(cell.max()) < grids**dims
        assert torch.equal(counts.cpu(), torch.nn.functional.one_hot(cell.cpu(), grids**dims).sum(1))
    assert robustdrop.feature_density(x, 2, backend=backend)[1].shape == (3, 25)  # default grids: 5 x 5
    assert robustdrop.feature_density(x, 3, backend=backend)[1].shape == (3, 27)  # 3 x 3 x 3


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_orientation_rule(device, backend):
    """Channels x[c] = t_c * u: the axis is oriented so that its largest-magnitude component is
    positive, so flipping u flips which end of the axis the outlier channel lands on."""
    u = torch.tensor([0.3, -0.2, 0.9, 0.1, -0.4, 0.05])
    t = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 5.0])
    for sign, outlier_bin in [(1.0, 3), (-1.0, 0)]:
        x = (t[:, None] * sign * u[None, :]).view(1, 6, 2, 3).to(device)
        cell, _ = robustdrop.feature_density(x, 1, 4, backend=backend)
        assert int(cell[0, 5]) == outlier_bin, (sign, cell)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_degenerate_inputs_have_a_defined_result(device, backend):
    generator = torch.Generator().manual_seed(2)
    one_map = torch.randn(1, 1, 5, 5, generator=generator)
    samples = {
        "all channels equal": one_map.expand(2, 6, 5, 5).clone(),
        "one channel": torch.randn(2, 1, 5, 5, generator=generator),
        "zeros": torch.zeros(2, 4, 3, 3),
        "empty maps": torch.zeros(2, 4, 0, 3),
    }
    for name, x in samples.items():
        cell, counts = robustdrop.feature_density(x.to(device), 2, 5, backend=backend)
        assert not bool(cell.any()), name
        assert torch.equal(counts[:, 0].cpu(), torch.full((2,), x.shape[1])), name
    # Constant maps (each channel its own constant): a rank-1 sample, binned along its one axis;
    # the second axis is absent (every channel in its bin 0).
    levels = torch.tensor([0.0, 1.0, 2.5, 3.5, 10.0])
    x = (levels.view(1, 5, 1, 1) * torch.ones(1, 5, 4, 4)).to(device)
    cell, _ = robustdrop.feature_density(x, 2, 5, backend=backend)
    assert cell.cpu().tolist() == [[0, 0, 1, 1, 4]]
    # One position per channel (H*W = 1): the centred values themselves are the coordinate.
    x = torch.tensor([0.0, 1.0, 2.0, 9.0, 10.0]).view(1, 5, 1, 1).to(device)
    assert robustdrop.feature_density(x, 1, 5, backend=backend)[0].cpu().tolist() == [[0, 0, 1, 4, 4]]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_in_a_map_puts_that_sample_in_cell_zero_and_reaches_kept_outputs_only(device, backend):
    x = margin_input((3, 12, 5, 5), 2, 5, 40)
    x[1, 4, 2, 2] = float("nan")
    x[2, 0, 0, 1] = float("inf")
    cell, counts = robustdrop.feature_density(x.to(device), 2, 5, backend=backend)
    cell_ref, _ = reference.feature_density(x, 2, 5)
    assert not bool(cell[1:].any()) and int(counts[1, 0]) == 12
    assert torch.equal(cell[0].cpu(), cell_ref[0])
    y, mask, _ = op("feature_density_forward", backend)(x.to(device), 2, 5, 3, 0.0, 0.5, False)
    kept = reference.block_mask.unpack_keep_mask(mask.cpu(), 12)
    assert bool(kept.any()) and not bool(kept.all())
    y = y.cpu()
    assert torch.equal(y[kept].isnan(), x[kept].isnan()) and torch.equal(y[kept].isinf(), x[kept].isinf())
    assert not bool(y[~kept].any())
    # FC features: a non-finite value puts the sample in cell 0.
    features = torch.randn(2, 9)
    features[0, 3] = float("nan")
    cell, _ = robustdrop.feature_density(features.to(device), 1, 4, backend=backend)
    assert not bool(cell[0].any()) and bool(cell[1].any())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("kappa,alpha", [(-0.8, 0.9), (0.8, 0.1)])
def test_probabilities_follow_density(device, backend, kappa, alpha):
    """With rescale every kept channel's scale is 1 / (1 - p): p falls with density for negative kappa
    (the paper's default) and rises with it for the positive-correlation variant."""
    x = margin_input((2, 20, 3, 3), 2, 5, 60).to(device)
    y, mask, scale = op("feature_density_forward", backend)(x, 2, 5, 77, kappa, alpha, True)
    _, counts = reference.feature_density(x.cpu(), 2, 5)
    cell, _ = reference.feature_density(x.cpu(), 2, 5)
    density = torch.gather(counts, 1, cell).double()
    kept = scale.cpu() > 0
    p = 1 - 1 / scale.cpu().double()
    expected = (kappa * density / counts.amax(1, keepdim=True) + alpha).clamp(0, 1)
    torch.testing.assert_close(p[kept], expected[kept], rtol=0, atol=1e-6)
    for n in range(2):
        order = density[n][kept[n]].argsort()
        steps = p[n][kept[n]][order].diff()
        assert bool((steps <= 1e-7).all() if kappa < 0 else (steps >= -1e-7).all())


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in DEVICE_BACKENDS if b != "triton" or d == "cuda"])
def test_each_channel_is_dropped_at_its_cells_rate(device, backend):
    """One sample repeated 2000 times: every copy has the same cells, and each channel's dropped
    fraction over the copies is within 4 sigma of its cell's probability."""
    copies = 2000
    sample = margin_input((1, 24, 3, 3), 2, 5, 80)
    x = sample.expand(copies, -1, -1, -1).contiguous().to(device)
    y = robustdrop.feature_density_dropout(x, 2, 5, seed=11, backend=backend).cpu()
    cell, counts = reference.feature_density(sample, 2, 5)
    p = reference.drop_probabilities(counts, -0.8, 0.9).double()[0, cell[0]]
    dropped = (y.flatten(2) == 0).all(2).double().mean(0)
    sigma = (p * (1 - p) / copies).sqrt()
    assert bool(((dropped - p).abs() <= 4 * sigma + 1e-9).all()), (dropped, p)


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in DEVICE_BACKENDS if b != "triton" or d == "cuda"])
def test_drop_rate_statistics(device, backend):
    """kappa = 0, alpha = 0.1: every channel's p is 0.1; on 32x16x56x56 the drop rate is within 0.03
    (as timm tests its layers). The reference's per-sample 3136 x 3136 eigh is too slow here: it
    runs on 8x8 maps."""
    size = 8 if backend == "reference" else 56
    x = torch.rand(32, 16, size, size, device=device)
    y = robustdrop.feature_density_dropout(x, 2, kappa=0.0, alpha=0.1, seed=5, backend=backend)
    assert abs((y == 0).double().mean().item() - 0.1) < 0.03


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nearly_equal_top_eigenvalues_do_not_hang(device, backend):
    """Isotropic samples (orthogonal channels of equal norm) and exact ties: any basis of the top
    eigenspace is a right answer; the op must return a valid one, promptly."""
    basis = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))[0]
    isotropic = basis.view(1, 16, 4, 4)
    perturbed = isotropic + 1e-6 * torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    x = torch.cat([isotropic, perturbed, torch.eye(16).view(1, 16, 4, 4)])  # the last: exact ties
    for dims in (1, 2, 3):
        cell, counts = robustdrop.feature_density(x.to(device), dims, 3, backend=backend)
        assert torch.equal(counts.sum(1).cpu(), torch.full((3,), 16))
        y = robustdrop.feature_density_dropout(x.to(device), dims, 3, seed=1, backend=backend)
        assert y.shape == x.shape


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes_forward_and_backward_match_reference(device, backend, dtype):
    x = margin_input((2, 10, 4, 4), 2, 5, 100)
    x = x.to(dtype)
    while not has_margin(x.to(torch.float64), 2, 5):  # the rounded input must keep the margin
        x = margin_input((2, 10, 4, 4), 2, 5, int(x.float().abs().sum()) % 1000).to(dtype)
    x = x.to(device).requires_grad_(True)

    def call(inp, name):
        return robustdrop.feature_density_dropout(inp, 2, 5, rescale=True, seed=9, backend=name)

    assert_backend_matches_reference(call, x, backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 12, 5, 5), (2, 12, 9, 1), (2, 6, 1, 9)])
def test_channels_last_and_non_contiguous(device, backend, shape):
    x = margin_input(shape, 2, 5, 120).to(device)
    for name, layout in memory_layouts(x).items():
        y = robustdrop.feature_density_dropout(layout, 2, 5, kappa=0.0, alpha=0.5, seed=13, backend=backend)
        y_ref = robustdrop.feature_density_dropout(layout.contiguous(), 2, 5, kappa=0.0, alpha=0.5, seed=13,
                                                   backend="reference")
        assert torch.equal(y.contiguous(), y_ref), name
        if name == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
    features = torch.randn(6, 10, device=device)[:, ::2]
    assert torch.equal(robustdrop.feature_density_dropout(features, 1, 4, seed=2, backend=backend),
                       robustdrop.feature_density_dropout(features.contiguous(), 1, 4, seed=2, backend="reference"))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_tiny_and_empty_shapes(device, backend):
    for shape in [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (1, 1, 3, 3), (1, 4, 1, 1), (0, 5), (3, 0), (1, 1)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        y = robustdrop.feature_density_dropout(x, 1, 4, seed=1, backend=backend)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        cell, counts = robustdrop.feature_density(x, 1, 4, backend=backend)
        assert cell.shape == shape[:2] and counts.shape == (shape[0], 4)
        assert torch.equal(counts.sum(1).cpu(), torch.full((shape[0],), shape[1]))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradcheck_float64(device, backend):
    x = margin_input((2, 8, 3, 3), 2, 5, 140).to(device=device, dtype=torch.float64).requires_grad_(True)

    def fn(inp):
        return robustdrop.feature_density_dropout(inp, 2, 5, kappa=0.0, alpha=0.5, rescale=True, seed=3,
                                                  backend=backend)

    assert_gradients_check(fn, x, backend=backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradient_is_the_channel_mask_without_pca_terms(device, backend):
    x = margin_input((2, 12, 4, 4), 2, 5, 160).to(device).requires_grad_(True)
    y = robustdrop.feature_density_dropout(x, 2, 5, seed=4, backend=backend)
    y.backward(torch.ones_like(y))
    kept = (y.detach() == x.detach()).flatten(2).all(2)
    assert torch.equal(x.grad, kept[:, :, None, None].expand_as(x).to(x.dtype))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_opcheck(device, backend):
    x = margin_input((2, 12, 3, 3), 2, 5, 180).to(device).requires_grad_(True)
    torch.library.opcheck(op("feature_density", backend), (x.detach(), 2, 5))
    for rescale in (False, True):
        torch.library.opcheck(op("feature_density_forward", backend), (x, 2, 5, 7, -0.8, 0.9, rescale))
        assert_drawn_seed_variant(op("feature_density_forward", backend), (x, 2, 5, 7, -0.8, 0.9, rescale),
                                  seed_position=3)
    features = torch.randn(4, 9, device=device, requires_grad=True)
    torch.library.opcheck(op("feature_density_forward", backend), (features, 1, 25, 7, -0.8, 0.9, False))
    mask = torch.tensor([[0b101], [0b11111111]], dtype=torch.uint8, device=device)
    torch.library.opcheck(op("channel_mask_backward", backend),
                          (torch.randn(2, 8, 3, 3, device=device), mask, torch.ones((), device=device)))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(device, backend):
    torch._dynamo.reset()
    x = margin_input((2, 12, 4, 4), 2, 5, 200).to(device).requires_grad_(True)

    def step(x, seed):
        y = robustdrop.feature_density_dropout(x, 2, 5, rescale=True, seed=seed, backend=backend)
        return (y * y).sum()

    assert_compiled_matches_eager(step, x)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bad_input_is_a_clear_error(device, backend):
    x = torch.randn(2, 6, 4, 4, device=device)
    calls = [
        (dict(x=torch.randn(2, 6, 4, device=device)), ValueError, "x must be 4-D"),
        (dict(x=x.long()), TypeError, "x must be a floating-point tensor"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(dims=4), ValueError, "dims must be 1, 2 or 3"),
        (dict(dims=0), ValueError, "dims must be 1, 2 or 3"),
        (dict(dims=2.0), TypeError, "dims must be an int"),
        (dict(x=torch.randn(2, 6, device=device), dims=2), ValueError, "dims must be 1 for 2-D"),
        (dict(grids=0), ValueError, "grids must be >= 1"),
        (dict(grids=300), ValueError, "grids must give at most 65536 cells"),
        (dict(kappa=float("nan")), ValueError, "kappa must be finite"),
        (dict(kappa=-10**400), ValueError, "kappa must be finite"),
        (dict(alpha="0.9"), TypeError, "alpha must be a real number"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(rescale=1), TypeError, "rescale must be a bool"),
        (dict(rescale="no"), TypeError, "rescale must be a bool"),
        (dict(training="False"), TypeError, "training must be a bool"),
        (dict(training=None), TypeError, "training must be a bool"),
        (dict(dims=True), TypeError, "dims must be an int"),
    ]
    for changes, error, message in calls:
        args = dict(x=x, dims=2, grids=None, kappa=-0.8, alpha=0.9, seed=None, rescale=False, training=True)
        args.update(changes)
        with pytest.raises(error, match=message):
            robustdrop.feature_density_dropout(args.pop("x"), args.pop("dims"), args.pop("grids"), args.pop("kappa"),
                                               args.pop("alpha"), backend=backend, **args)
    with pytest.raises(ValueError, match="grids must be >= 1"):
        robustdrop.feature_density(x, 2, -1, backend=backend)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_ops_called_directly_reject_bad_input(device, backend):
    x = torch.randn(2, 6, 4, 4, device=device)
    forward = op("feature_density_forward", backend)
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
        op("feature_density", backend)(x, 5, 3)
    with pytest.raises(ValueError, match="grids must be >= 1"):
        forward(x, 2, 0, 1, -0.8, 0.9, False)
    with pytest.raises(ValueError, match="kappa must be finite"):
        forward(x, 2, 5, 1, float("inf"), 0.9, False)
    with pytest.raises(ValueError, match="dims must be 1 for 2-D"):
        forward(torch.randn(2, 6, device=device), 2, 5, 1, -0.8, 0.9, False)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        forward(x.int(), 2, 5, 1, -0.8, 0.9, False)
    backward = op("channel_mask_backward", backend)
    with pytest.raises(ValueError, match="mask must have shape"):
        backward(x, torch.zeros(2, 2, dtype=torch.uint8, device=device), torch.ones((), device=device))
    with pytest.raises(TypeError, match="mask must be uint8"):
        backward(x, torch.zeros(2, 1, device=device), torch.ones((), device=device))
    with pytest.raises(ValueError, match="scale must"):
        backward(x, torch.zeros(2, 1, dtype=torch.uint8, device=device), torch.ones(3, device=device))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_eval_mode_is_identity_and_modules(device, backend):
    x = torch.randn(4, 8, 3, 3, device=device)
    layer = FeatureDensityDropout2d(dims=3, backend=backend)
    assert "dims=3, grids=3, kappa=-0.8, alpha=0.9" in repr(layer)
    assert layer.eval()(x) is x
    assert robustdrop.feature_density_dropout(x, training=False, backend=backend) is x
    layer.train()
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    assert torch.equal(y, layer(x))  # seeds come from torch's generator
    fc = FeatureDensityDropout1d(backend=backend)
    assert "grids=25" in repr(fc)
    assert fc(torch.randn(4, 32, device=device)).shape == (4, 32)
    with pytest.raises(ValueError, match=r"takes 2-D \(N, F\) input"):
        fc(x)
    with pytest.raises(ValueError, match=r"takes 4-D \(N, C, H, W\) input"):
        layer(torch.randn(4, 8, device=device))


@pytest.mark.parametrize("layer,bad,error,message", [
    (FeatureDensityDropout2d, dict(dims=True), TypeError, "dims must be an int, got bool"),
    (FeatureDensityDropout2d, dict(dims=2.0), TypeError, "dims must be an int, got float"),
    (FeatureDensityDropout2d, dict(dims=4), ValueError, "dims must be 1, 2 or 3"),
    (FeatureDensityDropout2d, dict(grids=0), ValueError, "grids must be >= 1"),
    (FeatureDensityDropout2d, dict(grids=2.5), TypeError, "grids must be an int"),
    (FeatureDensityDropout2d, dict(kappa=float("inf")), ValueError, "kappa must be finite"),
    (FeatureDensityDropout2d, dict(alpha="0.9"), TypeError, "alpha must be a real number"),
    (FeatureDensityDropout2d, dict(rescale="no"), TypeError, "rescale must be a bool"),
    (FeatureDensityDropout2d, dict(backend="x"), ValueError, "backend must be one of"),
    (FeatureDensityDropout1d, dict(grids=0), ValueError, "grids must be >= 1"),
    (FeatureDensityDropout1d, dict(kappa=float("nan")), ValueError, "kappa must be finite"),
    (FeatureDensityDropout1d, dict(rescale=1), TypeError, "rescale must be a bool"),
    (FeatureDensityDropout1d, dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_module_bad_arguments_are_clear_errors(layer, bad, error, message):
    """Refused where the layer is built, with the functional op's messages; a valid backend name that is
    not available here still builds (the layer may be moved to a device that has it)."""
    with pytest.raises(error, match=message):
        layer(**bad)
    assert layer(backend="cuda").backend == "cuda"


def test_saved_for_backward_is_one_bit_per_channel():
    if not robustdrop.backends()["cpu"].available:
        pytest.skip("the compiled extension is not built")
    x = torch.randn(4, 64, 8, 8, requires_grad=True)
    for rescale, limit in [(False, 4 * 64 // 8 + 4), (True, 4 * 64 // 8 + 4 * 64 * 4)]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            robustdrop.feature_density_dropout(x, 2, rescale=rescale, seed=1, backend="cpu")
        assert sum(t.numel() * t.element_size() for t in saved) <= limit


def test_reference_coordinates_are_the_svd_projection():
    """The reference's eigh of the covariance against an independent route: the SVD of the centred
    channels, X_c = U S V^T, whose projections are U S (up to each axis's sign)."""
    x = low_rank_input((2, 9, 4, 5), torch.Generator().manual_seed(5)).double()
    for sample in x:
        rows = sample.reshape(9, -1)
        centred = rows - rows.mean(0)
        u, s, _ = torch.linalg.svd(centred, full_matrices=False)
        f = reference.principal_coordinates(rows, 3)
        for r in range(3):
            torch.testing.assert_close(f[:, r].abs(), (u[:, r] * s[r]).abs())


def test_naive_baseline_is_the_same_function():
    """The benchmark's naive baseline (torch.bernoulli) drops whole channels at the same rates."""
    sample = margin_input((1, 24, 3, 3), 2, 5, 220)
    x = sample.expand(3000, -1, -1, -1)
    torch.manual_seed(0)
    y = reference.naive_feature_density_dropout(x[:40], 2, 5)
    dropped = (y.flatten(2) == 0).all(2)
    assert torch.equal(y[~dropped], x[:40][~dropped])
    cell, counts = reference.feature_density(sample, 2, 5)
    p = reference.drop_probabilities(counts, -0.8, 0.9).double()[0, cell[0]]
    rate = (reference.naive_feature_density_dropout(x, 2, 5).flatten(2) == 0).all(2).double().mean(0)
    assert bool(((rate - p).abs() <= 4 * (p * (1 - p) / 3000).sqrt() + 1e-9).all())


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_compiled_ops_autograd_runs_no_python(device):
    x = torch.randn(3, 6, 4, 5, device=device, requires_grad=True)
    forward = torch.ops.robustdrop.feature_density_forward
    for rescale in (False, True):
        assert python_calls_in_autograd(lambda t: forward(t, 2, 4, 7, -0.8, 0.9, rescale)[0], x) == []
