"""The CUDA kernels of csrc/cuda, run on the CPU through the CUDA execution model
of tests/cuda_emulation (see emulator.h for what it models and what it cannot see).

Here: the emulator itself (it computes what a GPU computes, and fails what a GPU
would hang on or refuse), and every CUDA op giving the same bits whatever order
its blocks and threads run in and however many multiprocessors the device has,
which is how the emulation finds races. That the CUDA ops match the references
is checked by the op tests themselves, run with ROBUSTDROP_EMULATE_CUDA=1 by
scripts/test.sh, as is this file (under AddressSanitizer where the compiler has
it, so an out-of-bounds access by a kernel fails the run).
"""
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EMULATED_CUDA, EMULATED_SCHEDULE, assert_same_bits

pytestmark = pytest.mark.skipif(not EMULATED_CUDA, reason="ROBUSTDROP_EMULATE_CUDA=1 only: scripts/test.sh runs "
                                "this file so, with the op tests (one build of the emulated kernels)")


@pytest.fixture(scope="module")
def emulated():
    from cuda_emulation import build

    ops = build.load()
    yield ops
    ops.emulator_configure(*EMULATED_SCHEDULE)  # the op tests that follow run in it


ROOT = Path(__file__).resolve().parents[1]

# (thread order, block order, shuffle seed, multiprocessors): 0 forward, 1 reverse, 2 shuffled;
# 132 multiprocessors as an H100's.
SCHEDULES = [(0, 0, 0, 2), (1, 1, 0, 1), (2, 2, 1, 3), (2, 2, 7, 5), (0, 0, 0, 132)]


# ---------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------

def test_shuffles_compute_warp_sums_and_scans(emulated):
    x = torch.arange(64, dtype=torch.float32)
    sums = emulated.emulator_selftest("warp_sum", x)
    assert torch.equal(sums, x.view(2, 32).sum(1).repeat_interleave(32))
    scans = emulated.emulator_selftest("warp_scan", x)
    assert torch.equal(scans, x.view(2, 32).cumsum(1).flatten())


@pytest.mark.parametrize("flags,expected", [([0.0] * 64, (0, 0, 0)), ([1.0] * 64, (1, 1, 64)),
                                            ([0.0, 1.0] * 32, (1, 0, 32))])
def test_barrier_votes(emulated, flags, expected):
    votes = emulated.emulator_selftest("votes", torch.tensor(flags)).view(-1, 3)
    assert torch.equal(votes, torch.tensor(expected, dtype=torch.float32).expand(64, 3))


def test_dynamic_shared_memory_starts_as_nan(emulated):
    assert emulated.emulator_selftest("unwritten_shared", torch.zeros(32)).isnan().all()


def test_thread_orders_expose_a_race_and_barriers_remove_it(emulated):
    x = torch.arange(1, 65, dtype=torch.float32)
    racy, synchronised = [], []
    for schedule in SCHEDULES[:2]:
        emulated.emulator_configure(*schedule)
        racy.append(emulated.emulator_selftest("neighbour_racy", x))
        synchronised.append(emulated.emulator_selftest("neighbour_synchronised", x))
    assert not torch.equal(racy[0], racy[1])
    assert torch.equal(synchronised[0], x.roll(-1)) and torch.equal(synchronised[1], x.roll(-1))


@pytest.mark.parametrize("case,threads,message", [
    ("divergent_barrier", 32, "wait at different __syncthreads"),
    ("early_return", 32, "returned while the others wait at __syncthreads"),
    ("partial_warp", 48, "not all 32 lanes of the warp reach"),
    ("partial_mask", 32, "partial lane mask"),
    ("device_assert", 32, r"device-side assert triggered: in\[threadIdx.x\] >= 0.0f"),
    ("empty_grid", 32, "an empty grid"),
    ("too_many_threads", 32, "more than 1024 threads"),
    ("too_much_shared", 32, "dynamic shared memory"),
])
def test_what_a_gpu_would_hang_on_or_refuse_is_an_error(emulated, case, threads, message):
    x = torch.arange(threads, dtype=torch.float32) - (3 if case == "device_assert" else 0)
    with pytest.raises(RuntimeError, match=message):
        emulated.emulator_selftest(case, x)
    # The emulator stays usable after a failed launch.
    assert torch.equal(emulated.emulator_selftest("warp_sum", torch.ones(32)), torch.full((32,), 32.0))


