"""robustdrop.convert: torchvision's and timm's DropBlock2d modules become robustdrop.nn.DropBlock2d.

Neither library is installed in CI: stand-ins with their class names, module
paths, constructors and attributes play their part. The last tests use the real
libraries where they are installed.
"""
import inspect

import pytest
import torch
from torch import nn

import robustdrop
from robustdrop.convert import ConversionReport
from robustdrop.nn import DropBlock2d


def named_like(cls, name: str, module_path: str):
    """Give a stand-in class the class name and module path convert() recognises."""
    cls.__name__ = cls.__qualname__ = name
    cls.__module__ = module_path
    return cls


class _StandIn(nn.Module):
    def forward(self, x):
        raise AssertionError("a stand-in for a library module: convert() must replace it before any forward")


class TorchvisionDropBlock(_StandIn):
    """torchvision.ops.DropBlock2d / DropBlock3d(p, block_size, inplace=False, eps=1e-06)."""

    def __init__(self, p, block_size, inplace=False, eps=1e-6):
        super().__init__()
        self.p, self.block_size, self.inplace, self.eps = p, block_size, inplace, eps


class TimmDropBlockBefore1023(_StandIn):
    """timm's DropBlock2d before 1.0.23: (drop_prob, block_size, gamma_scale, with_noise, inplace, batchwise, fast)."""

    def __init__(self, drop_prob=0.1, block_size=7, gamma_scale=1.0, with_noise=False, inplace=False, batchwise=False,
                 fast=True):
        super().__init__()
        self.drop_prob, self.block_size, self.gamma_scale = drop_prob, block_size, gamma_scale
        self.with_noise, self.inplace, self.batchwise, self.fast = with_noise, inplace, batchwise, fast


class TimmDropBlockSince1023(_StandIn):
    """timm's DropBlock2d since 1.0.23: (drop_prob, block_size, gamma_scale, with_noise, inplace, couple_channels,
    scale_by_keep)."""

    def __init__(self, drop_prob=0.1, block_size=7, gamma_scale=1.0, with_noise=False, inplace=False,
                 couple_channels=True, scale_by_keep=True):
        super().__init__()
        self.drop_prob, self.block_size, self.gamma_scale = drop_prob, block_size, gamma_scale
        self.with_noise, self.inplace = with_noise, inplace
        self.couple_channels, self.scale_by_keep = couple_channels, scale_by_keep


def stand_in(base, name="DropBlock2d", module_path="torchvision.ops.drop_block"):
    """A fresh subclass of ``base`` named like the library's class."""
    return named_like(type("StandIn", (base,), {}), name, module_path)


TorchvisionDropBlock2d = stand_in(TorchvisionDropBlock)
TorchvisionDropBlock3d = stand_in(TorchvisionDropBlock, "DropBlock3d")
TimmOld = stand_in(TimmDropBlockBefore1023, module_path="timm.layers.drop")
TimmOldModelsPath = stand_in(TimmDropBlockBefore1023, module_path="timm.models.layers.drop")
TimmNew = stand_in(TimmDropBlockSince1023, module_path="timm.layers.drop")
OtherDropBlock2d = stand_in(TorchvisionDropBlock, module_path="mylib.layers")


def options(module: DropBlock2d) -> dict:
    return {"p": module.p, "block_size": module.block_size, "inplace": module.inplace, "eps": module.eps,
            "couple_channels": module.couple_channels, "normalize": module.normalize, "backend": module.backend}


def expected_drop_rate(gamma: float, height: int, width: int, block_size: int) -> float:
    """E[fraction dropped] with whole blocks: position (r, c) is covered by n_r * n_c seed positions of the
    (H-bs+1, W-bs+1) grid, each a seed with probability gamma, independently."""
    def covering(size):
        r = torch.arange(size)
        return (torch.clamp(r, max=size - block_size) - torch.clamp(r - block_size + 1, min=0) + 1).double()

    counts = covering(height)[:, None] * covering(width)[None, :]
    return float((1 - (1 - gamma) ** counts).mean())


# replacement and hyper-parameters


def test_torchvision_modules_are_replaced_in_nested_models(capsys):
    inner = TorchvisionDropBlock2d(0.2, 5).eval()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), TorchvisionDropBlock2d(0.1, 3, inplace=True, eps=1e-5),
                          nn.Sequential(nn.ReLU(), inner))
    converted, report = robustdrop.convert(model, backend="reference")
    assert converted is model
    first, second = model[1], model[2][1]
    assert type(first) is DropBlock2d and type(second) is DropBlock2d
    assert options(first) == {"p": 0.1, "block_size": 3, "inplace": True, "eps": 1e-5, "couple_channels": False,
                              "normalize": "batch", "backend": "reference"}
    assert options(second) == {"p": 0.2, "block_size": 5, "inplace": False, "eps": 1e-6, "couple_channels": False,
                               "normalize": "batch", "backend": "reference"}
    assert first.training and not second.training  # the flags carried over
    assert [(item.name, item.old, item.new, item.note) for item in report.replaced] == [
        ("1", "torchvision.ops.drop_block.DropBlock2d", repr(first), ""),
        ("2.1", "torchvision.ops.drop_block.DropBlock2d", repr(second), "")]
    assert report.skipped == []
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"robustdrop.convert: replaced 1 (torchvision.ops.drop_block.DropBlock2d) with {first!r}",
                       f"robustdrop.convert: replaced 2.1 (torchvision.ops.drop_block.DropBlock2d) with {second!r}"]


