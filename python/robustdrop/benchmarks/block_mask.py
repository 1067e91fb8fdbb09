"""DropBlock benchmark cases (DESIGN.md 4.1): ``robustdrop.drop_block2d`` against
the naive baseline ``robustdrop.reference.block_mask.naive_drop_block2d``,
torchvision's ``ops.drop_block2d`` and timm's ``layers.DropBlock2d``.
"""
import robustdrop
from robustdrop.benchmark import Anchor, BenchConfig, Case
from robustdrop.reference.block_mask import naive_drop_block2d

OP = "drop_block2d"

# (shape (N, C, H, W), p, block_size)
TARGET = ((32, 64, 56, 56), 0.1, 7)  # the target: a ResNet stage-1 map, forward + backward
TYPICAL = [((32, 256, 28, 28), 0.1, 5), ((32, 512, 14, 14), 0.1, 3)]  # later ResNet stages
QUICK = [((4, 16, 28, 28), 0.1, 7), ((2, 32, 15, 17), 0.1, 3)]  # --quick: small, odd sizes included


def cases(config: BenchConfig) -> list[Case]:
    settings = QUICK if config.quick else [TARGET, *TYPICAL]
    return [_case(shape, p, block_size) for shape, p, block_size in settings]


def _case(shape, p, block_size) -> Case:
    def naive(x):
        return naive_drop_block2d(x, p, block_size)

    def ours(x, backend):
        return robustdrop.drop_block2d(x, p, block_size, backend=backend)

    return Case(op=OP, params=f"p={p} bs={block_size}", shape=shape, naive=naive, robustdrop=ours,
                anchors=(Anchor("torchvision.ops.drop_block2d", _torchvision(p, block_size)),
                         Anchor("timm DropBlock2d", _timm(p, block_size))))


def _torchvision(p, block_size):
    def build():
        from torchvision.ops import drop_block2d

        return lambda x: drop_block2d(x, p, block_size, inplace=False, training=True)

    return build


def _timm(p, block_size):
    def build():
        try:
            from timm.layers import DropBlock2d
        except ImportError:  # timm < 0.9
            from timm.models.layers import DropBlock2d
        return DropBlock2d(drop_prob=p, block_size=block_size).train()

    return build
