"""Feature-density dropout (FDD, DESIGN.md 4.3): the functional API, its
autograd and fake implementations, and the dispatch to the four backends.

Three compiled ops (CPU and CUDA kernels, with ``_triton`` twins):

* ``robustdrop::feature_density(x, dims, grids) -> (cell, counts)``, the
  per-sample PCA binning on its own;
* ``robustdrop::feature_density_forward(x, dims, grids, seed, kappa, alpha,
  rescale) -> (y, mask, scale)``: the bit-packed channel keep mask (N,
  ceil(C/8)) uint8 and the scale (0-d, or (N, C) with rescale) are all the
  backward keeps;
* ``robustdrop::channel_mask_backward(grad_y, mask, scale)``: keep ? dy * scale : 0.

No gradient flows through the PCA: which channels are dropped is a function
of x, but the op is differentiated as the mask times x.
"""
import torch

from robustdrop import _backend, _checks, _seed
from robustdrop.ops import block_mask as _block_mask
from robustdrop.reference import feature_density as reference

__all__ = ["feature_density", "feature_density_dropout"]


def feature_density(x: torch.Tensor, dims: int, grids: int | None = None, *,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Each channel's cell on a per-sample PCA grid, and how many channels share each cell.

    Per sample the C channels (points in R^(H*W)) are centred, projected on
    their top ``dims`` principal axes (each oriented so that its
    largest-magnitude component is positive), and binned on ``grids`` equal
    intervals per axis between the coordinates' min and max:
    ``cell = sum_r b_r * grids**r``. For x (N, F) (dims 1) each value is its
    own coordinate. Degenerate samples (all channels equal, a NaN or Inf)
    put every channel in cell 0.

    Args:
        x: (N, C, H, W) feature maps or (N, F) features, floating point.
        dims: 1, 2 or 3 principal axes (1 for (N, F) features).
        grids: intervals per axis, >= 1; default 25, 5 or 3 for dims 1, 2 or 3.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        cell (N, C) int64 in [0, grids**dims) and counts (N, grids**dims) int64,
        each row of counts summing to C. Backends agree except for channels
        within 1e-4 (relative to the axis range) of a bin edge, where float
        rounding may pick the neighbouring cell.
    """
    dims = _checks.check_density_input(x, dims)
    grids = _checks.check_grids(reference.default_grids(dims) if grids is None else grids, dims)
    name = _backend.resolve_backend(backend, x)
    return _DENSITY[name](x.detach(), dims, grids)


def feature_density_dropout(x: torch.Tensor, dims: int = 2, grids: int | None = None, kappa: float = -0.8,
                            alpha: float = 0.9, *, rescale: bool = False, training: bool = True,
                            seed: int | None = None, backend: str = "auto") -> torch.Tensor:
    """FDD: drop whole channels with a probability set by the density of their PCA cell.

    With ``cell, counts = feature_density(x, dims, grids)``, channel c of
    sample n is dropped with probability
    ``p = clamp(kappa * counts[cell] / max(counts) + alpha, 0, 1)`` (the
    paper's Eq. 1; kappa < 0: dense groups are dropped less), drawn as
    ``uniform(seed, n*C + c) < float32(p)`` from the shared RNG. Kept channels
    are left as they are (the paper) or, with ``rescale``, divided by 1 - p.

    p is read as a drop probability, as the paper's text and its Eq. 1 say
    (its Eq. 2, m ~ Bernoulli(p), would make it a keep probability); pass
    ``kappa=0.8, alpha=0.1`` for the paper's positive-correlation variant.

    Args:
        x: (N, C, H, W) feature maps (dims 1, 2 or 3) or (N, F) FC features (dims 1).
        dims: principal axes of the density grid.
        grids: intervals per axis; default 25, 5 or 3 for dims 1, 2 or 3.
        kappa, alpha: the slope and offset of Eq. 1, finite.
        rescale: divide kept channels by 1 - p.
        training: when False, returns x unchanged.
        seed: 64-bit seed of the shared RNG; None draws one from torch's
            default CPU generator.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        y with x's shape, dtype and memory format. The backward is the
        upstream gradient times the channel mask (and scale); N*C bits are
        saved, plus an (N, C) float32 scale with rescale.
    """
    dims = _checks.check_density_input(x, dims)
    grids = _checks.check_grids(reference.default_grids(dims) if grids is None else grids, dims)
    kappa = _checks.check_finite(kappa, "kappa")
    alpha = _checks.check_finite(alpha, "alpha")
    rescale = _checks.check_bool(rescale, "rescale")
    training = _checks.check_bool(training, "training")
    _checks.check_seed(seed)
    name = _backend.resolve_backend(backend, x)
    if not training:
        return x
    return _FORWARD[name](x, dims, grids, _seed.op_seed(seed, x.device), kappa, alpha, rescale)[0]


_DENSITY = _backend.forward_table("feature_density", reference.feature_density)
_FORWARD = _backend.forward_table("feature_density_forward", reference.feature_density_forward,
                                  adjoint="channel_mask_backward")


def _fake_density(x, dims, grids):
    n, c = x.shape[:2]
    return x.new_empty((n, c), dtype=torch.int64), x.new_empty((n, grids**dims), dtype=torch.int64)


def _fake_forward(x, dims, grids, seed, kappa, alpha, rescale):
    n, c = x.shape[:2]
    y = torch.empty_like(x, memory_format=_block_mask.output_memory_format(x))
    mask = x.new_empty((n, (c + 7) // 8), dtype=torch.uint8)
    scale = x.new_empty((n, c) if rescale else (), dtype=torch.float32)
    return y, mask, scale


def register(density_name: str, forward_name: str, backward_name: str, *, autograd: bool) -> None:
    """Fake implementations and, with ``autograd`` (False for the compiled ops: csrc/autograd has
    theirs), autograd of one backend family's three FDD ops."""
    torch.library.register_fake(f"robustdrop::{density_name}", _fake_density)
    _block_mask.register_backward(backward_name, autograd=autograd)
    _block_mask.register_forward(forward_name, backward_name, _fake_forward, num_inputs=7, autograd=autograd)
