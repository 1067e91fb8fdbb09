"""CamDrop (DESIGN.md 4.2) on every backend against the single reference."""
import gc
import weakref

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F
from torch import nn

import robustdrop
from robustdrop import _checks
from robustdrop.nn import CamDrop2d, cam_targets, set_cam_targets
from robustdrop.reference import block_mask as block_reference
from robustdrop.reference import cam_mask as reference
from conftest import (COMPILED_DEVICES, DEVICE_BACKENDS, EMULATED_CUDA, KERNEL_BACKENDS,
                      assert_backend_matches_reference, assert_compiled_follows_map_sizes,
                      assert_compiled_matches_eager, assert_gradients_check,
                      assert_drawn_seed_variant, assert_in_place_rate_runs_one_graph, assert_same_bits, memory_layouts,
                      python_calls_in_autograd)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def forward_op(backend: str):
    """(x, weight, target, guided, seed, gamma, bs, spatial_topk, channel_topk, normalize, eps[, sample_gamma])
    -> (y, mask, scale)."""
    if backend == "reference":
        return reference.cam_mask_forward
    return getattr(torch.ops.robustdrop, "cam_mask_forward" + ("_triton" if backend == "triton" else ""))


def integer_inputs(shape, classes, group, generator, device="cpu"):
    """x, weight and target of small integers: every CAM sum is exact in any order, ties included."""
    n, c, h, w = shape
    x = torch.randint(-6, 7, shape, generator=generator).float()
    weight = torch.randint(-3, 4, (classes, c * group), generator=generator).float()
    target = torch.randint(0, classes, (n,), generator=generator)
    return x.to(device), weight.to(device), target.to(device)


def has_margin(values: torch.Tensor, k: int, relative: float = 1e-5) -> bool:
    """True when no value of any row (N, L) other than the k-th itself lies within `relative` of the k-th largest."""
    ordered = values.sort(dim=1, descending=True).values
    kth = ordered[:, k - 1:k]
    near = (values - kth).abs() <= relative * kth.abs().clamp_min(1e-30)
    return bool((near.sum(1) == 1).all())


def margin_inputs(shape, classes, group, spatial_topk, channel_topk, first_seed, device="cpu"):
    """Random float x, weight and target whose CAM and class weights have the contract's margin."""
    n, c, h, w = shape
    for attempt in range(100):
        generator = torch.Generator().manual_seed(first_seed + attempt)
        x = torch.randn(shape, generator=generator)
        weight = torch.randn(classes, c * group, generator=generator)
        target = torch.randint(0, classes, (n,), generator=generator)
        a = reference.class_channel_weights(weight, target, c)
        cam = reference.class_activation_map(x, a).reshape(n, h * w)
        if has_margin(cam, spatial_topk) and has_margin(a, channel_topk):
            return x.to(device), weight.to(device), target.to(device)
    raise AssertionError("no input with a margin found")


def candidate_starts(x, weight, target, bs, spatial_topk, channel_topk):
    """allowed (N, C, Hs, Ws) bool: where a block may start under the contract."""
    spatial, channel = reference.cam_candidates(x.cpu(), weight.cpu(), target.cpu(), spatial_topk, channel_topk)
    h, w = x.shape[-2:]
    return spatial[:, None, :h - bs + 1, :w - bs + 1] & channel[:, :, None, None]


def covered_by_allowed_blocks(allowed: torch.Tensor, bs: int) -> torch.Tensor:
    """(N, C, H, W) bool: positions inside some bs x bs block whose top-left corner is allowed."""
    return block_reference.expand_seeds(allowed, bs)


