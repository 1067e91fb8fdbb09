"""Feature-density dropout (FDD, DESIGN.md 4.3), the naive way the paper describes:
the executable specification that every backend is tested against, and, with
torch's own RNG, the benchmark's naive baseline.

Shapes: x (N, C, H, W) with dims in {1, 2, 3}, or x (N, F) with dims 1 (FC
features; F plays the role of C). D = H*W; G = grids**dims cells.

Per sample n, step by step:

    X      = x[n] viewed (C, D) in float64; Xc = X - mean over channels
    v_r    = the r-th principal axis: eigenvector of the covariance Xc^T Xc
             (D x D, torch.linalg.eigh in float64, the paper's O(D**3) PCA),
             r < dims, oriented so that its largest-magnitude component is
             positive (ties to the lower index)
    f[c,r] = Xc[c] . v_r                                         (C, dims)
             (2-D x: f[c, 0] = x[n, c], no PCA)
    b_r    = min(floor((f_r - min f_r) / d_r), grids - 1), d_r = (max f_r - min f_r) / grids
             (every b_r = 0 when max f_r = min f_r)
    cell   = sum_r b_r * grids**r                                (C,) int64
    counts = bincount(cell, G)                                   (G,) int64
    p[g]   = float32(clamp(kappa * counts[g] / max(counts) + alpha, 0, 1)), in float64
    keep   = uniform(seed, n*C + c) >= p[cell[c]]                (C,) bool
    y[n,c] = keep ? x[n, c] * s : 0, s = 1 or float32(1 / (1 - p)) with rescale

x is read as float32 (exact for float16 and bfloat16; float64 x is rounded
once), then worked on in float64.

Defined results where PCA has nothing to say: a sample whose centred values
have a non-finite sum of squares, or one at most 1e-10 of the uncentred sum
(all channels equal up to float32 rounding, C = 1, H*W = 0, all zeros, a NaN
or Inf in the map; for 2-D x, any non-finite value) puts every channel in
cell 0; an axis whose eigenvalue is at most 1e-5 of the largest (or beyond the
rank of the covariance) has coordinate 0 for every channel.

The paper's Eq. 2 draws m ~ Bernoulli(p_i) and multiplies, which reads p_i as
a keep probability, while its text and Eq. 1's negative correlation ("a
smaller p_i is assigned to the feature group with higher density") read p_i as
the probability of dropping. robustdrop follows the text: p is the drop
probability, so dense groups are dropped less with kappa < 0.
"""
import torch

from robustdrop.reference import block_mask
from robustdrop.reference.philox import philox_uniform

__all__ = [
    "DEFAULT_GRIDS", "ABSENT_AXIS_TOLERANCE", "DEGENERATE_TOLERANCE", "default_grids", "principal_axes", "principal_coordinates", "feature_coordinates",
    "bin_coordinates", "bin_edge_distance", "feature_density", "drop_probabilities", "channel_keep_mask",
    "channel_scale", "apply_channel_mask", "feature_density_forward", "channel_mask_backward", "cell_counts",
    "naive_feature_density_dropout", "naive_drop_channels",
]

DEFAULT_GRIDS = {1: 25, 2: 5, 3: 3}  # 25, 25 and 27 cells, as the paper's experiments
ABSENT_AXIS_TOLERANCE = 1e-5
# Channels whose centred energy is at most this fraction of their energy are equal up to
# float32 rounding: the sample has no principal axes.
DEGENERATE_TOLERANCE = 1e-10


def default_grids(dims: int) -> int:
    """Grids per axis when none is given: 25 (1-D), 5 (2-D), 3 (3-D)."""
    return DEFAULT_GRIDS[dims]


def principal_axes(sample: torch.Tensor, dims: int):
    """(centred (C, D), axes (D, R)) float64 of one sample (C, D): its R <= dims present principal
    axes, oriented, as columns; R = 0 for a degenerate sample."""
    centred = sample.to(torch.float64)
    centred = centred - centred.mean(0, keepdim=True)
    axes = torch.zeros((centred.shape[1], 0), dtype=torch.float64, device=sample.device)
    total = (centred * centred).sum()
    energy = sample.to(torch.float64).square().sum()
    if centred.numel() == 0 or not (torch.isfinite(total) and total > DEGENERATE_TOLERANCE * energy):
        return centred, axes
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)
    present = []
    for r in range(min(dims, eigenvalues.shape[0])):
        if eigenvalues[-1 - r] <= ABSENT_AXIS_TOLERANCE * eigenvalues[-1]:
            break
        axis = eigenvectors[:, -1 - r]
        present.append(-axis if axis[torch.argmax(axis.abs())] < 0 else axis)
    return centred, torch.stack(present, 1) if present else axes