@pytest.mark.parametrize("module, approximate, expected, note", [
    # fast=False: whole blocks at valid centres; gamma_scale folds into p.
    (TimmOld(0.2, 5, gamma_scale=0.25, fast=False, inplace=True), False,
     {"p": 0.05, "block_size": 5, "inplace": True, "eps": 1e-7, "couple_channels": False, "normalize": "batch"}, ""),
    (TimmOldModelsPath(0.1, 3, fast=False, batchwise=False), False,
     {"p": 0.1, "block_size": 3, "inplace": False, "eps": 1e-7, "couple_channels": False, "normalize": "batch"}, ""),
    # fast=True (timm's default; batchwise is ignored there): partial edge blocks, only with approximate=True.
    (TimmOld(0.1, 3, batchwise=True), True,
     {"p": 0.1, "block_size": 3, "inplace": False, "eps": 1e-6, "couple_channels": False, "normalize": "batch"},
     "approximated"),
    (TimmNew(0.1, 5, gamma_scale=0.5), True,
     {"p": 0.05, "block_size": 5, "inplace": False, "eps": 1e-7, "couple_channels": True, "normalize": "batch"},
     "approximated"),
    (TimmNew(0.1, 3, couple_channels=False, scale_by_keep=False), True,
     {"p": 0.1, "block_size": 3, "inplace": False, "eps": 1e-7, "couple_channels": False, "normalize": "none"},
     "approximated"),
    (TimmOld(0.1, 4, fast=False), False,
     {"p": 0.1, "block_size": 4, "inplace": False, "eps": 1e-7, "couple_channels": False, "normalize": "batch"},
     "even block_size"),
])
def test_timm_hyper_parameters_map(module, approximate, expected, note):
    model = nn.Sequential(nn.Identity(), module)
    _, report = robustdrop.convert(model, approximate=approximate, verbose=False)
    assert type(model[1]) is DropBlock2d
    assert options(model[1]) == {**expected, "backend": "auto"}
    assert model[1].p == pytest.approx(expected["p"], rel=0, abs=1e-15)
    (item,) = report.replaced
    assert item.name == "1" and item.old == f"{type(module).__module__}.DropBlock2d"
    assert item.note.startswith(note) if note else item.note == ""


def test_even_torchvision_block_size_is_noted():
    _, report = robustdrop.convert(nn.Sequential(TorchvisionDropBlock2d(0.1, 4)), verbose=False)
    assert report.replaced[0].note.startswith("even block_size")


@pytest.mark.parametrize("module, reason", [
    (TimmOld(with_noise=True, fast=False), "with_noise=True"),
    (TimmNew(with_noise=True), "with_noise=True"),
    (TimmOld(fast=False, batchwise=True), "batchwise=True"),
    (TimmOld(), "partial edge blocks, fast=True"),
    (TimmNew(), "partial edge blocks"),
    (TimmOld(0.5, 3, gamma_scale=4.0, fast=False), "drop_prob * gamma_scale = 0.5 * 4.0 is not a drop rate"),
    (TorchvisionDropBlock2d(1.5, 3), "p is not a drop rate"),
    (TorchvisionDropBlock2d(0.1, 0), "block_size 0 is not an int >= 1"),
    (TorchvisionDropBlock3d(0.1, 3), "no 3-D DropBlock"),
    (stand_in(_StandIn, module_path="timm.layers.drop")(), "unrecognised timm DropBlock2d version"),
])
def test_configurations_robustdrop_cannot_reproduce_are_skipped(module, reason, capsys):
    model = nn.Sequential(nn.ReLU(), module)
    _, report = robustdrop.convert(model)
    assert model[1] is module
    assert report.replaced == []
    (item,) = report.skipped
    assert item.name == "1" and item.old == f"{type(module).__module__}.{type(module).__name__}"
    assert reason in item.reason
    assert capsys.readouterr().out == f"robustdrop.convert: skipped 1 ({item.old}): {item.reason}\n"


# the walk over the model


