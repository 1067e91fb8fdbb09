"""CamDrop as an nn.Module, and the way to hand it the batch's targets.

A CamDrop layer needs each sample's class to pick its CAM, but it sits deep
inside a model whose forward takes only the images. The targets therefore
travel beside the forward, set on every CamDrop2d of the model before it runs::

    model = torchvision.models.resnet50()
    model.layer3.append(robustdrop.nn.CamDrop2d(0.1, 5, model.fc))

    for images, labels in loader:
        with robustdrop.nn.cam_targets(model, labels):
            loss = criterion(model(images), labels)
        loss.backward()

The same works when ``model`` is wrapped by ``torch.compile``: the targets are
a tensor attribute the compiled graph reads at each call, so new targets of the
same shape do not recompile.

``cam_targets`` checks the targets against each layer's classifier before the
forward. Given the loader's labels on the CPU, it checks them there and copies
them to the model's GPU without the host waiting; given CUDA labels, it reads
them once (one synchronisation per batch), and the layers read nothing more.
"""
import contextlib

import torch
from torch import nn

from robustdrop import _checks
from robustdrop._backend import check_backend_name, host_to_device, in_checkpoint_recompute
from robustdrop._func import add_to_state
from robustdrop.nn._fx import fx_leaf_call
from robustdrop.nn._rate import ScheduledRate
from robustdrop.nn._recompute import ForwardRecords, forward_key
from robustdrop.nn._script import NotScriptable
from robustdrop.ops.cam_mask import cam_mask

__all__ = ["CamDrop2d", "cam_targets", "set_cam_targets"]


class CamDrop2d(NotScriptable, ScheduledRate, nn.Module):
    """CamDrop over (N, C, H, W) feature maps (see ``robustdrop.cam_drop2d``).

    Args:
        p: drop rate in [0, 1] (gamma as DropBlock's). It may be reassigned
            between forwards, as the linear schedule of the rate that the
            CamDrop authors take from DropBlock (``robustdrop.training.
            LinearRateSchedule``): as ``DropBlock2d``'s, a schedule under
            torch.compile costs at most two more graphs, not one per value.
        block_size: side of the dropped squares.
        classifier: the model's final ``nn.Linear`` (after global average
            pooling), of weight (K, C') with C' a multiple of this layer's C.
            Its weight is read at every forward, so the guidance follows
            training. It is referenced, not registered: the model's
            ``state_dict`` keeps one copy of it.
        spatial_topk, channel_topk: candidate positions and channels per sample
            (defaults as ``cam_drop2d``).
        warmup_steps: for this many training forwards the layer is DropBlock
            (the classifier means little early in training); CAM guidance
            starts at the next one. Counted in the buffer ``num_steps``, which
            the ``state_dict`` saves, so a resumed run continues the count.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    A training forward needs the batch's targets (N,) int64: pass ``target=``,
    or set them on every CamDrop2d of a model with ``cam_targets`` or
    ``set_cam_targets``. It is the identity in eval mode. Under activation
    checkpointing (``torch.utils.checkpoint``) the forward recomputed in the
    backward uses the targets and warm-up state of the forward it recomputes,
    and counts no step; several forwards may wait for one backward (a clean
    and an adversarial pass, the layer used twice), each recompute finding its
    own forward by the random state it starts from (``nn._recompute``).
    """

    def __init__(self, p: float, block_size: int, classifier: nn.Module, *, spatial_topk: int | None = None,
                 channel_topk: int | None = None, warmup_steps: int = 0, backend: str = "auto") -> None:
        super().__init__()
        weight = getattr(classifier, "weight", None)
        if not isinstance(classifier, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"classifier must be an nn.Module with a 2-D weight (K, C') such as nn.Linear, "
                            f"got {type(classifier).__name__}")
        self._init_rate(p)
        self.block_size = _checks.check_positive_int(block_size, "block_size")
        # A tuple keeps nn.Module from registering the classifier a second time.
        self._classifier = (classifier,)
        # At most H*W and C, which each forward checks against its x.
        self.spatial_topk = _optional_count(spatial_topk, "spatial_topk")
        self.channel_topk = _optional_count(channel_topk, "channel_topk")
        self.warmup_steps = _checks.check_non_negative_int(warmup_steps, "warmup_steps")
        self.backend = check_backend_name(backend)
        self.target: torch.Tensor | None = None
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))
        # (targets, guidance) of recent eager training forwards, for activation checkpointing's recompute.
        self._forwards = ForwardRecords()

    @property
    def classifier(self) -> nn.Module:
        return self._classifier[0]

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        if (leaf := fx_leaf_call(self, x, target)) is not None:
            return leaf
        if not self.training:
            return x
        if getattr(self, "_is_replica", False):
            # nn.DataParallel's replicas copy the tuple that holds the classifier, and the batch's targets, as
            # they are: each would read the weight on the first GPU and the whole batch's targets.
            raise RuntimeError("CamDrop2d does not support nn.DataParallel (its replicas would read the classifier "
                               "of the first GPU and the whole batch's targets): use "
                               "torch.nn.parallel.DistributedDataParallel, one process per GPU")
        key = forward_key(x)
        recorded = self._recorded_forward(key) if in_checkpoint_recompute() else None
        if recorded is not None:
            # Activation checkpointing recomputes this forward in the backward, where the targets may be
            # gone (the backward runs after `with cam_targets`) and the step counter has moved on: use the
            # original forward's, and count the step once.
            target, guided = recorded
        else:
            target, guided = self._targets_and_guidance(x, target)
            add_to_state(self.num_steps, 1)
            if key is not None:
                self._forwards.remember(key, (target, guided))
        return cam_mask(x, self.classifier.weight, target, self._forward_rate(), self.block_size,
                        spatial_topk=self.spatial_topk, channel_topk=self.channel_topk, training=True,
                        backend=self.backend, guided=guided)

    def _recorded_forward(self, key: int | None):
        """(targets, guidance) of the forward that a checkpoint recompute repeats: the one that started
        from the same random state with an input of the same shape; the latest forward's when none did (``preserve_rng_state=False``,
        whose recompute draws another mask anyway); None before any eager forward."""
        if key is None:
            return None
        recorded = self._forwards.recall(key)
        return self._forwards.latest() if recorded is None else recorded

    def _targets_and_guidance(self, x: torch.Tensor, target: torch.Tensor | None):
        """The forward's targets (N,) and its guidance: None, or with a warm-up a 0-d bool tensor on x's
        device, False while the step count is below warmup_steps (the forward is then DropBlock)."""
        target = self.target if target is None else target
        if target is None:
            raise ValueError(
                "CamDrop2d needs the batch's class targets in training: run the forward inside "
                "`with robustdrop.nn.cam_targets(model, target):`, call "
                "`robustdrop.nn.set_cam_targets(model, target)` before it, or pass `target=` to this module")
        if self.warmup_steps == 0:
            return target, None
        # A tensor, not a Python branch: torch.compile keeps one graph for every step.
        return target, (self.num_steps >= self.warmup_steps).to(x.device)

    def extra_repr(self) -> str:
        out_features, in_features = self.classifier.weight.shape
        return (f"p={self.p}, block_size={self.block_size}, classifier=({out_features}, {in_features}), "
                f"spatial_topk={self.spatial_topk}, channel_topk={self.channel_topk}, "
                f"warmup_steps={self.warmup_steps}, backend={self.backend!r}")


