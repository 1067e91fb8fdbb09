"""CamDrop (DESIGN.md 4.2): the functional API, its autograd and fake
implementations, and the dispatch to the four backends.

The compiled op ``robustdrop::cam_mask_forward`` (CPU and CUDA kernels) and
its Triton twin ``robustdrop::cam_mask_forward_triton`` return ``(y, mask,
scale)`` like DropBlock's forward, and share DropBlock's backward op: the
bit-packed keep mask (N, C, H, ceil(W/8)) uint8 and the float32 scale are all
that is saved. No gradient flows through the CAM (weight and target).
"""
import torch

from robustdrop import _backend, _checks, _seed
from robustdrop.ops import block_mask as _block_mask
from robustdrop.reference import block_mask as block_reference
from robustdrop.reference import cam_mask as reference

__all__ = ["cam_drop2d"]

def cam_drop2d(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, p: float, block_size: int, *,
               spatial_topk: int | None = None, channel_topk: int | None = None, normalize: str = "batch",
               eps: float = 1e-6, training: bool = True, seed: int | None = None,
               backend: str = "auto") -> torch.Tensor:
    """CamDrop: DropBlock whose blocks start only where the target class's CAM is largest.

    With a[n] = weight[target[n]] summed over groups of C'/C channels and
    cam[n] = sum_c a[n, c] * x[n, c], a DropBlock seed at (n, c, i, j) (drawn
    exactly as ``drop_block2d``'s, same gamma and indices) counts only when
    (i, j) is among the ``spatial_topk`` largest cam[n] positions and c among
    the ``channel_topk`` largest a[n] channels; ties go to the lower index.
    The seed drops rows i..i+bs-1 and columns j..j+bs-1, ``bs = min(block_size,
    H, W)``. With every position and channel a candidate this is
    ``drop_block2d``, bit for bit.

    Args:
        x: (N, C, H, W) floating-point feature map, any memory format.
        weight: (K, C') weight of the classifier after global average pooling,
            C' a multiple of C (a deeper layer's width). Not differentiated.
        target: (N,) int64 class index of each sample. Checking its values
            reads them: for a CUDA tensor in eager mode, one synchronisation
            the first time; the range is remembered while the tensor lives
            unchanged (``_checks.value_range``), so the layers and calls that
            share a batch's targets read them once.
        p: drop rate in [0, 1] that sets gamma as in ``drop_block2d``; as
            there, a tensor (N,) gives each sample its own rate and a 0-d
            tensor is one rate that torch.compile reads as a graph input (a
            schedule does not recompile). A tensor rate always runs the op.
        block_size: side of the dropped squares, >= 1.
        spatial_topk: candidate positions per sample, in [1, H*W]; default
            ``max(1, round(H*W / bs**2))``, as the authors' code.
        channel_topk: candidate channels per sample, in [1, C]; default
            ``max(1, C // 8)``.
        normalize: "batch" (scale kept values by numel / (eps + kept)) or "none".
        eps: added to the kept count in the scale.
        training: when False, returns x unchanged.
        seed: 64-bit seed of the shared RNG; None draws one from torch's
            default CPU generator.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        y (N, C, H, W) with x's dtype and memory format.
    """
    return cam_mask(x, weight, target, p, block_size, spatial_topk=spatial_topk, channel_topk=channel_topk,
                    normalize=normalize, eps=eps, training=training, seed=seed, backend=backend)


def cam_mask(x, weight, target, p, block_size, *, spatial_topk=None, channel_topk=None, normalize="batch",
             eps=1e-6, training=True, seed=None, backend="auto", guided: torch.Tensor | None = None):
    """``cam_drop2d`` with ``guided``: a 0-d bool tensor that, when False, makes
    every position and channel a candidate (DropBlock). ``nn.CamDrop2d`` uses it
    for its warm-up without a host-side branch on its step counter."""
    _checks.check_feature_map(x)
    n, c, height, width = x.shape
    if c == 0:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    _checks.check_classifier_weight(weight, c, x.device)
    _checks.check_target(target, n, x.device)
    p, block_size, eps = _block_mask.check_rate_args(p, x, block_size, normalize, eps, seed)
    training = _checks.check_bool(training, "training")
    name = _backend.resolve_backend(backend, x)
    bs = block_reference.effective_block_size(block_size, height, width)
    identity = not training or (isinstance(p, float) and p == 0.0)
    if bs == 0:  # an empty map has nothing to rank or drop
        return x if identity else x.clone()
    spatial_topk = reference.default_spatial_topk(height, width, bs) if spatial_topk is None else spatial_topk
    spatial_topk = _checks.check_topk(spatial_topk, "spatial_topk", height * width, "H*W")
    channel_topk = reference.default_channel_topk(c) if channel_topk is None else channel_topk
    channel_topk = _checks.check_topk(channel_topk, "channel_topk", c, "C")
    if identity:
        return x
    if not _checks.values_are_traced():
        _checks.check_target_values(target, weight.shape[0])
    gamma, sample_gamma = _block_mask.seed_probabilities(p, x, bs)
    args = (x, weight.detach(), target, guided, _seed.op_seed(seed, x.device), gamma, bs, spatial_topk, channel_topk,
            normalize == "batch", eps, sample_gamma)
    return _FORWARD[name](*args)[0]


_FORWARD = _backend.forward_table("cam_mask_forward", reference.cam_mask_forward, adjoint="block_mask_backward")


def _fake_forward(x, weight, target, guided, seed, gamma, block_size, spatial_topk, channel_topk, normalize, eps,
                  sample_gamma=None):
    return _block_mask.fake_outputs(x, x.shape[1])


def register(forward_name: str, backward_name: str, *, autograd: bool) -> None:
    """Fake implementation and, with ``autograd`` (False for the compiled op: csrc/autograd has
    it), autograd of a CamDrop forward op; its backward op is DropBlock's, registered by
    ``block_mask.register``."""
    _block_mask.register_forward(forward_name, backward_name, _fake_forward, num_inputs=12, autograd=autograd)
