"""DropBlock as an nn.Module, a drop-in for torchvision.ops.DropBlock2d."""
import torch
from torch import nn

from robustdrop import _backend, _checks
from robustdrop.nn._fx import fx_leaf_call
from robustdrop.nn._rate import ScheduledRate
from robustdrop.nn._script import NotScriptable
from robustdrop.ops.block_mask import NORMALIZE_MODES, drop_block2d


class DropBlock2d(NotScriptable, ScheduledRate, nn.Module):
    """DropBlock over (N, C, H, W) feature maps (see ``robustdrop.drop_block2d``).

    The first four arguments are torchvision's ``DropBlock2d(p, block_size,
    inplace, eps)``, so it replaces that module without other changes. It is
    the identity in eval mode. ``inplace=True`` writes the result into the
    input tensor, as torchvision does; the output is computed out of place
    first, so it saves no memory.

    Each training forward draws a new seed from torch's default CPU generator.

    ``p`` may be reassigned between forwards, as DropBlock's linear schedule
    of the drop rate does. Under torch.compile a float ``p`` set at
    construction is a constant of the graph; once ``p`` has been reassigned,
    the compiled forward reads it from a CPU tensor changed in place, so a
    schedule costs at most two more graphs (p == 0 and p > 0), not one per
    value (Dynamo's default limit is eight; see ``ScheduledRate``). The masks
    are eager's, bit for bit: the same gamma in float64, and ``p == 0`` still
    returns x without drawing a seed. ``robustdrop.training.LinearRateSchedule``
    sets the rate of every such layer of a model.
    """

    def __init__(self, p: float, block_size: int, inplace: bool = False, eps: float = 1e-6, *,
                 couple_channels: bool = False, normalize: str = "batch", backend: str = "auto") -> None:
        super().__init__()
        self._init_rate(p)
        self.block_size = _checks.check_positive_int(block_size, "block_size")
        self.inplace = _checks.check_bool(inplace, "inplace")
        self.eps = _checks.check_non_negative(eps, "eps")
        self.couple_channels = _checks.check_bool(couple_channels, "couple_channels")
        self.normalize = _checks.check_choice(normalize, "normalize", NORMALIZE_MODES)
        self.backend = _backend.check_backend_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (leaf := fx_leaf_call(self, x)) is not None:
            return leaf
        y = drop_block2d(x, self._forward_rate(), self.block_size, training=self.training,
                         couple_channels=self.couple_channels, normalize=self.normalize, eps=self.eps,
                         backend=self.backend)
        if self.inplace and y is not x:
            return x.copy_(y)
        return y

    def extra_repr(self) -> str:
        return (f"p={self.p}, block_size={self.block_size}, inplace={self.inplace}, eps={self.eps}, "
                f"couple_channels={self.couple_channels}, normalize={self.normalize!r}, backend={self.backend!r}")