def test_convert_is_idempotent_and_leaves_other_modules_alone(capsys):
    own, other = DropBlock2d(0.1, 3), OtherDropBlock2d(0.1, 3)
    model = nn.Sequential(TorchvisionDropBlock2d(0.1, 3), own, other)
    robustdrop.convert(model, verbose=False)
    converted = model[0]
    _, report = robustdrop.convert(model)
    assert model[0] is converted and model[1] is own and model[2] is other
    assert report == ConversionReport()
    assert capsys.readouterr().out == "robustdrop.convert: no torchvision or timm DropBlock2d modules found\n"


def test_a_shared_module_stays_shared_and_the_model_itself_is_converted():
    shared = TorchvisionDropBlock2d(0.1, 3)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.ModuleList([nn.ReLU(), shared])})
    _, report = robustdrop.convert(model, verbose=False)
    assert type(model["a"][0]) is DropBlock2d and model["b"][1] is model["a"][0]
    assert [item.name for item in report.replaced] == ["a.0"]
    converted, report = robustdrop.convert(TorchvisionDropBlock2d(0.3, 5).eval(), verbose=False)
    assert type(converted) is DropBlock2d and (converted.p, converted.block_size) == (0.3, 5)
    assert not converted.training and report.replaced[0].name == ""


def test_inplace_false_converts_a_copy():
    original = TorchvisionDropBlock2d(0.1, 3)
    model = nn.Sequential(nn.Linear(2, 2), original)
    copy, report = robustdrop.convert(model, inplace=False, verbose=False)
    assert model[1] is original and copy is not model
    assert type(copy[1]) is DropBlock2d and len(report.replaced) == 1
    assert torch.equal(copy[0].weight, model[0].weight) and copy[0].weight is not model[0].weight


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        robustdrop.convert([TorchvisionDropBlock2d(0.1, 3)])
    with pytest.raises(ValueError, match="backend must be one of"):
        robustdrop.convert(nn.Sequential(), backend="gpu")
    for name in ("approximate", "inplace", "verbose"):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            robustdrop.convert(nn.Sequential(), **{name: 1})


# the converted layer's statistics


@pytest.mark.parametrize("module, drop_rate", [
    (TorchvisionDropBlock2d(0.1, 3), 0.1),
    (TimmOld(0.2, 3, gamma_scale=0.5, fast=False), 0.2 * 0.5),  # timm's gamma is gamma_scale * drop_prob * ...
])
def test_converted_layer_drops_what_the_original_draws(module, drop_rate):
    torch.manual_seed(0)
    layer, _ = robustdrop.convert(module, verbose=False)
    n, c, h, w, bs = 32, 16, 28, 28, 3
    x = torch.ones(n, c, h, w)
    y = layer.train()(x)
    dropped = (y == 0).double().mean().item()
    gamma = drop_rate * h * w / (bs**2 * (h - bs + 1) * (w - bs + 1))  # the original library's seed probability
    assert abs(dropped - expected_drop_rate(gamma, h, w, bs)) < 0.01
    assert abs(dropped - drop_rate) < 0.03
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, x.numel() / kept.numel()))  # numel / kept, as the original
    assert layer.eval()(x) is x


def test_converted_inplace_layer_writes_into_its_input():
    layer, _ = robustdrop.convert(TorchvisionDropBlock2d(0.5, 3, inplace=True), verbose=False)
    x = torch.ones(2, 4, 9, 9)
    y = layer(x)
    assert y is x and (x == 0).any()


# the real libraries, where installed


def test_real_torchvision_modules():
    ops = pytest.importorskip("torchvision.ops")
    model = nn.Sequential(ops.DropBlock2d(0.1, 3, eps=1e-5), ops.DropBlock3d(0.1, 3))
    _, report = robustdrop.convert(model, verbose=False)
    assert type(model[0]) is DropBlock2d and (model[0].p, model[0].block_size, model[0].eps) == (0.1, 3, 1e-5)
    assert [item.name for item in report.skipped] == ["1"] and isinstance(model[1], ops.DropBlock3d)


def test_real_timm_modules():
    layers = pytest.importorskip("timm.layers")
    cls = layers.DropBlock2d
    if "fast" in inspect.signature(cls).parameters:  # before 1.0.23
        model = nn.Sequential(cls(0.2, 3, gamma_scale=0.5, fast=False), cls(0.1, 3))
        _, report = robustdrop.convert(model, verbose=False)
        assert type(model[0]) is DropBlock2d and model[0].p == pytest.approx(0.1) and model[0].eps == 1e-7
        assert isinstance(model[1], cls) and [item.name for item in report.skipped] == ["1"]
    else:
        model = nn.Sequential(cls(0.2, 3, gamma_scale=0.5))
        _, report = robustdrop.convert(model, verbose=False)
        assert isinstance(model[0], cls) and len(report.skipped) == 1
        robustdrop.convert(model, approximate=True, verbose=False)
        assert type(model[0]) is DropBlock2d and model[0].couple_channels and model[0].p == pytest.approx(0.1)
