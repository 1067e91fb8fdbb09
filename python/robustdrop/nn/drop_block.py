"""DropBlock as an nn.Module, a drop-in for torchvision.ops.DropBlock2d."""
import torch
from torch import nn

from robustdrop import _checks
from robustdrop.ops.block_mask import drop_block2d


class DropBlock2d(nn.Module):
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
    value (Dynamo's default limit is eight). The masks are eager's, bit for
    bit: the same gamma in float64, and ``p == 0`` still returns x without
    drawing a seed.
    """

    def __init__(self, p: float, block_size: int, inplace: bool = False, eps: float = 1e-6, *,
                 couple_channels: bool = False, normalize: str = "batch", backend: str = "auto") -> None:
        super().__init__()
        # p as a () float64 CPU tensor for a compiled forward, kept equal to p by p's setter (in place, so
        # the graph's input stays the same tensor). Not an inference tensor, which fill_ could not change
        # outside inference mode, when the layer is built inside it.
        with torch.inference_mode(False):
            self._rate = torch.zeros((), dtype=torch.float64)
        self._rate_traced = False
        self._rate_is_zero = False
        self.p = p
        self.block_size = block_size
        self.inplace = inplace
        self.eps = eps
        self.couple_channels = couple_channels
        self.normalize = normalize
        self.backend = backend

    @property
    def p(self):
        return self._p

    @p.setter
    def p(self, value) -> None:
        reassigned = "_p" in self.__dict__
        self._p = value
        # Only a valid float rate is traced: anything else takes the float path, whose checks name p.
        valid = _checks.is_real(value) and 0.0 <= float(value) <= 1.0
        self._rate_traced = reassigned and valid
        if valid:
            self._rate.fill_(float(value))
            self._rate_is_zero = float(value) == 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self._rate_traced:
            y = self._forward_traced(x)
        else:
            y = drop_block2d(x, self.p, self.block_size, training=self.training,
                             couple_channels=self.couple_channels, normalize=self.normalize, eps=self.eps,
                             backend=self.backend)
        if self.inplace and y is not x:
            return x.copy_(y)
        return y

    def _forward_traced(self, x: torch.Tensor) -> torch.Tensor:
        """A compiled forward after p was reassigned: the rate enters the graph as the 0-d tensor
        ``_rate``, where a float would be a constant that Dynamo recompiles for at every value.
        Dynamo guards only on the two bools, so p == 0 (the identity, as eager) and p > 0 are at
        most two graphs."""
        _checks.check_feature_map(x)
        if not self.training or self._rate_is_zero:
            return x
        return drop_block2d(x, self._rate, self.block_size, couple_channels=self.couple_channels,
                            normalize=self.normalize, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"p={self.p}, block_size={self.block_size}, inplace={self.inplace}, eps={self.eps}, "
                f"couple_channels={self.couple_channels}, normalize={self.normalize!r}, backend={self.backend!r}")
