"""CamDrop benchmark cases (DESIGN.md 4.2): ``robustdrop.cam_drop2d`` against
the naive baseline ``robustdrop.reference.cam_mask.naive_cam_drop2d`` (einsum,
``torch.topk``, scatter, ``torch.rand``, max-pool). No outside library ships
CamDrop, so there is no anchor beyond ``torch.compile`` of the naive baseline.
"""
import torch

import robustdrop
from robustdrop.benchmark import BenchConfig, Case, Target
from robustdrop.reference.cam_mask import naive_cam_drop2d

OP = "cam_drop2d"

# (shape (N, C, H, W), p, block_size, classes, classifier width C')
TARGET = ((32, 256, 14, 14), 0.1, 3, 100, 256)  # the target, forward + backward
TYPICAL = [((32, 128, 28, 28), 0.1, 5, 100, 512)]  # an earlier stage guided by a 4x wider classifier
QUICK = [((4, 16, 14, 14), 0.1, 3, 10, 32), ((2, 24, 9, 11), 0.1, 3, 10, 24)]  # --quick: small, odd sizes
# On a GPU only: a batch that fills it (hundreds of MB), so launch and host time no longer hide the kernels.
FILL = [((256, 256, 14, 14), 0.1, 3, 100, 256)]
# Issue 3's targets at TARGET, float32, forward + backward.
TARGETS = (
    Target(3, "speedup_fwd_bwd", device="cpu", at_least=5.0),
    Target(3, "speedup_fwd_bwd", device="cuda", at_least=10.0),
    Target(3, "x_mul_fwd_bwd", device="cuda", at_most=2.0),
    # The same bound on device times, the host's time hidden (Timer.device_only), as in a training step.
    Target(3, "x_mul_fwd_bwd_device", device="cuda", at_most=2.0),
)


def cases(config: BenchConfig) -> list[Case]:
    settings = QUICK if config.quick else [TARGET, *TYPICAL, *config.gpu_only(FILL)]
    return [_case(config.device, *setting, targets=TARGETS if setting == TARGET else ()) for setting in settings]


def _case(device, shape, p, block_size, classes, width, targets=()) -> Case:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(classes, width, generator=generator).to(device)
    target = torch.randint(0, classes, (shape[0],), generator=generator).to(device)

    def naive(x):
        return naive_cam_drop2d(x, weight, target, p, block_size)

    def ours(x, backend):
        return robustdrop.cam_drop2d(x, weight, target, p, block_size, backend=backend)

    params = f"p={p} bs={block_size} K={classes} C'={width}"
    return Case(op=OP, params=params, shape=shape, naive=naive, robustdrop=ours, targets=targets)
