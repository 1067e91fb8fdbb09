"""Random Mask benchmark cases (DESIGN.md 4.4): ``robustdrop.fixed_mask2d`` (a
bit-packed (C, H, W) keep mask applied to the whole batch) against the naive
baseline ``robustdrop.reference.fixed_mask.naive_fixed_mask``, ``x * keep``
with a float keep mask, which is what Random Mask's authors write. The mask is
built once, outside the timing, as the layer does.
"""
import robustdrop
from robustdrop.benchmark import BenchConfig, Case
from robustdrop.reference.block_mask import pack_keep_mask
from robustdrop.reference.fixed_mask import naive_fixed_mask, random_keep_mask

OP = "fixed_mask2d"

# (shape (N, C, H, W), ratio): the shallow maps of the CIFAR ResNet-18 the paper masks, and an ImageNet stem.
SETTINGS = [((128, 64, 32, 32), 0.5), ((128, 128, 16, 16), 0.7), ((32, 64, 112, 112), 0.5)]
QUICK = [((4, 16, 16, 16), 0.5), ((3, 8, 9, 13), 0.7)]  # --quick: small, odd sizes included
# On a GPU only: a batch that fills it (hundreds of MB), so launch and host time no longer hide the kernels.
FILL = [((256, 64, 56, 56), 0.5)]


def cases(config: BenchConfig) -> list[Case]:
    settings = QUICK if config.quick else [*SETTINGS, *config.gpu_only(FILL)]
    return [_case(shape, ratio, config) for shape, ratio in settings]


def _case(shape, ratio, config: BenchConfig) -> Case:
    keep = random_keep_mask(shape[1:], ratio, seed=0)
    dense = keep.to(device=config.device, dtype=config.dtype)
    packed = pack_keep_mask(keep).to(config.device)

    def naive(x):
        return naive_fixed_mask(x, dense)

    def ours(x, backend):
        return robustdrop.fixed_mask2d(x, packed, backend=backend)

    return Case(op=OP, params=f"ratio={ratio}", shape=shape, naive=naive, robustdrop=ours)
