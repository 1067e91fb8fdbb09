"""DropBlock (DESIGN.md 4.1), the naive way: the executable specification that
every backend is tested against, and, with torch's own RNG, the benchmark's
naive baseline.

Shapes: x (N, C, H, W); bs = min(block_size, H, W); seed grid (N, Cm, Hs, Ws)
with Cm = 1 when channels are coupled, else C, Hs = H - bs + 1, Ws = W - bs + 1.
A seed at (i, j) drops rows i..i+bs-1 and columns j..j+bs-1.
"""
import torch
import torch.nn.functional as F

from robustdrop.reference.philox import philox_uniform

__all__ = [
    "effective_block_size", "drop_rate_to_gamma", "philox_seed_grid", "torch_seed_grid", "expand_seeds",
    "block_keep_mask", "pack_keep_mask", "unpack_keep_mask", "normalize_scale", "sample_scale", "apply_keep_mask", "output_memory_format",
    "drop_with_keep_mask",
    "block_mask_forward", "block_mask_backward", "naive_drop_block2d",
]


def effective_block_size(block_size: int, height: int, width: int) -> int:
    """bs = min(block_size, H, W): a block never exceeds the map."""
    return min(block_size, height, width)


def drop_rate_to_gamma(p, height: int, width: int, block_size: int):
    """Seed probability gamma = p*H*W / (bs**2 * (H-bs+1) * (W-bs+1)) (as torchvision), in float64.

    p is a float (gamma a float) or a tensor of drop rates (gamma float64 of its shape).
    """
    if isinstance(p, torch.Tensor):
        p = p.to(torch.float64)
    return p * height * width / (block_size**2 * (height - block_size + 1) * (width - block_size + 1))


def philox_seed_grid(shape: tuple, seed: int, gamma, device) -> torch.Tensor:
    """Bool seeds of ``shape`` (N, Cm, Hs, Ws): uniform(seed, flat index) < float32(gamma).

    gamma is a float, or a float32 tensor (N,) of per-sample probabilities.
    """
    count = 1
    for size in shape:
        count *= size
    index = torch.arange(count, dtype=torch.int64, device=device)
    uniform = philox_uniform(index, seed).view(shape)
    if isinstance(gamma, torch.Tensor):
        return uniform < gamma.to(device=device, dtype=torch.float32).view(-1, 1, 1, 1)
    return uniform < torch.tensor(gamma, dtype=torch.float32, device=device)


def torch_seed_grid(shape: tuple, gamma, device) -> torch.Tensor:
    """Bool seeds of ``shape`` drawn with torch's own RNG: what a user writes without robustdrop.

    gamma is a float or a tensor (N,) of per-sample probabilities.
    """
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(device).view(-1, 1, 1, 1)
    return torch.rand(shape, device=device) < gamma


def expand_seeds(seeds: torch.Tensor, block_size: int) -> torch.Tensor:
    """Dropped positions (N, Cm, H, W) bool of seeds (N, Cm, Hs, Ws): a bs x bs max-pool over the padded grid."""
    pad = block_size - 1
    if seeds.numel() == 0:  # max_pool2d rejects empty channel dimensions
        n, c, hs, ws = seeds.shape
        return torch.zeros((n, c, hs + pad, ws + pad), dtype=torch.bool, device=seeds.device)
    padded = F.pad(seeds.to(torch.float32), (pad, pad, pad, pad))
    return F.max_pool2d(padded, kernel_size=block_size, stride=1) > 0


def block_keep_mask(x_shape: tuple, seed: int, gamma, block_size: int, couple_channels: bool, device="cpu") -> torch.Tensor:
    """The keep mask (N, Cm, H, W) bool for an input of shape x_shape = (N, C, H, W); gamma a float or (N,) float32."""
    n, c, h, w = x_shape
    grid = (n, 1 if couple_channels else c, h - block_size + 1, w - block_size + 1)
    return ~expand_seeds(philox_seed_grid(grid, seed, gamma, device), block_size)


