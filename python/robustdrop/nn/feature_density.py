"""Feature-density dropout (FDD) as nn.Modules: FDD-1D on (N, F) features and
FDD-1D/2D/3D on (N, C, H, W) feature maps."""
import torch
from torch import nn

from robustdrop import _checks
from robustdrop._backend import check_backend_name
from robustdrop.nn._fx import fx_leaf_call
from robustdrop.nn._script import NotScriptable
from robustdrop.ops.feature_density import feature_density_dropout
from robustdrop.reference.feature_density import default_grids


class _FeatureDensityDropout(NotScriptable, nn.Module):
    def __init__(self, dims: int, grids: int | None, kappa: float, alpha: float, rescale: bool, backend: str,
                 ndim: int) -> None:
        super().__init__()
        self.dims = _checks.check_dims(dims)
        self.grids = _checks.check_grids(default_grids(self.dims) if grids is None else grids, self.dims)
        self.kappa = _checks.check_finite(kappa, "kappa")
        self.alpha = _checks.check_finite(alpha, "alpha")
        self.rescale = _checks.check_bool(rescale, "rescale")
        self.backend = check_backend_name(backend)
        self._ndim = ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (leaf := fx_leaf_call(self, x)) is not None:
            return leaf
        if isinstance(x, torch.Tensor) and x.dim() != self._ndim:
            shape = "(N, F)" if self._ndim == 2 else "(N, C, H, W)"
            raise ValueError(f"{type(self).__name__} takes {self._ndim}-D {shape} input x, got shape {tuple(x.shape)}")
        return feature_density_dropout(x, self.dims, self.grids, self.kappa, self.alpha, rescale=self.rescale,
                                       training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, grids={self.grids}, kappa={self.kappa}, alpha={self.alpha}, "
                f"rescale={self.rescale}, backend={self.backend!r}")


class FeatureDensityDropout1d(_FeatureDensityDropout):
    """FDD-1D on (N, F) fully-connected features (see ``robustdrop.feature_density_dropout``).

    Each feature value is its own coordinate: per sample the F values are
    binned on ``grids`` equal intervals and feature f is dropped with
    probability ``clamp(kappa * count / max(count) + alpha, 0, 1)`` of its
    bin. p is a drop probability (the paper's text; its Eq. 2 would read it as
    a keep probability). The identity in eval mode; each training forward
    draws a new seed from torch's default CPU generator.
    """

    def __init__(self, grids: int = 25, kappa: float = -0.8, alpha: float = 0.9, *, rescale: bool = False,
                 backend: str = "auto") -> None:
        super().__init__(1, grids, kappa, alpha, rescale, backend, ndim=2)

    def extra_repr(self) -> str:
        return (f"grids={self.grids}, kappa={self.kappa}, alpha={self.alpha}, rescale={self.rescale}, "
                f"backend={self.backend!r}")


class FeatureDensityDropout2d(_FeatureDensityDropout):
    """FDD-1D/2D/3D on (N, C, H, W) feature maps (see ``robustdrop.feature_density_dropout``).

    Per sample the C maps are projected on their top ``dims`` principal axes
    and binned on ``grids`` intervals per axis (default 25, 5 or 3: 25, 25 or
    27 cells, as the paper); whole maps are dropped with the probability of
    their cell, ``clamp(kappa * count / max(count) + alpha, 0, 1)``: with the
    default kappa = -0.8, alpha = 0.9, maps in dense cells are dropped less.
    p is a drop probability (the paper's text; its Eq. 2 would read it as a
    keep probability). The identity in eval mode; each training forward draws
    a new seed from torch's default CPU generator.
    """

    def __init__(self, dims: int = 2, grids: int | None = None, kappa: float = -0.8, alpha: float = 0.9, *,
                 rescale: bool = False, backend: str = "auto") -> None:
        super().__init__(dims, grids, kappa, alpha, rescale, backend, ndim=4)