# (shape, classes, group, block_size, p, spatial_topk, channel_topk); small: the Triton interpreter is slow.
CASES = [
    ((2, 4, 9, 8), 5, 1, 3, 0.5, 6, 2),
    ((2, 3, 7, 10), 4, 2, 2, 0.6, 20, 3),  # even block, C' = 2C
    ((1, 2, 6, 6), 3, 4, 6, 0.5, 1, 1),  # block equal to the map, C' = 4C
    ((3, 1, 5, 9), 2, 1, 1, 0.4, 45, 1),  # block of 1, C of 1, every position a candidate
    ((2, 5, 1, 12), 6, 2, 3, 0.7, 4, 5),  # H of 1: the block is clamped to 1
    ((2, 3, 11, 13), 7, 1, 4, 0.9, 9, 1),
]


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_op_matches_reference_bit_for_bit(device, backend, normalize):
    generator = torch.Generator().manual_seed(3)
    for index, (shape, classes, group, block_size, p, spatial_topk, channel_topk) in enumerate(CASES):
        x, weight, target = integer_inputs(shape, classes, group, generator, device)
        bs = block_reference.effective_block_size(block_size, *shape[2:])
        gamma = block_reference.drop_rate_to_gamma(p, shape[2], shape[3], bs)
        for guided in (None, True, False):
            flag = None if guided is None else torch.tensor(guided, device=device)
            args = (x, weight, target, flag, 500 + index, gamma, bs, spatial_topk, channel_topk, normalize, 1e-6)
            for actual, expected in zip(forward_op(backend)(*args), reference.cam_mask_forward(*args)):
                assert_same_bits(actual, expected)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_per_sample_rates_match_reference_bit_for_bit(device, backend):
    """sample_gamma (N,) replaces gamma: rates 0 and 1 (every candidate seeds) included, guided or not."""
    generator = torch.Generator().manual_seed(6)
    for index, (shape, classes, group, block_size, _, spatial_topk, channel_topk) in enumerate(CASES[:3]):
        x, weight, target = integer_inputs(shape, classes, group, generator, device)
        bs = block_reference.effective_block_size(block_size, *shape[2:])
        rates = torch.tensor([0.0, 1.0, 0.3, 0.7][:shape[0]], dtype=torch.float64).roll(index)
        sample_gamma = block_reference.drop_rate_to_gamma(rates, shape[2], shape[3], bs).float().to(device)
        for guided in (None, False):
            flag = None if guided is None else torch.tensor(guided, device=device)
            args = (x, weight, target, flag, 40 + index, 0.0, bs, spatial_topk, channel_topk, True, 1e-6, sample_gamma)
            for actual, expected in zip(forward_op(backend)(*args), reference.cam_mask_forward(*args)):
                assert_same_bits(actual, expected)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_nan_or_negative_sample_probability_draws_no_seeds(device, backend):
    """As DropBlock's: the op does not read sample_gamma, and a NaN or negative probability seeds nothing."""
    generator = torch.Generator().manual_seed(4)
    x, weight, target = integer_inputs((3, 6, 10, 9), 5, 1, generator, device)
    x = x.abs() + 1.0
    sample_gamma = torch.tensor([float("nan"), 0.9, -1.0], device=device)
    args = (x, weight, target, None, 3, 0.0, 3, 30, 4, False, 1e-6, sample_gamma)
    outputs = forward_op(backend)(*args)
    for actual, expected in zip(outputs, reference.cam_mask_forward(*args)):
        assert_same_bits(actual, expected)
    y = outputs[0]
    for n in (0, 2):
        assert_same_bits(y[n], x[n])
    assert (y[1] == 0).any()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_each_sample_gets_the_mask_of_its_own_rate(device, backend):
    """Sample n of a per-sample call is sample n of a plain call at rate p[n] with the same seed."""
    generator = torch.Generator().manual_seed(9)
    x, weight, target = integer_inputs((4, 6, 10, 9), 5, 2, generator, device)
    x = x.abs() + 1.0  # nothing is zero before the drop
    rates = [0.0, 0.5, 0.2, 0.9]
    y = robustdrop.cam_drop2d(x, weight, target, torch.tensor(rates, device=device), 3, spatial_topk=30,
                              channel_topk=4, seed=8, normalize="none", backend=backend)
    for n, rate in enumerate(rates):
        plain = robustdrop.cam_drop2d(x, weight, target, rate, 3, spatial_topk=30, channel_topk=4, seed=8,
                                      normalize="none", backend=backend)
        assert torch.equal(y[n], plain[n]), n
    assert (y[0] != 0).all() and (y[3] == 0).any()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_zero_dim_rate_is_the_float_rate(device, backend):
    """A 0-d tensor p, on the CPU or on x's device, gives the float p's output and gradient, to the bit, and
    equal per-sample rates do too. At p == 0 the op still runs, with a scale of exactly 1 at this size."""
    generator = torch.Generator().manual_seed(10)
    x, weight, target = integer_inputs((3, 4, 9, 11), 6, 1, generator, device)
    x.requires_grad_(True)
    grad_y = torch.randn(x.shape, generator=generator).to(device)

    def run(p):
        y = robustdrop.cam_drop2d(x, weight, target, p, 3, spatial_topk=20, channel_topk=2, seed=12, backend=backend)
        return y, torch.autograd.grad(y, x, grad_y)[0]

    for rate in (0.0, 0.25, 0.6):
        y, grad = run(rate)
        for tensor_rate in (torch.tensor(rate, dtype=torch.float64), torch.tensor(rate, device=device),
                            torch.full((3,), rate, dtype=torch.float64, device=device)):
            y_tensor, grad_tensor = run(tensor_rate)
            assert_same_bits(y_tensor, y)
            assert_same_bits(grad_tensor, grad)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_zero_dim_rate_changed_in_place_does_not_recompile(device, backend):
    """A 0-d CPU rate under torch.compile(fullgraph=True) is a graph input: a schedule that changes it in
    place runs one graph, and each step gives the float rate's eager bits."""
    generator = torch.Generator().manual_seed(11)
    x, weight, target = integer_inputs((3, 4, 10, 10), 5, 1, generator, device)

    def call(x, p):
        return robustdrop.cam_drop2d(x, weight, target, p, 3, spatial_topk=40, channel_topk=3, backend=backend)

    assert_in_place_rate_runs_one_graph(call, x)  # at p == 0 too: the op's scale is exactly 1 here


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_masks_match_on_random_inputs_with_a_margin(device, backend):
    shape, group = (3, 6, 10, 9), 2
    for index, (spatial_topk, channel_topk) in enumerate([(7, 2), (30, 4), (1, 6), (90, 1)]):
        x, weight, target = margin_inputs(shape, 8, group, spatial_topk, channel_topk, 100 * index, device)
        args = (x, weight, target, None, index, 0.3, 3, spatial_topk, channel_topk, True, 1e-6)
        for actual, expected in zip(forward_op(backend)(*args), reference.cam_mask_forward(*args)):
            assert_same_bits(actual, expected)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_blocks_start_only_at_candidate_positions_and_channels(device, backend):
    generator = torch.Generator().manual_seed(8)
    shape, bs, spatial_topk, channel_topk = (4, 8, 12, 12), 3, 10, 3
    x, weight, target = integer_inputs(shape, 6, 2, generator, device)
    y = robustdrop.cam_drop2d(x, weight, target, 0.9, bs, spatial_topk=spatial_topk, channel_topk=channel_topk,
                              normalize="none", seed=21, backend=backend)
    dropped = (y == 0) & (x != 0)
    allowed = candidate_starts(x, weight, target, bs, spatial_topk, channel_topk)
    assert dropped.any()
    assert not (dropped.cpu() & ~covered_by_allowed_blocks(allowed, bs)).any()
    # Channels that are not candidates are never touched.
    channel_candidates = allowed.flatten(2).any(-1)
    assert torch.equal(y.cpu()[~channel_candidates], x.cpu()[~channel_candidates])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("group", [1, 2, 4])