def _optional_count(value, name: str) -> int | None:
    """None (the op's default) or an int >= 1."""
    return None if value is None else _checks.check_positive_int(value, name)


def set_cam_targets(model: nn.Module, target: torch.Tensor | None) -> list[CamDrop2d]:
    """Sets ``target`` (N,) int64 (None to clear) on every CamDrop2d in ``model``.

    The targets are checked here, once for every layer: class indices in [0, K)
    of each layer's classifier, so a bad label is a ValueError before the
    forward, under torch.compile too (whose graph cannot read them). For a CUDA
    tensor that is one synchronisation per call; the layers' forwards then read
    nothing (``_checks.value_range`` remembers the tensor). A CPU tensor, such as
    a DataLoader's labels, is checked at no such cost and copied to the device
    of each layer's classifier without the host waiting for the GPU, so a
    training step needs no synchronisation at all.

    Returns the modules it set. A model without CamDrop2d is a ValueError, so a
    forgotten layer does not pass silently.
    """
    layers = _cam_layers(model)
    if target is not None:
        _checks.check_target(target, batch=None, device=None)
    copies = {}  # target on each device it was copied to
    # Every layer's targets checked before any is set: a refused target leaves the model as it was.
    targets = [None if target is None else _checked_layer_target(layer, target, copies) for layer in layers]
    for layer, layer_target in zip(layers, targets):
        layer.target = layer_target
    return layers


def _cam_layers(model: nn.Module) -> list[CamDrop2d]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [module for module in model.modules() if isinstance(module, CamDrop2d)]
    if not layers:
        raise ValueError(f"model has no CamDrop2d module to give targets to ({type(model).__name__})")
    return layers


def _checked_layer_target(layer: CamDrop2d, target: torch.Tensor, copies: dict) -> torch.Tensor:
    """``target`` for ``layer``: on its classifier's device when it is on the CPU (copied once per
    device), its values checked against the classifier's K unless they cannot be read."""
    weight = layer.classifier.weight
    if target.device.type == "cpu" and weight.device.type not in ("cpu", "meta"):
        if weight.device not in copies:
            copies[weight.device] = _copy_checked(target, weight.device)
        target = copies[weight.device]
    if not (target.is_meta or weight.is_meta or _checks.values_are_traced()):
        _checks.check_target_values(target, weight.shape[0])
    return target


def _copy_checked(target: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU ``target`` copied to ``device``, its range read on the CPU and remembered for the copy."""
    copy = host_to_device(target, device)
    if target.numel() and not _checks.values_are_traced():
        _checks.remember_value_range(copy, *_checks.value_range(target))
    return copy


@contextlib.contextmanager
def cam_targets(model: nn.Module, target: torch.Tensor):
    """Within the block, every CamDrop2d of ``model`` uses ``target`` (N,) int64;
    on exit each gets back the targets it had before (None, cleared, unless set
    beforehand), so no later batch runs with this batch's targets, and a nested
    block leaves the outer block's targets in place.

    Yields the CamDrop2d modules it set.
    """
    before = [layer.target for layer in _cam_layers(model)]
    layers = set_cam_targets(model, target)
    try:
        yield layers
    finally:
        for layer, previous in zip(layers, before):
            layer.target = previous