def principal_coordinates(sample: torch.Tensor, dims: int) -> torch.Tensor:
    """f (C, dims) float64: the channels of one sample (C, D) projected on its top principal
    axes; 0 on absent axes."""
    centred, axes = principal_axes(sample, dims)
    coordinates = torch.zeros((sample.shape[0], dims), dtype=torch.float64, device=sample.device)
    coordinates[:, :axes.shape[1]] = centred @ axes
    return coordinates


def feature_coordinates(x: torch.Tensor, dims: int) -> torch.Tensor:
    """f (N, C, dims) float64 for x (N, C, H, W), or (N, F, 1) for x (N, F) (the values themselves).

    Densities are a function of float32(x), the values the kernels read:
    float64 x beyond float32's range counts as Inf, below its smallest
    subnormal as 0.
    """
    x = x.to(torch.float32)
    if x.dim() == 2:
        values = x.to(torch.float64)
        finite = torch.isfinite(values).all(1, keepdim=True)
        return torch.where(finite, values, torch.zeros_like(values)).unsqueeze(-1)
    n, c = x.shape[:2]
    rows = [principal_coordinates(x[i].reshape(c, x[i][0].numel() if c else 0), dims) for i in range(n)]
    return torch.stack(rows) if rows else torch.zeros((0, c, dims), dtype=torch.float64, device=x.device)


def _axis_bins(f: torch.Tensor, grids: int):
    """(bin (N, C, dims) int64, lo, width) of coordinates f (N, C, dims); width 0 where max == min."""
    if f.shape[1] == 0:
        empty = f.new_zeros(f.shape[0], 1, f.shape[2])
        return torch.zeros(f.shape, dtype=torch.int64, device=f.device), empty, empty
    lo = f.amin(1, keepdim=True)
    hi = f.amax(1, keepdim=True)
    width = (hi - lo) / grids
    flat = hi == lo
    position = (f - lo) / torch.where(flat, torch.ones_like(width), width)
    bins = position.floor().clamp(0, grids - 1).to(torch.int64)
    return torch.where(flat, torch.zeros_like(bins), bins), lo, torch.where(flat, torch.zeros_like(width), width)


def bin_coordinates(f: torch.Tensor, grids: int) -> torch.Tensor:
    """cell (N, C) int64 = sum_r b_r * grids**r for coordinates f (N, C, dims)."""
    bins, _, _ = _axis_bins(f, grids)
    powers = grids ** torch.arange(f.shape[2], dtype=torch.int64, device=f.device)
    return (bins * powers).sum(-1)


def bin_edge_distance(f: torch.Tensor, grids: int) -> torch.Tensor:
    """(N, C) float64: each channel's smallest distance to an interior bin edge, over its axes,
    relative to the axis range (max - min); inf on axes where every channel shares bin 0.

    A backend whose float32 coordinates differ from these by less than this distance puts
    the channel in the same cell.
    """
    bins, lo, width = _axis_bins(f, grids)
    if f.shape[1] == 0:
        return torch.zeros(f.shape[:2], dtype=torch.float64, device=f.device)
    position = (f - lo) / torch.where(width > 0, width, torch.ones_like(width))
    nearest = position.round().clamp(1, grids - 1) if grids > 1 else position.new_full(position.shape, float("inf"))
    distance = (position - nearest).abs() / grids
    distance = torch.where(width > 0, distance, torch.full_like(distance, float("inf")))
    return distance.amin(-1)


def feature_density(x: torch.Tensor, dims: int, grids: int):
    """The reference of robustdrop::feature_density: (cell (N, C) int64, counts (N, G) int64)."""
    cell = bin_coordinates(feature_coordinates(x.detach(), dims), grids)
    return cell, cell_counts(cell, grids**dims)


def cell_counts(cell: torch.Tensor, cells: int) -> torch.Tensor:
    """counts (N, cells) int64: how many of each sample's channels fall in each cell of cell (N, C)."""
    counts = torch.zeros((cell.shape[0], cells), dtype=torch.int64, device=cell.device)
    return counts.scatter_add_(1, cell, torch.ones_like(cell))


