"""Channel gate benchmark cases (EWS subnets): ``robustdrop.ews.channel_gate``
(a per-sample channel keep mask, bit-packed, applied to (N, C, H, W) maps)
against the naive baseline ``robustdrop.reference.channel_gate.channel_gate``,
the ``torch.where`` on a broadcast bool mask a user writes.

Each sample keeps ``ceil(0.7 * C)`` channels (the paper's width), drawn once
outside the timing, as the controller samples a subnet before its forward. N is
a CIFAR batch of 128 repeated once per candidate subnet (EWS evaluates 8 in one
batched forward), so the shapes are the ResNet-18 stages at N = 1024.
"""
import torch

from robustdrop.benchmark import BenchConfig, Case
from robustdrop.ews.gates import kept_count
from robustdrop.ops.channel_gate import channel_gate
from robustdrop.reference.channel_gate import channel_gate as naive_channel_gate

OP = "channel_gate"

WIDTH = 0.7
# (N, C, H, W): CIFAR ResNet-18 stages, a batch of 128 times 8 candidate subnets.
SETTINGS = [(1024, 64, 32, 32), (1024, 128, 16, 16), (1024, 256, 8, 8), (1024, 512, 4, 4)]
QUICK = [(8, 16, 8, 8), (3, 13, 5, 7)]  # --quick: small, C not a multiple of 8 included


def cases(config: BenchConfig) -> list[Case]:
    settings = QUICK if config.quick else SETTINGS
    return [_case(shape, config) for shape in settings]


def _random_subnet_keep(batch: int, channels: int, width: float, seed: int = 0) -> torch.Tensor:
    """(batch, channels) bool: each row keeps ceil(width * channels) channels chosen uniformly."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(batch, channels, generator=generator).argsort(dim=1)
    keep = torch.zeros(batch, channels, dtype=torch.bool)
    keep.scatter_(1, order[:, : kept_count(width, channels)], True)
    return keep


def _case(shape, config: BenchConfig) -> Case:
    keep = _random_subnet_keep(shape[0], shape[1], WIDTH).to(config.device)

    def naive(x):
        return naive_channel_gate(x, keep)

    def ours(x, backend):
        return channel_gate(x, keep, backend=backend)

    return Case(op=OP, params=f"width={WIDTH}", shape=shape, naive=naive, robustdrop=ours)
