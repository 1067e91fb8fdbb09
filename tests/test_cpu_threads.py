"""The cpu backend gives the same bits whatever the number of threads.

The C++ CPU kernels split their work with at::parallel_for, so a machine's
core count decides where each thread's range of samples, planes, rows or
elements begins. Counts, scales, top-k selections, PCA bins and KL sums must
not depend on it: the same seed gives the same result on a laptop and on a
64-core node. Each case runs at 1 thread and at 3 and 8 (uneven splits, and
more threads than this machine may have), on tensors large enough that every
parallel loop splits.
"""
import pytest
import torch

import robustdrop
from conftest import assert_same_bits
from robustdrop.ews import kl_distill
from robustdrop.ops.channel_gate import channel_gate

pytestmark = pytest.mark.skipif(not robustdrop.backends()["cpu"].available, reason="robustdrop._C is not built")

THREAD_COUNTS = (3, 8)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _forward_and_gradient(op, x):
    """op(x) and x's gradient for a fixed upstream gradient, or op(x)'s outputs when it has none."""
    x = x.clone().requires_grad_()
    outputs = op(x)
    if isinstance(outputs, tuple):
        return outputs
    grad = torch.linspace(-2, 3, outputs.numel()).view(outputs.shape)
    return (outputs.detach(),) + torch.autograd.grad(outputs, x, grad)


CAM_WEIGHT, CAM_TARGET = _randn(10, 64, seed=1), torch.arange(8) % 10
FIXED_KEEP = torch.rand(16, 64, 64, generator=torch.Generator().manual_seed(2)) < 0.8
GATE_KEEP = torch.rand(4, 16, generator=torch.Generator().manual_seed(3)) < 0.7

CASES = {
    "drop_block2d": (lambda x: robustdrop.drop_block2d(x, 0.1, 7, seed=3, backend="cpu"), (4, 16, 64, 64)),
    "drop_block2d_channels_last": (
        lambda x: robustdrop.drop_block2d(x.to(memory_format=torch.channels_last), 0.1, 7, seed=3, backend="cpu"),
        (4, 16, 64, 64)),
    "drop_block2d_coupled": (
        lambda x: robustdrop.drop_block2d(x, 0.1, 7, seed=3, couple_channels=True, backend="cpu"), (4, 16, 64, 64)),
    "drop_block2d_per_sample_rate": (
        lambda x: robustdrop.drop_block2d(x, torch.tensor([0.0, 0.1, 0.2, 0.3]), 5, seed=3, normalize="sample",
                                          backend="cpu"), (4, 16, 64, 64)),
    "cam_drop2d": (lambda x: robustdrop.cam_drop2d(x, CAM_WEIGHT, CAM_TARGET, 0.1, 3, seed=4, backend="cpu"),
                   (8, 64, 14, 14)),
    "fixed_mask2d": (lambda x: robustdrop.fixed_mask2d(x, FIXED_KEEP, backend="cpu"), (4, 16, 64, 64)),
    "channel_gate": (lambda x: channel_gate(x, GATE_KEEP, backend="cpu"), (4, 16, 64, 64)),
    "kl_distill": (lambda s: kl_distill(s, _randn(64, 1000, seed=5), temperature=2.0, backend="cpu"), (64, 1000)),
    # More rows than at::sum's grain (32768): a sum it would split among the threads.
    "kl_distill_many_rows": (lambda s: kl_distill(s, _randn(100_000, 10, seed=5), reduction="sum", backend="cpu"),
                             (100_000, 10)),
    "kl_distill_rows": (lambda s: kl_distill(s, _randn(64, 1000, seed=5), reduction="none", backend="cpu"),
                        (64, 1000)),
}
for dims in (1, 2, 3):
    for shape in ((16, 128, 8, 8), (16, 32, 16, 16)):
        CASES[f"feature_density_{dims}d_{shape[1]}x{shape[2]}"] = (
            lambda x, dims=dims: robustdrop.feature_density(x, dims, backend="cpu"), shape)
        CASES[f"feature_density_dropout_{dims}d_{shape[1]}x{shape[2]}"] = (
            lambda x, dims=dims: robustdrop.feature_density_dropout(x, dims, seed=6, backend="cpu"), shape)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_bits_do_not_depend_on_the_thread_count(case, restore_threads):
    op, shape = CASES[case]
    x = _randn(*shape, seed=7)
    torch.set_num_threads(1)
    expected = _forward_and_gradient(op, x)
    for threads in THREAD_COUNTS:
        torch.set_num_threads(threads)
        for actual, wanted in zip(_forward_and_gradient(op, x), expected, strict=True):
            assert_same_bits(actual, wanted)


def test_philox_bits_do_not_depend_on_the_thread_count(restore_threads):
    index = torch.arange(2**32 - 100_000, 2**32 + 100_000)
    torch.set_num_threads(1)
    expected = torch.ops.robustdrop.philox_words(index, 2**62 + 5)
    for threads in THREAD_COUNTS:
        torch.set_num_threads(threads)
        assert_same_bits(torch.ops.robustdrop.philox_words(index, 2**62 + 5), expected)