def drop_probabilities(counts: torch.Tensor, kappa: float, alpha: float) -> torch.Tensor:
    """p (N, G) float32 = clamp(kappa * count / max(count) + alpha, 0, 1), computed in float64, rounded once."""
    largest = counts.amax(1, keepdim=True).clamp_min(1).to(torch.float64) if counts.shape[1] else counts
    p = counts.to(torch.float64) * kappa
    p = p / largest
    p = p + alpha
    return p.clamp(0.0, 1.0).to(torch.float32)


def channel_keep_mask(cell: torch.Tensor, counts: torch.Tensor, seed: int, kappa: float, alpha: float):
    """(keep (N, C) bool, p (N, C) float32): channel c of sample n is dropped iff uniform(seed, n*C + c) < p."""
    p = torch.gather(drop_probabilities(counts, kappa, alpha), 1, cell)
    index = torch.arange(cell.numel(), dtype=torch.int64, device=cell.device).view(cell.shape)
    return philox_uniform(index, seed) >= p, p


def channel_scale(keep: torch.Tensor, p: torch.Tensor, rescale: bool) -> torch.Tensor:
    """1 (0-d float32), or with rescale (N, C) float32(1 / (1 - p)) in float64 where kept, 0 where dropped."""
    if not rescale:
        return torch.ones((), dtype=torch.float32, device=keep.device)
    inverse = 1.0 / (1.0 - p.to(torch.float64))
    return torch.where(keep, inverse, torch.zeros_like(inverse)).to(torch.float32)


def apply_channel_mask(x: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """keep ? x * scale : 0 per channel, for x (N, C, ...) and keep (N, C): DropBlock's apply rule.
    A 0-d scale of exactly 1 (no rescale; EWS's gates) multiplies nothing: keep ? x : 0, the kept
    values' bits untouched, NaN payloads included (x * 1 in float32 would quiet a signalling NaN)."""
    extra = (1,) * (x.dim() - 2)
    keep = keep.view(*keep.shape, *extra)
    if scale.dim() == 0:
        selected = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        y = torch.where(scale.to(x.device) == 1.0, selected, block_mask.apply_keep_mask(x, keep, scale))
        return y.contiguous(memory_format=block_mask.output_memory_format(x))
    return block_mask.apply_keep_mask(x, keep, scale.view(*scale.shape, *extra))


def feature_density_forward(x, dims, grids, seed, kappa, alpha, rescale):
    """The reference of robustdrop::feature_density_forward: (y, mask (N, ceil(C/8)) uint8, scale)."""
    cell, counts = feature_density(x, dims, grids)
    keep, p = channel_keep_mask(cell, counts, seed, kappa, alpha)
    scale = channel_scale(keep, p, rescale)
    return apply_channel_mask(x, keep, scale), block_mask.pack_keep_mask(keep), scale


def channel_mask_backward(grad_y, mask, scale):
    """The reference of robustdrop::channel_mask_backward: keep ? grad_y * scale : 0 per channel."""
    keep = block_mask.unpack_keep_mask(mask, grad_y.shape[1])
    return apply_channel_mask(grad_y, keep, scale)


def naive_feature_density_dropout(x, dims=2, grids=None, kappa=-0.8, alpha=0.9, *, rescale=False):
    """The benchmark's naive baseline: the per-sample float64 eigh loop and torch.bernoulli, as a user writes it."""
    grids = default_grids(dims) if grids is None else grids
    with torch.no_grad():
        cell, counts = feature_density(x, dims, grids)
    return naive_drop_channels(x, cell, counts, kappa, alpha, rescale=rescale)


def naive_drop_channels(x, cell, counts, kappa, alpha, *, rescale=False):
    """The naive baseline's drop for cells (N, C) and counts (N, G): p from the density, torch.bernoulli,
    y = x * keep per channel (divided by 1 - p with rescale)."""
    with torch.no_grad():
        p = (kappa * counts / counts.amax(1, keepdim=True).clamp_min(1) + alpha).clamp(0, 1)
        p = torch.gather(p, 1, cell).to(x.dtype)
        keep = torch.bernoulli(1 - p)
        if rescale:
            keep = keep / (1 - p).clamp_min(1e-12)
    return x * keep.view(*keep.shape, *(1,) * (x.dim() - 2))
