"""CamDrop (DESIGN.md 4.2), the naive way: the executable specification that
every backend is tested against, and, with torch's own RNG and plain
``torch.topk``, the benchmark's naive baseline.

Shapes: x (N, C, H, W); weight (K, C') with C' = g*C; target (N,) int64;
bs = min(block_size, H, W); seed grid (N, C, Hs, Ws), Hs = H-bs+1, Ws = W-bs+1.

The mask, step by step:

    a[n, c]    = sum_{j < g} weight[target[n], c*g + j]           (N, C) float32
    cam[n]     = sum_c a[n, c] * x[n, c]                          (N, H, W) float32
    spatial[n] = the spatial_topk largest cam[n] positions        (N, H, W) bool
    channel[n] = the channel_topk largest a[n] channels           (N, C) bool
    seed at (n, c, i, j) iff uniform(seed, flat index) < gamma
                         and spatial[n, i, j] and channel[n, c]
    then block expansion, count, scale and apply exactly as DropBlock.

The classifier rows are summed over groups of g (the paper's Eq. 7; a mean
ranks the same). The CAM is float32 whatever x's dtype: it only ranks
positions. "Largest" orders floats with NaN above everything and -0.0 equal to
+0.0 (as ``torch.topk``), and ties go to the lower flat index. A candidate
position is the top-left corner (i, j) of the block it may start.
"""
import torch

from robustdrop._checks import size_at_least
from robustdrop.reference import block_mask

__all__ = [
    "default_spatial_topk", "default_channel_topk", "class_channel_weights", "class_activation_map",
    "ordered_keys", "topk_candidates", "cam_candidates", "cam_keep_mask",
    "cam_mask_forward", "naive_cam_drop2d",
]


def default_spatial_topk(height: int, width: int, block_size: int) -> int:
    """max(1, round(H*W / bs**2)), as the authors' code (their text gives (1 - 1/bs**2) * H*W)."""
    if isinstance(height, torch.Tensor):  # torch.jit.trace's sizes are 0-d tensors
        height, width, block_size = int(height), int(width), int(block_size)
    return size_at_least(round(height * width / block_size**2), 1)


