"""robustdrop.models: resnet18 and SmallCNN with each method's layer in place."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustdrop
from robustdrop import models
from robustdrop.nn import (CamDrop2d, DropBlock2d, FeatureDensityDropout1d, FeatureDensityDropout2d, RandomMask2d,
                           cam_targets)

LAYER_METHODS = ["dropout", "dropblock", "active_dropblock", "camdrop", "fdd"]
BUILDERS = {"resnet18": models.resnet18, "SmallCNN": models.SmallCNN}
# "fdd2d" builds what "fdd" builds and "ews" what "none" builds (tested below as such).
DISTINCT_METHODS = [method for method in models.METHODS if method not in ("fdd2d", "ews")]


def layer_type(method: str) -> type:
    if method == "active_dropblock":
        return pytest.importorskip("robustdrop.nn.active_drop_block").ActiveDropBlock2d
    layers = {"dropout": nn.Dropout, "dropblock": DropBlock2d, "camdrop": CamDrop2d, "fdd": FeatureDensityDropout2d}
    return layers[method]


def build(builder: str, method: str, **kwargs) -> nn.Module:
    if method == "active_dropblock":
        layer_type(method)  # skips until nn.ActiveDropBlock2d exists
    torch.manual_seed(0)
    return BUILDERS[builder](method=method, **kwargs)


def loss_of(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if model.method == "camdrop" and model.training:
        with cam_targets(model, labels):
            return F.cross_entropy(model(x), labels)
    return F.cross_entropy(model(x), labels)


@pytest.mark.parametrize("method", DISTINCT_METHODS)
@pytest.mark.parametrize("builder", BUILDERS)
def test_forward_and_backward_in_train_and_eval(builder, method):
    model = build(builder, method)
    assert model.method == method
    x = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([1, 7])
    loss = loss_of(model.train(), x, labels)
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    model.zero_grad()
    model.eval()
    logits = model(x)
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, labels).backward()
    assert all(parameter.grad is not None for parameter in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), logits.detach())  # eval is deterministic


@pytest.mark.parametrize("method", LAYER_METHODS)
@pytest.mark.parametrize("builder", BUILDERS)
def test_the_layer_sits_after_the_requested_stage_only(builder, method):
    kind = layer_type(method)
    for stage in (1, 2, 3, 4):
        model = build(builder, method, stage=stage)
        stage_module = getattr(model, f"layer{stage}")
        assert isinstance(model.drop, kind) and stage_module[-1] is model.drop
        assert [module for module in model.modules() if isinstance(module, kind)] == [model.drop]
        assert not any(isinstance(module, RandomMask2d) for module in model.modules())


@pytest.mark.parametrize("builder", BUILDERS)
def test_default_stages(builder):
    model = build(builder, "dropblock")
    stage = 3 if builder == "resnet18" else 2
    assert getattr(model, f"layer{stage}")[-1] is model.drop


def test_the_layer_comes_after_the_last_block_of_the_stage():
    model = build("resnet18", "fdd", stage=2)
    assert [type(module).__name__ for module in model.layer2] == ["BasicBlock", "BasicBlock",
                                                                  "FeatureDensityDropout2d"]
    seen = []
    for module in (model.layer2[1], model.drop, model.layer3[0]):
        module.register_forward_hook(lambda module, inputs, output: seen.append(type(module).__name__))
    model(torch.randn(2, 3, 16, 16))
    assert seen == ["BasicBlock", "FeatureDensityDropout2d", "BasicBlock"]


def test_defaults_and_options_reach_the_layer():
    assert (build("resnet18", "dropblock").drop.p, build("resnet18", "dropblock").drop.block_size) == (0.2, 4)
    layer = build("SmallCNN", "dropblock", p=0.3, block_size=3, couple_channels=True).drop
    assert (layer.p, layer.block_size, layer.couple_channels) == (0.3, 3, True)
    camdrop = build("resnet18", "camdrop", warmup_steps=5)
    assert camdrop.drop.classifier is camdrop.fc and (camdrop.drop.p, camdrop.drop.warmup_steps) == (0.1, 5)
    assert build("SmallCNN", "fdd", dims=3).drop.dims == 3
    active = build("SmallCNN", "active_dropblock", policies=(0.1, 0.2)).drop
    assert (active.block_size, active.policies) == (4, (0.1, 0.2))
    assert build("SmallCNN", "fdd").drop.dims == 2


def test_camdrop_classifier_is_registered_once():
    model = build("resnet18", "camdrop")
    assert sum(1 for name in model.state_dict() if name.endswith("fc.weight")) == 1


@pytest.mark.parametrize("builder, shallow", [
    ("resnet18", ["conv1"] + [f"layer{s}.{b}.conv{c}" for s in (1, 2) for b in (0, 1) for c in (1, 2)]),
    ("SmallCNN", ["layer1.conv", "layer2.conv"]),
])
def test_random_mask_masks_the_shallow_convolutions(builder, shallow):
    model = build(builder, "random_mask")
    assert model.drop is None
    masks = {name[:-2]: module for name, module in model.named_modules() if isinstance(module, RandomMask2d)}
    assert sorted(masks) == sorted(shallow)
    assert all(mask.ratio == 0.5 and mask.mode == "random" and mask.per_channel for mask in masks.values())
    options = build(builder, "random_mask", ratio=0.3, mode="same", seed=5, stage=4)
    layers = [module for module in options.modules() if isinstance(module, RandomMask2d)]
    assert [layer.seed for layer in layers] == list(range(5, 5 + len(shallow)))
    assert all(layer.ratio == 0.3 and layer.mode == "same" for layer in layers)


def test_small_inputs_work():
    for builder in BUILDERS:
        model = build(builder, "dropblock", stage=4)
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    model = models.SmallCNN(num_classes=5, in_channels=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)


def test_resnet18_structure_is_torchvision_s():
    model = models.resnet18(num_classes=100)
    names = [name for name, _ in model.named_children()]
    assert names == ["conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.out_channels == 64
    assert [len(getattr(model, f"layer{k}")) for k in (1, 2, 3, 4)] == [2, 2, 2, 2]
    assert [getattr(model, f"layer{k}")[0].conv1.stride for k in (1, 2, 3, 4)] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert model.layer1[0].downsample is None and model.layer2[0].downsample is not None
    assert model.fc.out_features == 100 and model.fc.in_features == 512
    assert sum(parameter.numel() for parameter in model.parameters()) == 11_220_132


def test_unknown_method_and_bad_stage_are_value_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        models.resnet18(method="dropconnect")
    with pytest.raises(ValueError, match="method"):
        models.SmallCNN(method="DropBlock")
    for stage in (0, 5, -1):
        with pytest.raises(ValueError, match="stage"):
            models.resnet18(method="dropblock", stage=stage)
        with pytest.raises(ValueError, match="stage"):
            models.SmallCNN(stage=stage)
    with pytest.raises(TypeError, match="stage"):
        models.SmallCNN(method="dropblock", stage=2.0)
    with pytest.raises(TypeError, match="no options"):
        models.SmallCNN(p=0.1)


def test_models_are_importable_from_the_package():
    assert robustdrop.models is models
    assert callable(robustdrop.apply_random_mask)


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_active_dropblock_model_takes_the_training_step(mode):
    training = pytest.importorskip("robustdrop.training")
    model = build("SmallCNN", "active_dropblock", policies=(0.0, 0.1, 0.2))
    step = training.active_dropblock_step(model, F.cross_entropy, torch.randn(2, 3, 32, 32), torch.tensor([1, 7]),
                                          mode=mode)
    assert step.policy in (0.0, 0.1, 0.2) and len(step.losses) == 3
    step.loss.backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


@pytest.mark.parametrize("builder", BUILDERS)
def test_dropout_is_standard_elementwise_dropout(builder):
    model = build(builder, "dropout", p=0.3)
    assert type(model.drop) is nn.Dropout and model.drop.p == 0.3
    assert build(builder, "dropout").drop.p == 0.2
    x = torch.ones(4, 8, 6, 6)
    torch.manual_seed(1)
    y = model.drop.train()(x)
    # single elements dropped (not whole maps or blocks), kept ones rescaled by 1 / (1 - p)
    assert torch.equal(y.unique(), torch.tensor([0.0, 1 / 0.7]))
    assert 0 < (y == 0).sum() < y.numel() and ((y == 0).sum((2, 3)) < 36).all()
    assert torch.equal(model.drop.eval()(x), x)


@pytest.mark.parametrize("builder, features", [("resnet18", 512), ("SmallCNN", 256)])
def test_fdd1d_drops_the_pooled_features_before_fc(builder, features):
    model = build(builder, "fdd1d", grids=10, stage=1)  # stage is not used by fdd1d
    assert isinstance(model.drop, FeatureDensityDropout1d) and model.drop is model.head_drop
    assert model.drop.grids == 10
    assert not any(isinstance(module, FeatureDensityDropout2d) for module in model.modules())
    seen = {}
    model.drop.register_forward_hook(lambda module, inputs, output: seen.update(drop_in=inputs[0], drop_out=output))
    model.fc.register_forward_hook(lambda module, inputs, output: seen.update(fc_in=inputs[0]))
    x = torch.randn(3, 3, 16, 16)
    model.train()(x)
    assert seen["drop_in"].shape == (3, features) and seen["fc_in"] is seen["drop_out"]
    assert (seen["drop_out"] == 0).sum() > (seen["drop_in"] == 0).sum()  # FDD dropped some features
    model.eval()
    plain = build(builder, "none")
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), plain.eval()(x))  # the identity in eval mode


def test_fdd2d_is_fdd():
    fdd, fdd2d = build("SmallCNN", "fdd"), build("SmallCNN", "fdd2d")
    assert (fdd.method, fdd2d.method) == ("fdd", "fdd2d")
    assert type(fdd2d.drop) is FeatureDensityDropout2d and fdd2d.drop.extra_repr() == fdd.drop.extra_repr()
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(2)
    expected = fdd.train()(x)
    torch.manual_seed(2)
    assert torch.equal(fdd2d.train()(x), expected)


@pytest.mark.parametrize("builder", BUILDERS)
def test_ews_model_is_the_plain_model(builder):
    ews, plain = build(builder, "ews"), build(builder, "none")
    assert ews.method == "ews" and ews.drop is None
    assert [type(module) for module in ews.modules()] == [type(module) for module in plain.modules()]
    for (name, value), (other, expected) in zip(ews.state_dict().items(), plain.state_dict().items()):
        assert name == other and torch.equal(value, expected)
    with pytest.raises(TypeError, match="method='ews' takes no options"):
        models.SmallCNN(method="ews", p=0.1)


def test_ews_model_trains_with_the_ews_trainer():
    from robustdrop.ews import EWSTrainer

    model = build("SmallCNN", "ews")
    before = [parameter.detach().clone() for parameter in model.parameters()]
    trainer = EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), interval=1, candidates=2)
    stats = trainer.step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    assert {"loss", "ce", "kl", "subnet_accuracy"} <= set(stats) and math.isfinite(stats["loss"])
    assert any(not torch.equal(parameter, old) for parameter, old in zip(model.parameters(), before))
