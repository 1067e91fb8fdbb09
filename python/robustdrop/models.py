"""Small image classifiers with one of robustdrop's methods built in, for the
papers' CIFAR-10 experiments, the examples and the tests.

``resnet18`` is the CIFAR-style ResNet-18 (a 3x3 stride-1 stem, no max-pool)
with torchvision's module names; ``SmallCNN`` is a four-stage conv-bn-relu
network that trains in minutes on a CPU. Both take (N, 3, 32, 32) by default
(any H, W >= 8) and give (N, num_classes) logits. ``method`` picks the layer:

=================== ==================================================================
method              layer (placed right after stage ``stage``, i.e. appended to layer{k})
=================== ==================================================================
"none"              nothing
"dropout"           ``torch.nn.Dropout(p=0.2, **options)``: standard element-wise
                    dropout on the feature maps (DropBlock's baseline; scaled by
                    1 / (1 - p) in training, the identity in eval)
"dropblock"         ``nn.DropBlock2d(p=0.2, block_size=4, **options)``
"active_dropblock"  ``nn.ActiveDropBlock2d(block_size=4, **options)``
"camdrop"           ``nn.CamDrop2d(p=0.1, block_size=4, classifier=model.fc, **options)``
"fdd2d" (or "fdd")  ``nn.FeatureDensityDropout2d(dims=2, **options)``
"fdd1d"             ``nn.FeatureDensityDropout1d(**options)`` on the pooled (N, F)
                    features, between the global average pool and fc (``head_drop``;
                    ``stage`` is not used)
"random_mask"       ``apply_random_mask(model, ratio=0.5, layers="shallow", **options)``
                    (the paper's Shallow blocks; ``stage`` is not used)
"ews"               nothing: the model is plain; train it with
                    ``robustdrop.ews.EWSTrainer``, which gates its layers itself
=================== ==================================================================

A CamDrop model needs the batch's targets in training::

    model = robustdrop.models.resnet18(method="camdrop")
    with robustdrop.nn.cam_targets(model, labels):
        loss = F.cross_entropy(model(images), labels)
"""
from collections import OrderedDict

import torch
from torch import nn

from robustdrop import _checks

__all__ = ["METHODS", "BasicBlock", "ResNet", "SmallCNN", "resnet18"]

METHODS = ("none", "dropout", "dropblock", "active_dropblock", "camdrop", "fdd", "fdd1d", "fdd2d", "random_mask",
           "ews")


def _check_method(method, stage) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not _checks.is_integral(stage):
        raise TypeError(f"stage must be an int in 1..4, got {type(stage).__name__}")
    if not 1 <= stage <= 4:
        raise ValueError(f"stage must be in 1..4 (the layer goes after stage k), got {stage}")


def _drop_layer(method: str, classifier: nn.Module, options: dict) -> nn.Module | None:
    """The layer ``method`` puts after a stage (None for the methods that put none there)."""
    from robustdrop import nn as rdnn

    if method == "dropout":
        return nn.Dropout(**{"p": 0.2, **options})
    if method == "dropblock":
        return rdnn.DropBlock2d(**{"p": 0.2, "block_size": 4, **options})
    if method == "active_dropblock":
        from robustdrop.nn.active_drop_block import ActiveDropBlock2d

        return ActiveDropBlock2d(**{"block_size": 4, **options})
    if method == "camdrop":
        return rdnn.CamDrop2d(**{"p": 0.1, "block_size": 4, "classifier": classifier, **options})
    if method in ("fdd", "fdd2d"):
        return rdnn.FeatureDensityDropout2d(**{"dims": 2, **options})
    if options and method in ("none", "ews"):
        raise TypeError(f"method={method!r} takes no options, got {sorted(options)}")
    return None