def default_channel_topk(channels: int) -> int:
    """max(1, C // 8)."""
    return size_at_least(channels // 8, 1)


def class_channel_weights(weight: torch.Tensor, target: torch.Tensor, channels: int) -> torch.Tensor:
    """a (N, C) float32: the rows weight[target] (N, C') summed over consecutive groups of C'/C."""
    rows = weight.to(torch.float32)[target]
    return rows.view(rows.shape[0], channels, weight.shape[1] // channels).sum(-1)


def class_activation_map(x: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """cam (N, H, W) float32 = sum_c a[n, c] * x[n, c] for x (N, C, H, W) and a (N, C)."""
    return torch.einsum("nc,nchw->nhw", class_weights, x.to(torch.float32))


def ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of float32 values: NaN above +inf, -0.0 equal to +0.0.

    The float's bits, with the magnitude bits of negatives flipped so that
    integer order is float order.
    """
    values = values.to(torch.float32) + 0.0  # -0.0 + 0.0 is +0.0
    bits = values.view(torch.int32).to(torch.int64)
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return torch.where(torch.isnan(values), torch.full_like(keys, 1 << 31), keys)


def topk_candidates(values: torch.Tensor, k: int) -> torch.Tensor:
    """bool (N, L): the k largest of each row of values (N, L), ties to the lower index.

    torch.topk over unique int64 keys (ordered value, then reversed index), its
    indices scattered into a mask.
    """
    rows, length = values.shape
    candidates = torch.zeros((rows, length), dtype=torch.bool, device=values.device)
    if k == 0 or rows == 0:
        return candidates
    reversed_index = torch.arange(length - 1, -1, -1, dtype=torch.int64, device=values.device)
    unique_keys = ordered_keys(values) * length + reversed_index
    return candidates.scatter_(1, torch.topk(unique_keys, k, dim=1).indices, True)


def cam_candidates(x, weight, target, spatial_topk: int, channel_topk: int):
    """(spatial (N, H, W) bool, channel (N, C) bool) for x (N, C, H, W)."""
    n, c, h, w = x.shape
    class_weights = class_channel_weights(weight, target.to(x.device), c)
    cam = class_activation_map(x, class_weights)
    spatial = topk_candidates(cam.reshape(n, h * w), spatial_topk).view(n, h, w)
    return spatial, topk_candidates(class_weights, channel_topk)


def cam_keep_mask(x_shape: tuple, seed: int, gamma, block_size: int, spatial, channel) -> torch.Tensor:
    """The keep mask (N, C, H, W) bool: DropBlock's seeds kept only at candidates, then expanded;
    gamma a float or (N,) float32 per-sample seed probabilities."""
    n, c, h, w = x_shape
    seed_height, seed_width = h - block_size + 1, w - block_size + 1
    seeds = block_mask.philox_seed_grid((n, c, seed_height, seed_width), seed, gamma, spatial.device)
    allowed = spatial[:, None, :seed_height, :seed_width] & channel[:, :, None, None]
    return ~block_mask.expand_seeds(seeds & allowed, block_size)


def cam_mask_forward(x, weight, target, guided, seed, gamma, block_size, spatial_topk, channel_topk, normalize, eps,
                     sample_gamma=None):
    """The reference of robustdrop::cam_mask_forward: returns (y, packed mask, scale).

    x (N, C, H, W); weight (K, g*C); target (N,) int64; guided None or a 0-d
    bool tensor: when it holds False every position and channel is a
    candidate (DropBlock). block_size is already min(block_size, H, W).
    sample_gamma None or float32 (N,), each sample's seed probability in place of gamma.
    y (N, C, H, W); mask (N, C, H, ceil(W/8)) uint8; scale float32 0-d.
    """
    n, c, h, w = x.shape
    spatial, channel = cam_candidates(x.detach(), weight.detach(), target, spatial_topk, channel_topk)
    if guided is not None:
        unguided = ~guided.to(device=x.device, dtype=torch.bool)
        spatial, channel = spatial | unguided, channel | unguided
    probability = gamma if sample_gamma is None else sample_gamma
    keep = cam_keep_mask((n, c, h, w), seed, probability, block_size, spatial, channel)
    if x.numel() == 0:
        keep = torch.zeros_like(keep)
    y, scale = block_mask.drop_with_keep_mask(x, keep, False, normalize, eps)
    return y, block_mask.pack_keep_mask(keep), scale


def naive_cam_drop2d(x, weight, target, p, block_size, *, spatial_topk=None, channel_topk=None, eps=1e-6):
    """The benchmark's naive baseline: einsum, torch.topk, scatter, torch.rand, max-pool, as a user would write it."""
    n, c, h, w = x.shape
    bs = block_mask.effective_block_size(block_size, h, w)
    spatial_topk = default_spatial_topk(h, w, bs) if spatial_topk is None else spatial_topk
    channel_topk = default_channel_topk(c) if channel_topk is None else channel_topk
    with torch.no_grad():
        class_weights = weight[target].view(n, c, weight.shape[1] // c).sum(-1)
        # In x's dtype, as a user writes it under autocast (einsum refuses mixed dtypes).
        cam = torch.einsum("nc,nchw->nhw", class_weights.to(x.dtype), x).reshape(n, h * w)
        spatial = torch.zeros_like(cam, dtype=torch.bool)
        spatial.scatter_(1, cam.topk(spatial_topk, dim=1).indices, True)
        channel = torch.zeros_like(class_weights, dtype=torch.bool)
        channel.scatter_(1, class_weights.topk(channel_topk, dim=1).indices, True)
        gamma = block_mask.drop_rate_to_gamma(p, h, w, bs)
        grid = (n, c, h - bs + 1, w - bs + 1)
        allowed = spatial.view(n, 1, h, w)[..., :grid[2], :grid[3]] & channel[:, :, None, None]
        dropped = block_mask.expand_seeds(block_mask.torch_seed_grid(grid, gamma, x.device) & allowed, bs)
    return block_mask.drop_with_keep_mask(x, ~dropped, False, True, eps)[0]