@pytest.mark.skipif(os.environ.get("ROBUSTDROP_EMULATE_ASAN") != "1", reason="only under the sanitizers")
@pytest.mark.parametrize("case,report", [
    # AddressSanitizer, at the first byte past the tensor's 128 bytes.
    ("read_past_end", "heap-buffer-overflow"),
    # UndefinedBehaviorSanitizer's bounds check, before AddressSanitizer sees the access.
    ("shared_past_end", "index 32 out of bounds for type 'float [32]'"),
    ("misaligned_load", "misaligned address"),
])
def test_sanitizers_stop_a_kernel_that_reads_out_of_bounds_or_misaligned(case, report):
    code = ("import sys, torch; sys.path.insert(0, 'tests'); from cuda_emulation import build; "
            f"build.load().emulator_selftest('{case}', torch.zeros(32))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert report in result.stderr


def test_rewrite_deduces_template_arguments_and_keeps_line_numbers():
    from cuda_emulation import build

    source = "a;\nkernel<float,\n  4>\n    <<<blocks, 256, 0, stream>>>(\n  x, y);\nother<<<1, 1>>>();\n"
    rewritten = build.rewrite_kernel_source(source, "k.cu")
    assert rewritten.splitlines()[0] == '#line 1 "k.cu"'
    assert rewritten.count("\n") == source.count("\n") + 1
    assert "[&](auto&&... emu_args) { kernel<float, 4>(emu_args...); }, " in rewritten
    assert "::emu::LaunchConfig{1, 1}, [&](auto&&... emu_args) { other(emu_args...); })" in rewritten
    with pytest.raises(ValueError, match="launch"):
        build.rewrite_kernel_source("f<<<1, 1>> (x);", "bad.cu")


# ---------------------------------------------------------------------------
# Every CUDA op, in every schedule
# ---------------------------------------------------------------------------

def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _op_cases(ops):
    """name -> a call of one or more emulated ops returning a list of tensors."""
    x_wide = _randn(3, 5, 20, 70)  # several column tiles, several planes per tile
    x_tall = _randn(2, 3, 70, 9, seed=1)  # several row tiles
    x_big_block = _randn(2, 2, 70, 80, seed=2)  # bs > 64: the separable kernels
    x_groups = _randn(4, 3, 12, 12, seed=3)
    x_half = _randn(2, 8, 10, 12, seed=4, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    rates = torch.tensor([0.1, 0.3, 0.0, 0.2])

    def block(x, gamma, bs, couple=False, sample_gamma=None, groups=1):
        y, mask, scale = ops.block_mask_forward(x, 11, gamma, bs, couple, True, 1e-6, sample_gamma, groups)
        return [y, mask, scale, ops.block_mask_backward(torch.ones_like(y), mask, scale)]

    x_cam = _randn(3, 6, 9, 9, seed=5)
    weight, target = _randn(5, 12, seed=6), torch.tensor([0, 4, 2])
    x_cam_last = _randn(2, 16, 7, 7, seed=7).contiguous(memory_format=torch.channels_last)
    x_cam_big = _randn(1, 2, 66, 66, seed=8)

    def cam(x, weight, target, guided, bs, spatial, channel, sample_gamma=None):
        y, mask, scale = ops.cam_mask_forward(x, weight, target, guided, 5, 0.2, bs, spatial, channel, True, 1e-6,
                                              sample_gamma)
        return [y, mask, scale]

    def density(x, dims, grids, rescale):
        cell, counts = ops.feature_density(x, dims, grids)
        y, mask, scale = ops.feature_density_forward(x, dims, grids, 9, -0.8, 0.9, rescale)
        return [cell, counts, y, mask, scale, ops.channel_mask_backward(torch.ones_like(y), mask, scale)]

    fixed = torch.randint(0, 256, (5, 20, 9), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    x_fixed = _randn(3, 5, 20, 70, seed=10)

    def fixed_in_place(x, mask):
        out = x.clone()
        ops.fixed_mask_apply_(out, mask)
        return [ops.fixed_mask_apply(x, mask), out]

    student, teacher = _randn(5, 3000, seed=11), _randn(5, 3000, seed=12)
    index = torch.randint(-2**62, 2**62, (10000,), generator=torch.Generator().manual_seed(13))
    return {
        "philox": lambda: [ops.philox_words(index, 3), ops.philox_uniform(index, -5)],
        "block_wide": lambda: block(x_wide, 0.05, 3),
        "block_wide_coupled": lambda: block(x_wide, 0.05, 7, couple=True),
        "block_tall": lambda: block(x_tall, 0.1, 5),
        "block_separable": lambda: block(x_big_block, 0.001, 66),
        "block_per_sample_groups": lambda: block(x_groups, 0.1, 3, sample_gamma=rates, groups=2),
        "block_half_channels_last": lambda: block(x_half, 0.1, 3),
        "cam": lambda: cam(x_cam, weight, target, None, 3, 20, 3),
        "cam_channels_last": lambda: cam(x_cam_last, _randn(4, 16, seed=14), torch.tensor([1, 3]),
                                         torch.tensor(True), 3, 10, 5),
        "cam_separable": lambda: cam(x_cam_big, _randn(3, 2, seed=15), torch.tensor([2]), None, 65, 500, 1),
        "cam_per_sample": lambda: cam(x_cam, weight, target, None, 3, 20, 3, sample_gamma=rates[:3] * 2),
        "cam_per_sample_separable": lambda: cam(_randn(2, 2, 66, 66, seed=22), _randn(3, 2, seed=23),
                                                torch.tensor([2, 0]), None, 65, 500, 2,
                                                sample_gamma=torch.tensor([0.0, 0.01])),
        # H*W over the 10240 keys the selection caches in shared memory.
        "cam_uncached_keys": lambda: cam(_randn(1, 2, 110, 110, seed=19), _randn(3, 2, seed=20), torch.tensor([1]),
                                         None, 3, 5000, 1),
        "density_gram": lambda: density(_randn(4, 6, 5, 5, seed=16), 2, 3, False),
        "density_covariance": lambda: density(_randn(3, 40, 2, 2, seed=17), 3, 2, True),
        "density_features": lambda: density(_randn(5, 30, seed=18), 1, 4, True),
        # min(C, H*W) = 520 > 512: the Lanczos workspace no longer fits shared memory.
        "density_global_workspace": lambda: density(_randn(1, 520, 23, 23, seed=21), 2, 5, False),
        "fixed_mask": lambda: fixed_in_place(x_fixed, fixed),
        "kl_distill": lambda: list(ops.kl_distill_forward(student, teacher, 2.0, "none")),
        "kl_distill_float64": lambda: list(ops.kl_distill_forward(student[:, :40].double(),
                                                                  teacher[:, :40].double(), 1.0, "batchmean")),
        "kl_distill_loss": lambda: [ops.kl_distill(student, teacher, 0.5, "mean")],
    }


CASES = ["philox", "block_wide", "block_wide_coupled", "block_tall", "block_separable", "block_per_sample_groups",
         "block_half_channels_last", "cam", "cam_channels_last", "cam_separable", "cam_per_sample",
         "cam_per_sample_separable", "cam_uncached_keys",
         "density_gram", "density_covariance", "density_features", "density_global_workspace", "fixed_mask",
         "kl_distill", "kl_distill_float64", "kl_distill_loss"]


@pytest.mark.parametrize("case", CASES)
def test_every_schedule_gives_the_same_bits(emulated, case):
    call = _op_cases(emulated)[case]
    results = []
    for schedule in SCHEDULES:
        emulated.emulator_configure(*schedule)
        results.append(call())
    for other in results[1:]:
        for actual, expected in zip(other, results[0]):
            assert_same_bits(actual, expected)


def test_the_cases_cover_every_op_and_exercise_barriers_and_shuffles(emulated):
    schema = (ROOT / "csrc" / "robustdrop.cpp").read_text()
    defined = set(re.findall(r'm\.def\(\s*"(\w+)\(', schema))
    called = set(re.findall(r"ops\.(\w+)\(", inspect.getsource(_op_cases)))
    assert defined and defined <= called, sorted(defined - called)
    before = emulated.emulator_counters()
    cases = _op_cases(emulated)
    for name in CASES:
        cases[name]()
    launches, barriers, shuffles = (a - b for a, b in zip(emulated.emulator_counters(), before))
    assert launches > len(CASES) and barriers > 0 and shuffles > 0


# ---------------------------------------------------------------------------
# The public API reaches the emulated kernels
# ---------------------------------------------------------------------------

def _public_calls():
    import robustdrop
    from robustdrop import ews

    x = _randn(2, 4, 8, 8, seed=20).requires_grad_()
    weight, target = _randn(3, 4, seed=21), torch.tensor([0, 2])
    keep = torch.tensor([[True, False, True, True], [False, True, True, False]])
    fixed = robustdrop.pack_fixed_mask(torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(22)) > 0.3)
    logits = _randn(2, 10, seed=23).requires_grad_()
    return {
        "drop_block2d": lambda: robustdrop.drop_block2d(x, 0.2, 3, seed=1, backend="cpu"),
        "cam_drop2d": lambda: robustdrop.cam_drop2d(x, weight, target, 0.2, 3, spatial_topk=20, channel_topk=2,
                                                    seed=1, backend="cpu"),
        "feature_density_dropout": lambda: robustdrop.feature_density_dropout(x, seed=1, backend="cpu"),
        "fixed_mask2d": lambda: robustdrop.fixed_mask2d(x, fixed, backend="cpu"),
        "channel_gate": lambda: ews.channel_gate(x, keep, backend="cpu"),
        "kl_distill": lambda: ews.kl_distill(logits, _randn(2, 10, seed=24), backend="cpu"),
    }


@pytest.mark.parametrize("name", ["drop_block2d", "cam_drop2d", "feature_density_dropout", "fixed_mask2d",
                                  "channel_gate", "kl_distill"])
def test_public_api_runs_the_emulated_kernels_forward_and_backward(emulated, name):
    launches = emulated.emulator_counters()[0]
    y = _public_calls()[name]()
    forward = emulated.emulator_counters()[0]
    y.sum().backward()
    assert launches < forward
    # kl_distill's forward kernel computes the student gradient too; its backward only scales it.
    assert (forward < emulated.emulator_counters()[0]) == (name != "kl_distill")
