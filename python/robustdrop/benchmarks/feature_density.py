"""Feature-density dropout benchmark cases (DESIGN.md 4.3):
``robustdrop.feature_density_dropout`` against the naive baseline
``robustdrop.reference.feature_density.naive_feature_density_dropout``: a
per-sample loop of float64 ``torch.linalg.eigh`` on the (H*W x H*W)
covariance (the PCA the paper describes, O((H*W)**3) per sample), binning and
counting with torch ops, and ``torch.bernoulli``. No outside library ships
FDD. The anchors are ``torch.compile`` of the naive baseline and what a user
who batches the PCA writes: one float32 ``torch.linalg.eigh`` over the N
covariances, no per-sample loop (``batched_feature_density``).

The issue's targets are forward times at 64x512x4x4 (ResNet-18's last map on
CIFAR) and 64x128x16x16; the inputs are random normal, the hardest case for
the Lanczos iteration (a flat spectrum with small gaps between its top
eigenvalues).
"""
import torch

import robustdrop
from robustdrop.benchmark import Anchor, BenchConfig, Case, Target
from robustdrop.reference.feature_density import (bin_coordinates, cell_counts, default_grids, naive_drop_channels,
                                                   naive_feature_density_dropout)

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
    return [_case(shape, dims, TARGETS if (shape, dims) in TARGET_SETTINGS else (), anchored=(shape, dims) not in FILL)
            for shape, dims in settings]


def _case(shape, dims, targets=(), anchored=True) -> Case:
    """One case; ``anchored`` adds the batched-eigh anchor (not on the FILL sizes, where its eigh of
    hundreds of matrices would take seconds of a short GPU lease to say what the smaller sizes say)."""
    def naive(x):
        return naive_feature_density_dropout(x, dims)

    def ours(x, backend):
        return robustdrop.feature_density_dropout(x, dims, backend=backend)

    anchors = (Anchor(BATCHED_EIGH, lambda: lambda x: batched_eigh_dropout(x, dims)),) if anchored else ()
    return Case(op=OP, params=f"dims={dims}", shape=shape, naive=naive, robustdrop=ours, anchors=anchors,
                targets=targets)


BATCHED_EIGH = "batched float32 eigh"


def batched_feature_density(x: torch.Tensor, dims: int, grids: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell (N, C) int64, counts (N, G) int64) with the PCA of all samples in one batched float32 eigh.

    x (N, C, H, W): Xc = x viewed (N, C, D) minus its channel mean; the axes
    are the top ``dims`` eigenvectors of Xc^T Xc (N, D, D), largest first, or,
    when C < D, from the smaller Gram side: Xc^T u for the top eigenvectors u
    of Xc Xc^T (N, C, C), not normalised (an axis's bins do not depend on its
    length, only on its direction). Each axis is oriented so that its
    largest-magnitude component is positive; f = Xc @ axes (N, C, dims).
    x (N, F): f = x (dims 1). Binned as the reference (``bin_coordinates``). No
    care for degenerate samples or axes, which the reference defines: an anchor
    for random inputs, equal to the reference's cells up to float32 rounding.
    """
    if x.dim() == 2:
        f = x.to(torch.float32).unsqueeze(-1)
    else:
        values = x.to(torch.float32).flatten(2)
        centred = values - values.mean(1, keepdim=True)
        if centred.shape[1] < centred.shape[2]:
            _, vectors = torch.linalg.eigh(centred @ centred.transpose(1, 2))
            axes = centred.transpose(1, 2) @ vectors[..., -dims:].flip(-1)
        else:
            _, vectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred)
            axes = vectors[..., -dims:].flip(-1)
        largest = torch.gather(axes, 1, axes.abs().argmax(1, keepdim=True))
        f = centred @ (axes * torch.where(largest < 0, -1.0, 1.0))
    cell = bin_coordinates(f.to(torch.float64), grids)
    return cell, cell_counts(cell, grids**dims)


def batched_eigh_dropout(x: torch.Tensor, dims: int, kappa: float = -0.8, alpha: float = 0.9) -> torch.Tensor:
    """FDD with ``batched_feature_density``, then the naive baseline's drop (``naive_drop_channels``)."""
    with torch.no_grad():
        cell, counts = batched_feature_density(x, dims, default_grids(dims))
    return naive_drop_channels(x, cell, counts, kappa, alpha)