def test_every_candidate_is_drop_block_bit_for_bit(device, backend, group):
    """With spatial_topk = H*W and channel_topk = C the result is drop_block2d's with the same seed, with a
    float rate or per-sample rates."""
    x = torch.randn(2, 3, 9, 11, device=device, requires_grad=True)
    weight = torch.randn(5, 3 * group, device=device)
    target = torch.tensor([4, 0], device=device)
    rates = torch.tensor([0.6, 0.2], device=device)
    for seed, p in ((0, 0.4), (7, 0.4), (2**64 - 3, 0.4), (5, rates)):
        y = robustdrop.cam_drop2d(x, weight, target, p, 3, spatial_topk=99, channel_topk=3, seed=seed,
                                  backend=backend)
        y_block = robustdrop.drop_block2d(x, p, 3, seed=seed, backend=backend)
        assert_same_bits(y, y_block)
        g = torch.randn_like(y)
        assert_same_bits(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_block, x, g)[0])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_ties_go_to_the_lower_index(device, backend):
    n, c, h, w, bs = 2, 6, 8, 8, 2
    target = torch.tensor([0, 2], device=device)
    gamma = block_reference.drop_rate_to_gamma(1.0, h, w, bs)
    # Tied positions and channels: only (0, 0), (0, 1), (0, 2) may start blocks, only in channels 0 and 1.
    allowed = torch.zeros(n, c, h - bs + 1, w - bs + 1, dtype=torch.bool)
    allowed[:, :2, 0, :3] = True
    seeds = block_reference.philox_seed_grid(tuple(allowed.shape), 5, gamma, "cpu") & allowed
    expected = block_reference.pack_keep_mask(~block_reference.expand_seeds(seeds, bs))
    ones = torch.ones(n, c, h, w, device=device)  # every position has the same CAM value
    # -0.0 ties with +0.0: the CAM is -0.0 in rows 0..3 and +0.0 in rows 4..7.
    signed_zeros = torch.zeros(n, c, h, w, device=device)
    signed_zeros[:, :, 4:] = -0.0
    for x, weight in [(ones, torch.ones(3, c, device=device)), (signed_zeros, -torch.ones(3, c, device=device))]:
        args = (x, weight, target, None, 5, gamma, bs, 3, 2, False, 1e-6)
        assert torch.equal(forward_op(backend)(*args)[1].cpu(), expected)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_nan_in_the_cam_ranks_above_everything(device, backend):
    generator = torch.Generator().manual_seed(2)
    x, weight, target = integer_inputs((2, 3, 8, 8), 4, 1, generator, device)
    x[0, 1, 5, 6] = float("nan")
    x[1, 0, 2, 2] = float("inf")
    args = (x, weight, target, None, 3, 0.5, 2, 5, 2, True, 1e-6)
    for actual, expected in zip(forward_op(backend)(*args), reference.cam_mask_forward(*args)):
        assert_same_bits(actual, expected)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes_forward_and_backward_match_reference(device, backend, dtype):
    generator = torch.Generator().manual_seed(4)
    x, weight, target = integer_inputs((2, 4, 10, 9), 5, 2, generator, device)
    x = (x / 4).to(dtype).requires_grad_(True)  # quarters are exact in every dtype

    def call(inp, name):
        return robustdrop.cam_drop2d(inp, weight.to(dtype), target, 0.5, 3, spatial_topk=12, channel_topk=2, seed=9,
                                     backend=name)

    assert_backend_matches_reference(call, x, backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 9, 12), (2, 5, 9, 1), (2, 5, 1, 12)])