class _MethodModel(nn.Module):
    """Puts the method's layer in place once the network is built (see the module docstring)."""

    method: str

    def _add_method(self, method: str, stage: int, options: dict) -> None:
        self.method = method
        self._drop_name = None
        if method == "random_mask":
            from robustdrop.nn.random_mask import apply_random_mask

            apply_random_mask(self, **{"ratio": 0.5, **options})
            return
        if method == "fdd1d":
            from robustdrop import nn as rdnn

            self.head_drop = rdnn.FeatureDensityDropout1d(**options)
            self._drop_name = "head_drop"
            return
        layer = _drop_layer(method, self.fc, options)
        if layer is not None:
            stage_module = getattr(self, f"layer{stage}")
            stage_module.append(layer)
            self._drop_name = f"layer{stage}.{len(stage_module) - 1}"

    @property
    def drop(self) -> nn.Module | None:
        """The method's layer (None for "none", "random_mask" and "ews")."""
        return None if self._drop_name is None else self.get_submodule(self._drop_name)

    def _classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) from the last stage's maps (N, C, H, W): pool, [FDD-1D on (N, C)], fc."""
        features = torch.flatten(self.avgpool(x), 1)
        if "head_drop" in self._modules:
            features = self.head_drop(features)
        return self.fc(features)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


class BasicBlock(nn.Module):
    """ResNet's basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), torchvision's names."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(_MethodModel):
    """CIFAR-style ResNet: a 3x3 stride-1 stem conv of 64 channels, bn, relu (no max-pool),
    four stages of BasicBlocks (64, 128, 256, 512 channels, strides 1, 2, 2, 2), global
    average pool and fc. Module names as torchvision's: conv1, bn1, relu, layer1..layer4,
    avgpool, fc.

    Shapes: x (N, in_channels, H, W), H, W >= 8 (32 for CIFAR) -> logits (N, num_classes).
    Build it with ``resnet18``.
    """

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 10, *, in_channels: int = 3,
                 method: str = "none", stage: int = 3, **options) -> None:
        super().__init__()
        _check_method(method, stage)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        channels = 64
        for index, (count, width, stride) in enumerate(zip(blocks, (64, 128, 256, 512), (1, 2, 2, 2)), 1):
            layers = []
            for block in range(count):
                layers.append(BasicBlock(channels, width, stride if block == 0 else 1))
                channels = width
            setattr(self, f"layer{index}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()
        self._add_method(method, stage, options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self._classify(x)


def resnet18(num_classes: int = 10, *, method: str = "none", stage: int = 3, **options) -> ResNet:
    """The CIFAR-style ResNet-18 (``ResNet``, blocks [2, 2, 2, 2]) with ``method``'s layer after
    stage ``stage`` in 1..4 (appended to layer{stage}); ``options`` go to the layer (see the
    module docstring). ``method="random_mask"`` masks conv1 and the main-path convs of layer1
    and layer2, the paper's "Shallow" blocks."""
    return ResNet((2, 2, 2, 2), num_classes, method=method, stage=stage, **options)


class SmallCNN(_MethodModel):
    """A small four-stage CNN: stages of conv3x3-bn-relu with 32, 64, 128 and 256 channels,
    a 2x2 max-pool opening stages 2-4, global average pool and fc.

    Module names: layer{k} = Sequential(pool (k >= 2), conv, bn, relu), avgpool, fc
    (and head_drop, between them, for "fdd1d"); ``shallow_convolutions`` =
    ("layer1.conv", "layer2.conv") for Random Mask. ``method`` and ``stage`` as
    ``resnet18`` (default stage 2).

    Shapes: x (N, in_channels, H, W), H, W >= 8 (32 for CIFAR) -> logits (N, num_classes).
    """

    shallow_convolutions = ("layer1.conv", "layer2.conv")

    def __init__(self, num_classes: int = 10, *, in_channels: int = 3, method: str = "none", stage: int = 2,
                 **options) -> None:
        super().__init__()
        _check_method(method, stage)
        channels = in_channels
        for index, width in enumerate((32, 64, 128, 256), 1):
            parts = [("pool", nn.MaxPool2d(2))] if index > 1 else []
            parts += [("conv", nn.Conv2d(channels, width, 3, padding=1, bias=False)), ("bn", nn.BatchNorm2d(width)),
                      ("relu", nn.ReLU(inplace=True))]
            setattr(self, f"layer{index}", nn.Sequential(OrderedDict(parts)))
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()
        self._add_method(method, stage, options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self._classify(x)