def pack_keep_mask(keep: torch.Tensor) -> torch.Tensor:
    """Bit-pack keep (N, Cm, H, W) bool into (N, Cm, H, ceil(W/8)) uint8: bit w % 8 of byte w // 8."""
    width = keep.shape[-1]
    bits = keep.to(torch.uint8)
    if width % 8:
        bits = F.pad(bits, (0, (-width) % 8))
    # Distinct bits never carry, so a uint8 sum is their OR.
    return (bits.view(*keep.shape[:-1], (width + 7) // 8, 8) * _bit_values(keep.device)).sum(-1, dtype=torch.uint8)


def unpack_keep_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of pack_keep_mask: (N, Cm, H, ceil(W/8)) uint8 -> (N, Cm, H, W) bool."""
    bits = (mask.unsqueeze(-1) & _bit_values(mask.device)) != 0
    return bits.flatten(-2)[..., :width]


def _bit_values(device: torch.device) -> torch.Tensor:
    """(8,) uint8: 2**b for bit b of a byte, made on ``device`` (no host-to-device copy). Multiplies and
    ANDs rather than shifts, which the ONNX exporter does not translate for uint8 (Random Mask's packed
    mask is exported through this code)."""
    return (2 ** torch.arange(8, device=device)).to(torch.uint8)


def normalize_scale(numel: int, kept: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    """float32(numel / (eps + kept)) computed in float64 from the integer counts kept (int64, 0-d or (G,)),
    or ones; numel is the element count behind each entry of kept."""
    if not normalize:
        return torch.ones(kept.shape, dtype=torch.float32, device=kept.device)
    return (numel / (eps + kept.to(torch.float64))).to(torch.float32)


def sample_scale(scale: torch.Tensor, batch: int) -> torch.Tensor:
    """A scale that broadcasts over (N, C, H, W): a (G,) scale of G groups of N/G samples becomes
    (N, 1, 1, 1); one value, or a scale already of a broadcastable shape, is returned as it is."""
    if scale.dim() != 1 or scale.numel() == 1:
        return scale
    return scale.repeat_interleave(batch // scale.numel()).view(-1, 1, 1, 1)


def output_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout every backend writes its output in: channels_last when t is, else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def apply_keep_mask(x: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """keep ? x * scale : 0, in float32 (float64 for float64 x), cast back to x's dtype,
    in x's layout (``output_memory_format``).

    keep (N, Cm, H, W) broadcasts over channels; scale holds one value or one per
    group of N/G consecutive samples (G,); torch.where keeps NaN and Inf out of
    dropped positions, which a multiply by 0 would not.
    """
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    factor = sample_scale(scale, x.shape[0]).to(device=x.device, dtype=compute_dtype)
    # An infinite scale (eps = 0, nothing kept in the group) multiplies no kept value; left in, autograd's
    # gradient at the dropped positions would be 0 * inf = NaN where the contract gives 0.
    factor = torch.where(torch.isinf(factor), torch.zeros_like(factor), factor)
    scaled = x.to(compute_dtype) * factor
    layout = output_memory_format(x)
    # keep in x's layout too, so that autograd's gradient (torch.where's backward) keeps it as well.
    keep = keep.to(x.device)
    keep = keep.contiguous(memory_format=layout) if keep.dim() == 4 else keep
    y = torch.where(keep, scaled, torch.zeros((), dtype=compute_dtype, device=x.device)).to(x.dtype)
    return y.contiguous(memory_format=layout)


def drop_with_keep_mask(x, keep, couple_channels, normalize, eps, normalize_groups=1):
    """(y, scale) for x (N, C, H, W) and keep (N, Cm, H, W) bool: the counts, the scale and the apply.

    With G = normalize_groups > 1 the samples form G consecutive groups, each
    normalised by its own kept count, and the scale is (G,); else it is 0-d.
    """
    per_sample = keep.flatten(1).sum(1) * (x.shape[1] if couple_channels else 1)
    if normalize_groups == 1:
        kept, numel = per_sample.sum(), x.numel()
    else:
        kept = per_sample.view(normalize_groups, -1).sum(1) if x.shape[0] else per_sample.new_zeros(normalize_groups)
        numel = x.numel() // normalize_groups
    scale = normalize_scale(numel, kept, normalize, eps)
    return apply_keep_mask(x, keep, scale), scale


def block_mask_forward(x, seed, gamma, block_size, couple_channels, normalize, eps, sample_gamma=None,
                       normalize_groups=1):
    """The reference of robustdrop::block_mask_forward: returns (y, packed mask, scale).

    x (N, C, H, W); block_size already clamped to min(H, W); sample_gamma None or
    float32 (N,), each sample's seed probability in place of gamma; y (N, C, H, W);
    mask (N, Cm, H, ceil(W/8)) uint8; scale float32 on x's device, 0-d for
    normalize_groups == 1, else (normalize_groups,). y is differentiable with
    respect to x through plain torch ops.
    """
    probability = gamma if sample_gamma is None else sample_gamma
    keep = block_keep_mask(tuple(x.shape), seed, probability, block_size, couple_channels, x.device)
    if x.numel() == 0:  # an empty x keeps nothing, also in a coupled mask when only C is 0
        keep = torch.zeros_like(keep)
    y, scale = drop_with_keep_mask(x, keep, couple_channels, normalize, eps, normalize_groups)
    return y, pack_keep_mask(keep), scale


def block_mask_backward(grad_y: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference of robustdrop::block_mask_backward: keep ? grad_y * scale : 0."""
    return apply_keep_mask(grad_y, unpack_keep_mask(mask, grad_y.shape[-1]), scale)


def naive_drop_block2d(x, p, block_size, *, couple_channels=False, normalize=True, eps=1e-6, normalize_groups=1):
    """The benchmark's naive baseline: this module's algorithm with torch's own RNG, as a user would write it.

    p is a float or a tensor (N,) of per-sample drop rates.
    """
    n, c, h, w = x.shape
    bs = effective_block_size(block_size, h, w)
    gamma = drop_rate_to_gamma(p, h, w, bs)
    grid = (n, 1 if couple_channels else c, h - bs + 1, w - bs + 1)
    keep = ~expand_seeds(torch_seed_grid(grid, gamma, x.device), bs)
    return drop_with_keep_mask(x, keep, couple_channels, normalize, eps, normalize_groups)[0]