def test_channels_last_and_non_contiguous(device, backend, shape):
    generator = torch.Generator().manual_seed(6)
    x, weight, target = integer_inputs(shape, 3, 1, generator, device)
    for name, layout in memory_layouts(x).items():
        kwargs = dict(p=0.5, block_size=3, spatial_topk=5, channel_topk=2, seed=13)
        y = robustdrop.cam_drop2d(layout, weight, target, backend=backend, **kwargs)
        y_ref = robustdrop.cam_drop2d(layout.contiguous(), weight, target, backend="reference", **kwargs)
        assert torch.equal(y.contiguous(), y_ref), name
        if name == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_tiny_and_empty_shapes(device, backend):
    weight = torch.randn(4, 6, device=device)
    for shape in [(0, 3, 8, 8), (2, 3, 0, 8), (2, 3, 8, 0), (1, 3, 2, 2), (2, 6, 1, 1), (1, 1, 3, 3)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        w = weight[:, :shape[1]] if shape[1] != 3 else weight
        target = torch.zeros(shape[0], dtype=torch.long, device=device)
        y = robustdrop.cam_drop2d(x, w, target, 0.5, 5, seed=1, backend=backend)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradcheck_float64(device, backend):
    x, weight, target = margin_inputs((2, 3, 6, 5), 4, 2, 6, 2, 40)
    x = x.to(device=device, dtype=torch.float64).requires_grad_(True)
    weight, target = weight.to(device), target.to(device)

    def fn(inp):
        return robustdrop.cam_drop2d(inp, weight, target, 0.6, 2, spatial_topk=6, channel_topk=2, seed=3,
                                     backend=backend)

    assert_gradients_check(fn, x, backend=backend)


def test_no_gradient_flows_through_the_cam():
    fc = nn.Linear(8, 3)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    y = robustdrop.cam_drop2d(x, fc.weight, torch.tensor([0, 2]), 0.5, 3, seed=1)
    y.sum().backward()
    assert fc.weight.grad is None and x.grad is not None


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_opcheck(device, backend):
    generator = torch.Generator().manual_seed(1)
    x, weight, target = integer_inputs((2, 3, 7, 8), 4, 2, generator, device)
    x.requires_grad_(True)
    sample_gamma = torch.tensor([0.05, 0.3], device=device)
    for guided in (None, torch.tensor(True, device=device), torch.tensor(False, device=device)):
        for args in ((x, weight, target, guided, 5, 0.3, 3, 10, 2, True, 1e-6),
                     (x, weight, target, guided, 5, 0.0, 3, 10, 2, True, 1e-6, sample_gamma)):
            torch.library.opcheck(forward_op(backend), args)
            assert_drawn_seed_variant(forward_op(backend), args, seed_position=4)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(device, backend):
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(5)
    x, weight, target = integer_inputs((2, 3, 10, 10), 4, 1, generator, device)
    x.requires_grad_(True)

    def step(x, target, seed):
        y = robustdrop.cam_drop2d(x, weight, target, 0.4, 3, spatial_topk=8, channel_topk=2, seed=seed,
                                  backend=backend)
        return (y * y).sum()

    assert_compiled_matches_eager(step, x, target)


@pytest.mark.skipif(EMULATED_CUDA, reason="the emulated CUDA ops have no meta kernels (the real ops' fake "
                                          "implementations answer in the plain pass)")
def test_meta_tensors_give_the_output_shape():
    """On meta tensors (shapes without values, as torch's FakeTensor and model skeletons use) the op gives
    y's shape and dtype: the targets' values, which the eager check reads, are skipped, as a per-sample
    rate's are."""
    x = torch.empty(2, 4, 8, 8, device="meta", dtype=torch.float16)
    weight, target = torch.empty(5, 8, device="meta"), torch.empty(2, dtype=torch.int64, device="meta")
    for p in (0.3, torch.empty(2, device="meta")):
        y = robustdrop.cam_drop2d(x, weight, target, p, 3, seed=1)
        assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_compile_with_dynamic_map_sizes(device, backend):
    weight = torch.randn(5, 8, generator=torch.Generator().manual_seed(2)).to(device)
    target = torch.tensor([0, 3], device=device)
    assert_compiled_follows_map_sizes(
        lambda x: robustdrop.cam_drop2d(x, weight, target, 0.4, 3, spatial_topk=8, channel_topk=2, seed=4,
                                        backend=backend), device)


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in DEVICE_BACKENDS if b != "triton" or d == "cuda"])
def test_drop_rate_statistics(device, backend):
    """At p = 0.1 on 32x16x56x56: the dropped fraction matches the one the candidates imply.

    A position is kept iff none of the m candidate seeds whose block covers it
    fires, probability (1 - gamma)**m; the mean of 1 - (1 - gamma)**m over the
    tensor is the expected drop rate. It must hold within 0.03 (as timm's own
    DropBlock test), and within 4 standard deviations of a per-block estimate.
    """
    x = torch.rand(32, 16, 56, 56, device=device) + 0.5
    weight = torch.randn(10, 32, device=device)
    target = torch.randint(0, 10, (32,), device=device)
    for block_size, spatial_topk, channel_topk in [(3, 400, 8), (7, 64, 16), (5, 3136, 16)]:
        y = robustdrop.cam_drop2d(x, weight, target, 0.1, block_size, spatial_topk=spatial_topk,
                                  channel_topk=channel_topk, seed=block_size, backend=backend)
        allowed = candidate_starts(x, weight, target, block_size, spatial_topk, channel_topk).float()
        covering = F.conv2d(F.pad(allowed.view(-1, 1, *allowed.shape[2:]), [block_size - 1] * 4),
                            torch.ones(1, 1, block_size, block_size)).round()
        gamma = block_reference.drop_rate_to_gamma(0.1, 56, 56, block_size)
        expected = (1 - (1 - gamma) ** covering).mean().item()
        dropped = (y == 0).double().mean().item()
        seeds = allowed.sum().item()
        sigma = (seeds * gamma * (1 - gamma)) ** 0.5 * block_size**2 / x.numel()
        assert abs(dropped - expected) < min(0.03, 4 * sigma + 1e-4), (block_size, dropped, expected)
    # Every position and channel a candidate: DropBlock's rate, p within 0.03.
    y = robustdrop.cam_drop2d(x, weight, target, 0.1, 7, spatial_topk=56 * 56, channel_topk=16, seed=1,
                              backend=backend)
    assert abs((y == 0).double().mean().item() - 0.1) < 0.03


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_and_inf_reach_kept_outputs_only(device, backend):
    x = torch.rand(2, 3, 10, 10, device=device)
    x[0, 0, :5] = float("nan")
    x[1, 2] = float("inf")
    weight = torch.randn(4, 3, device=device)
    target = torch.tensor([1, 3], device=device)
    y = robustdrop.cam_drop2d(x, weight, target, 0.9, 3, spatial_topk=40, channel_topk=3, seed=11,
                              backend=backend)
    y_ref = robustdrop.cam_drop2d(x, weight, target, 0.9, 3, spatial_topk=40, channel_topk=3, seed=11,
                                  backend="reference")
    assert_same_bits(y, y_ref)
    dropped = y_ref == 0
    assert dropped.any() and not torch.isnan(y[dropped]).any()
    assert torch.isnan(y[0, 0, :5][~dropped[0, 0, :5]]).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_eval_mode_and_zero_rate_are_identity(device, backend):
    x = torch.randn(2, 3, 8, 8, device=device)
    weight, target = torch.randn(4, 3, device=device), torch.tensor([0, 1], device=device)
    assert robustdrop.cam_drop2d(x, weight, target, 0.5, 3, training=False, backend=backend) is x
    assert robustdrop.cam_drop2d(x, weight, target, 0.0, 3, backend=backend) is x


