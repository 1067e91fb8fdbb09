"""Feature-density dropout benchmark cases (DESIGN.md 4.3):
``robustdrop.feature_density_dropout`` against the naive baseline
``robustdrop.reference.feature_density.naive_feature_density_dropout``: a
per-sample loop of float64 ``torch.linalg.eigh`` on the (H*W x H*W)
covariance (the PCA the paper describes, O((H*W)**3) per sample), binning and
counting with torch ops, and ``torch.bernoulli``. No outside library ships
FDD, so the only anchor is ``torch.compile`` of the naive baseline.

The issue's targets are forward times at 64x512x4x4 (ResNet-18's last map on
CIFAR) and 64x128x16x16; the inputs are random normal, the hardest case for
the Lanczos iteration (a flat spectrum with small gaps between its top
eigenvalues).
"""
import robustdrop
from robustdrop.benchmark import BenchConfig, Case, Target
from robustdrop.reference.feature_density import naive_feature_density_dropout

OP = "feature_density_dropout"

# (shape, dims)
TARGET_SETTINGS = [((64, 512, 4, 4), 2), ((64, 128, 16, 16), 2)]
TYPICAL = [((64, 512, 4, 4), 3), ((64, 512), 1)]  # FDD-3D, and FDD-1D on ResNet-18's FC features
QUICK = [((4, 32, 4, 4), 2), ((3, 12, 5, 7), 3), ((8, 40), 1)]  # --quick: small, odd sizes
# On a GPU only: a batch that fills it (hundreds of MB), so launch and host time no longer hide the kernels.
FILL = [((1024, 512, 4, 4), 2), ((512, 128, 16, 16), 2)]
# Issue 4's targets at each of TARGET_SETTINGS, float32, forward.
TARGETS = (
    Target(4, "speedup_fwd", device="cpu", at_least=20.0),
    Target(4, "speedup_fwd", device="cuda", at_least=50.0),
)


def cases(config: BenchConfig) -> list[Case]:
    settings = QUICK if config.quick else [*TARGET_SETTINGS, *TYPICAL, *config.gpu_only(FILL)]
    return [_case(shape, dims, TARGETS if (shape, dims) in TARGET_SETTINGS else ()) for shape, dims in settings]


def _case(shape, dims, targets=()) -> Case:
    def naive(x):
        return naive_feature_density_dropout(x, dims)

    def ours(x, backend):
        return robustdrop.feature_density_dropout(x, dims, backend=backend)

    return Case(op=OP, params=f"dims={dims}", shape=shape, naive=naive, robustdrop=ours, targets=targets)