def _bad_calls(n=2, c=3, classes=4):
    good_weight, good_target = torch.randn(classes, c), torch.tensor([0, 3])
    return [
        (dict(target=torch.tensor([0, 4])), ValueError, r"target must hold class indices in \[0, K\) = \[0, 4\)"),
        (dict(target=torch.tensor([-1, 0])), ValueError, "target must hold class indices"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, r"target must have shape \(N,\) = \(2,\)"),
        (dict(target=torch.tensor([[0, 1]])), ValueError, "target must have shape"),
        (dict(target=torch.tensor([0, 1], dtype=torch.int32)), TypeError, "target must be int64"),
        (dict(target=torch.tensor([0.0, 1.0])), TypeError, "target must be int64"),
        (dict(target=[0, 1]), TypeError, "target must be a torch.Tensor"),
        (dict(weight=torch.randn(classes, c + 1)), ValueError, "weight must have a width C' that is a multiple"),
        (dict(weight=torch.randn(classes, 2 * c - 1)), ValueError, "weight must have a width"),
        (dict(weight=torch.randn(classes, 1)), ValueError, "weight must have a width"),
        (dict(weight=torch.randn(c)), ValueError, "weight must be 2-D"),
        (dict(weight=torch.randn(0, c)), ValueError, r"weight must have at least one class \(row\), got shape \(0, 3\)"),
        (dict(weight=torch.ones(classes, c, dtype=torch.long)), TypeError, "weight must be a floating-point"),
        (dict(x=torch.randn(n, c, 8)), ValueError, "x must be 4-D"),
        (dict(x=torch.randint(0, 5, (n, c, 8, 8))), TypeError, "x must be a floating-point"),
        (dict(p=1.5), ValueError, "p must be in"),
        (dict(p=torch.tensor(1.5)), ValueError, r"p must hold drop rates in \[0, 1\]"),
        (dict(p=torch.tensor([0.1, 0.2, 0.3])), ValueError, r"p must be a float, a 0-d tensor or a tensor \(N,\)"),
        (dict(p=torch.tensor([1, 0])), TypeError, "p must be a float or a floating-point tensor"),
        (dict(block_size=0), ValueError, "block_size must be >= 1"),
        (dict(spatial_topk=0), ValueError, "spatial_topk must be >= 1"),
        (dict(spatial_topk=65), ValueError, r"spatial_topk must be <= H\*W = 64"),
        (dict(channel_topk=4), ValueError, "channel_topk must be <= C = 3"),
        (dict(channel_topk=1.5), TypeError, "channel_topk must be an int"),
        (dict(normalize="sum"), ValueError, "normalize must be one of"),
        (dict(eps=float("inf")), ValueError, "eps must be finite, got inf"),
        (dict(eps=float("nan")), ValueError, "eps must be finite, got nan"),
        (dict(training="no"), TypeError, "training must be a bool"),
        (dict(training=None), TypeError, "training must be a bool"),
    ], good_weight, good_target


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bad_input_is_a_clear_error(device, backend):
    calls, weight, target = _bad_calls()
    for bad, error, message in calls:
        args = dict(x=torch.randn(2, 3, 8, 8), weight=weight, target=target, p=0.1, block_size=3)
        args.update(bad)
        for key in ("x", "weight", "target"):
            if isinstance(args[key], torch.Tensor):
                args[key] = args[key].to(device)
        x, w, t, p, bs = (args.pop(key) for key in ("x", "weight", "target", "p", "block_size"))
        with pytest.raises(error, match=message):
            robustdrop.cam_drop2d(x, w, t, p, bs, backend=backend, **args)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_ops_called_directly_reject_bad_input(device, backend):
    forward = forward_op(backend)
    x = torch.randn(2, 3, 8, 8, device=device)
    weight, target = torch.randn(4, 6, device=device), torch.tensor([1, 2], device=device)

    def call(**changes):
        args = dict(x=x, weight=weight, target=target, guided=None, seed=1, gamma=0.1, block_size=3,
                    spatial_topk=5, channel_topk=2, normalize=True, eps=1e-6, sample_gamma=None)
        args.update(changes)
        return forward(*args.values())

    with pytest.raises(ValueError, match="weight must have a width"):
        call(weight=torch.randn(4, 5, device=device))
    with pytest.raises(ValueError, match="target must have shape"):
        call(target=target[:1])
    with pytest.raises(TypeError, match="target must be int64"):
        call(target=target.int())
    with pytest.raises(ValueError, match="spatial_topk must be in"):
        call(spatial_topk=65)
    with pytest.raises(ValueError, match="channel_topk must be in"):
        call(channel_topk=-1)
    with pytest.raises(TypeError, match="guided must be a bool"):
        call(guided=torch.tensor(1.0, device=device))
    wide = 2**31  # channels the top-k count cannot hold; expanded, so nothing that size is allocated
    with pytest.raises(ValueError, match=r"fewer than 2\*\*31 positions per map \(H\*W\) and channels"):
        call(x=x[:, :1, :1, :1].expand(2, wide, 1, 1), weight=weight[:, :1].expand(4, wide), block_size=1,
             spatial_topk=1, channel_topk=1)
    with pytest.raises(TypeError, match="sample_gamma must be float32"):
        call(sample_gamma=torch.full((2,), 0.1, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"sample_gamma must have shape \(N,\) = \(2,\)"):
        call(sample_gamma=torch.full((3,), 0.1, device=device))
    if device == "cpu" and backend == "cpu" and not EMULATED_CUDA:
        with pytest.raises(ValueError, match="target must hold class indices"):
            call(target=torch.tensor([1, 9]))
    if EMULATED_CUDA and backend == "cpu":  # the CUDA kernel's device assert, as a GPU reports it
        with pytest.raises(RuntimeError, match="device-side assert triggered"):
            call(target=torch.tensor([1, 9]))


# ---------------------------------------------------------------------------
# nn.CamDrop2d and the targets of a model
# ---------------------------------------------------------------------------

class SmallNet(nn.Module):
    """conv -> CamDrop -> conv -> global average pool -> linear, the CamDrop guided by that linear."""

    def __init__(self, warmup_steps=0, backend="auto"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)
        self.drop = CamDrop2d(0.3, 3, self.fc, spatial_topk=20, channel_topk=2, warmup_steps=warmup_steps,
                              backend=backend)

    def forward(self, x):
        x = self.drop(torch.relu(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def test_module_reads_the_classifier_at_every_forward():
    fc = nn.Linear(8, 5)
    layer = CamDrop2d(0.5, 3, fc, spatial_topk=4, channel_topk=1)
    assert "classifier=(5, 8)" in repr(layer) and "warmup_steps=0" in repr(layer)
    x, target = torch.rand(2, 4, 8, 8), torch.tensor([1, 3])
    for _ in range(2):
        torch.manual_seed(0)
        y = layer(x, target)
        torch.manual_seed(0)
        assert torch.equal(y, robustdrop.cam_drop2d(x, fc.weight, target, 0.5, 3, spatial_topk=4, channel_topk=1))
        with torch.no_grad():
            fc.weight.mul_(-1.0)  # the guidance must follow the new weight
    layer.eval()
    assert layer(x) is x  # eval needs no targets


@pytest.mark.parametrize("bad,error,message", [
    (dict(p=5), ValueError, r"p must be in \[0, 1\], got 5"),
    (dict(p="0.1"), TypeError, "p must be a real number"),
    (dict(p=torch.tensor([0.1, -0.2])), ValueError, r"p must hold drop rates in \[0, 1\]"),
    (dict(block_size=0), ValueError, "block_size must be >= 1"),
    (dict(block_size=3.0), TypeError, "block_size must be an int"),
    (dict(classifier=nn.Conv2d(3, 2, 1)), TypeError, "classifier must be an nn.Module with a 2-D weight"),
    (dict(classifier=torch.randn(2, 3)), TypeError, "classifier must be an nn.Module"),
    (dict(spatial_topk=0), ValueError, "spatial_topk must be >= 1"),
    (dict(spatial_topk=2.5), TypeError, "spatial_topk must be an int"),
    (dict(channel_topk=-1), ValueError, "channel_topk must be >= 1"),
    (dict(channel_topk="2"), TypeError, "channel_topk must be an int"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps must be >= 0"),
    (dict(warmup_steps=1.0), TypeError, "warmup_steps must be an int"),
    (dict(warmup_steps=True), TypeError, "warmup_steps must be an int"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_module_bad_arguments_are_clear_errors(bad, error, message):
    """Refused where the layer is built, with the functional op's messages; a valid backend name that is
    not available here still builds (the layer may be moved to a device that has it)."""
    args = dict(p=0.1, block_size=3, classifier=nn.Linear(3, 2))
    args.update(bad)
    with pytest.raises(error, match=message):
        CamDrop2d(args.pop("p"), args.pop("block_size"), args.pop("classifier"), **args)
    assert CamDrop2d(0.1, 3, nn.Linear(3, 2), backend="cuda").backend == "cuda"


def test_module_registers_the_classifier_once():
    net = SmallNet()
    keys = list(net.state_dict())
    assert keys.count("fc.weight") == 1 and not any("classifier" in key for key in keys)
    assert "drop.num_steps" in keys
    assert sum(1 for _ in net.parameters()) == 6


def test_warmup_switches_from_drop_block_to_cam_guidance_at_the_right_step():
    fc = nn.Linear(4, 3)
    layer = CamDrop2d(0.5, 3, fc, spatial_topk=3, channel_topk=1, warmup_steps=2)
    x, target = torch.rand(2, 4, 9, 9), torch.tensor([0, 2])
    as_drop_block = dict(training=True)
    for step in range(4):
        torch.manual_seed(step)
        y = layer(x, target)
        torch.manual_seed(step)
        if step < 2:
            expected = robustdrop.drop_block2d(x, 0.5, 3, **as_drop_block)
        else:
            expected = robustdrop.cam_drop2d(x, fc.weight, target, 0.5, 3, spatial_topk=3, channel_topk=1)
        assert torch.equal(y, expected), step
        if step == 0:
            layer.eval()
            layer(x)  # eval forwards do not count as training steps
            layer.train()
    assert layer.num_steps.item() == 4
    # The count is saved and restored with the state_dict.
    resumed = CamDrop2d(0.5, 3, fc, spatial_topk=3, channel_topk=1, warmup_steps=5)
    resumed.load_state_dict(layer.state_dict())
    assert resumed.num_steps.item() == 4


def test_training_forward_without_targets_says_how_to_give_them():
    net = SmallNet()
    with pytest.raises(ValueError, match=r"robustdrop\.nn\.cam_targets\(model, target\)"):
        net(torch.randn(2, 3, 8, 8))


def test_data_parallel_replica_is_a_clear_error():
    """nn.DataParallel's replicas (made by _replicate_for_data_parallel, as torch's replicate does on each GPU)
    keep the original's classifier and targets: a training forward says to use DistributedDataParallel."""
    model = SmallNet()
    replica = model.drop._replicate_for_data_parallel()
    x = torch.randn(2, 8, 6, 6)
    with pytest.raises(RuntimeError, match="CamDrop2d does not support nn.DataParallel"):
        replica(x, torch.tensor([0, 1]))
    assert torch.equal(replica.eval()(x), x)  # evaluation is the identity, as everywhere
    model.drop(x, torch.tensor([0, 1]))  # the original still runs


def test_cam_targets_sets_and_clears_every_layer():
    net = nn.ModuleList([SmallNet(), SmallNet()])
    target = torch.tensor([1, 4])
    with cam_targets(net, target) as layers:
        assert len(layers) == 2 and all(layer.target is target for layer in layers)
        for member in net:
            member(torch.randn(2, 3, 8, 8))
    assert all(layer.target is None for layer in layers)
    assert set_cam_targets(net, target) == layers
    with pytest.raises(ValueError, match="model has no CamDrop2d"):
        set_cam_targets(nn.Linear(2, 2), target)


def test_cam_targets_restores_the_targets_it_found():
    """On exit each layer gets back its targets from before the block: a nested block leaves the outer
    block's in place, and targets set by set_cam_targets outlive a block (exceptions included)."""
    net = nn.ModuleList([SmallNet(), SmallNet()])
    outer, inner = torch.tensor([1, 4]), torch.tensor([0, 2])
    with cam_targets(net, outer) as layers:
        with cam_targets(net, inner):
            assert all(layer.target is inner for layer in layers)
        assert all(layer.target is outer for layer in layers)
        net[0](torch.randn(2, 3, 8, 8))
    assert all(layer.target is None for layer in layers)
    set_cam_targets(net, outer)
    with pytest.raises(RuntimeError, match="inside"):
        with cam_targets(net, inner):
            raise RuntimeError("inside")
    assert all(layer.target is outer for layer in layers)


def test_set_cam_targets_checks_the_targets_against_every_classifier():
    """A bad target is refused where it is set, naming target, before any forward: under torch.compile
    too, whose graph cannot read the values. A refused target leaves every layer as it was."""
    net = nn.ModuleList([SmallNet(), SmallNet()])
    net[1].drop = CamDrop2d(0.3, 3, nn.Linear(16, 3))  # K = 3 here, 5 in the first
    with pytest.raises(TypeError, match="target must be int64"):
        set_cam_targets(net, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        set_cam_targets(net, [0, 1])
    with pytest.raises(ValueError, match=r"target must have shape \(N,\)"):
        set_cam_targets(net, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, K\) = \[0, 5\), got -1"):
        set_cam_targets(net, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"\[0, K\) = \[0, 3\), got 4"):
        set_cam_targets(net, torch.tensor([4, 1]))
    assert all(layer.target is None for layer in (net[0].drop, net[1].drop))
    good = torch.tensor([2, 1])
    assert set_cam_targets(net, good) == [net[0].drop, net[1].drop] and net[1].drop.target is good
    assert set_cam_targets(net, None) and net[0].drop.target is None


def test_value_range_reads_a_device_tensor_once_per_version(monkeypatch):
    """What checking CUDA targets or rates costs: a tensor off the CPU is read once, and again only after an
    in-place change (its version counter, shared by every view). A CPU tensor stands in for one."""
    reads = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda tensor: reads.append(tensor) or aminmax(tensor))
    cpu = torch.tensor([3, 1])
    assert _checks.value_range(cpu) == (1, 3) and _checks.value_range(cpu) == (1, 3)
    assert len(reads) == 2  # on the CPU reading is cheap, and numpy may write without a version bump

    monkeypatch.setattr(_checks, "_reading_waits_for_device", lambda tensor: True)
    target = torch.tensor([3, 1, 4])
    assert _checks.value_range(target) == (1, 4) and _checks.value_range(target) == (1, 4)
    _checks.check_target_values(target, 5)
    with pytest.raises(ValueError, match=r"\[0, 4\), got 4"):
        _checks.check_target_values(target, 4)  # the remembered range, against another K
    assert len(reads) == 3
    target[1:].add_(3)  # through a view
    assert _checks.value_range(target) == (3, 7) and len(reads) == 4
    assert _checks.value_range(target.clone()) == (3, 7) and len(reads) == 5  # another tensor
    with torch.inference_mode():
        frozen = torch.tensor([2, 0])  # no version counter: read every time
    assert _checks.value_range(frozen) == _checks.value_range(frozen) == (0, 2) and len(reads) == 7

    # Per-sample drop rates share the record, NaN included.
    rates = torch.tensor([0.25, 0.5], dtype=torch.float16)
    assert _checks.check_sample_rates(rates, 2, rates.device).tolist() == [0.25, 0.5] and len(reads) == 8
    _checks.check_sample_rates(rates, 2, rates.device)
    assert len(reads) == 8
    rates[0] = float("nan")
    with pytest.raises(ValueError, match=r"p must hold drop rates in \[0, 1\], got values from nan to nan"):
        _checks.check_sample_rates(rates, 2, rates.device)
    assert len(reads) == 9

    copy = target.clone()
    _checks.remember_value_range(copy, 3, 7)  # as set_cam_targets does for its device copy of CPU targets
    assert _checks.value_range(copy) == (3, 7) and len(reads) == 9
    # The record does not keep the tensor alive.
    alive = weakref.ref(copy)
    del copy
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_model_with_targets_under_torch_compile_fullgraph(device, backend):
    """A training loop on a compiled model: new targets each batch, no recompilation, same results as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = SmallNet(warmup_steps=1, backend=backend).to(device)
    eager_net = SmallNet(warmup_steps=1, backend=backend).to(device)
    eager_net.load_state_dict(net.state_dict())
    compiled = torch.compile(net, fullgraph=True)
    # fallback_random: the compiled graph draws each step's seed with eager's RNG, so both runs drop the same blocks.
    with torch._dynamo.config.patch(error_on_recompile=True), torch._inductor.config.patch(fallback_random=True):
        for step in range(3):
            x = torch.randn(4, 3, 8, 8, device=device)
            target = torch.randint(0, 5, (4,), device=device)
            results = []
            for model in (compiled, eager_net):
                torch.manual_seed(step)
                with cam_targets(model, target):
                    out = model(x)
                grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
                results.append((out, grads))
            torch.testing.assert_close(results[0][0], results[1][0])
            for compiled_grad, eager_grad in zip(results[0][1], results[1][1]):
                torch.testing.assert_close(compiled_grad, eager_grad)
    assert net.drop.num_steps.item() == 3


def test_saved_for_backward_is_one_bit_per_element():
    if not robustdrop.backends()["cpu"].available:
        pytest.skip("the compiled extension is not built")
    x = torch.randn(4, 8, 32, 32, requires_grad=True)
    weight, target = torch.randn(10, 16, requires_grad=True), torch.randint(0, 10, (4,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        robustdrop.cam_drop2d(x, weight, target, 0.1, 3, seed=1, backend="cpu")
    total_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert total_bytes <= x.numel() // 8 + 4


def test_naive_baseline_is_the_same_function():
    """The benchmark's naive baseline (torch.topk, torch.rand) drops the same kind of blocks."""
    x, weight, target = margin_inputs((2, 6, 12, 12), 5, 2, 16, 1, 7)
    torch.manual_seed(1)
    y = reference.naive_cam_drop2d(x, weight, target, 0.9, 3, spatial_topk=16, channel_topk=1)
    dropped = (y == 0) & (x != 0)
    allowed = candidate_starts(x, weight, target, 3, 16, 1)
    assert dropped.any() and not (dropped & ~covered_by_allowed_blocks(allowed, 3)).any()
    kept = (~dropped).sum().item()
    torch.testing.assert_close(y[~dropped], x[~dropped] * (x.numel() / (1e-6 + kept)))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):  # float32 classifier weights, as in a model
        assert reference.naive_cam_drop2d(x.to(dtype), weight, target, 0.9, 3).dtype == dtype


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_compiled_op_autograd_runs_no_python(device):
    x = torch.randn(2, 4, 9, 10, device=device, requires_grad=True)
    weight = torch.randn(5, 8, device=device)
    target = torch.tensor([1, 4], device=device)
    forward = torch.ops.robustdrop.cam_mask_forward
    assert python_calls_in_autograd(lambda t: forward(t, weight, target, None, 5, 0.3, 3, 10, 2, True, 1e-6)[0], x) == []


def test_default_topk_counts_are_plain_ints_for_plain_sizes():
    """max(1, round(H*W / bs**2)) and max(1, C // 8). For int sizes they are ints, not torch.sym_max
    results: torch 2.11's Dynamo cannot trace torch.sym_max on two ints (fullgraph fails)."""
    cases = [(reference.default_spatial_topk(14, 14, 3), 22), (reference.default_spatial_topk(2, 2, 3), 1),
             (reference.default_spatial_topk(7, 7, 7), 1), (reference.default_channel_topk(256), 32),
             (reference.default_channel_topk(7), 1)]
    for value, expected in cases:
        assert type(value) is int and value == expected
    assert _checks.size_at_least(0, 1) == 1 and type(_checks.size_at_least(5, 1)) is int
