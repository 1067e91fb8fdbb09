"""Random Mask (DESIGN.md 4.4): the RandomMask2d module and apply_random_mask.

The apply op itself (robustdrop.fixed_mask2d on every backend) is tested in
test_fixed_mask.py; here the mask is drawn, kept, saved and placed in models.
"""
import copy
import io
import math

import pytest
import torch
from torch import nn

import robustdrop
from robustdrop.models import SmallCNN, resnet18
from robustdrop.nn import RandomMask2d
from robustdrop.reference.fixed_mask import random_keep_mask
from conftest import DEVICES

RESNET18_SHALLOW = ["conv1"] + [f"layer{stage}.{block}.conv{conv}" for stage in (1, 2) for block in (0, 1)
                                for conv in (1, 2)]


def positive_input(shape, seed=0):
    """Values in [1, 2): a zero in the output can only come from the mask."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 1


def masked_names(model: nn.Module) -> list[str]:
    """The names of the convs followed by a RandomMask2d, in module order."""
    return [name[:-2] for name, module in model.named_modules() if isinstance(module, RandomMask2d)]


def save_and_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


# RandomMask2d: the mask

@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 1, 5), (2, 6, 9)])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_random_mode_drops_exactly_round_ratio_hw_in_every_channel(shape, ratio):
    layer = RandomMask2d(ratio, seed=11)
    y = layer(positive_input((2,) + shape))
    channels, height, width = shape
    expected = round(ratio * height * width)
    assert layer.shape == shape and layer.mask.dtype == torch.bool
    assert ((y == 0).sum((2, 3)) == expected).all()
    assert ((~layer.mask).sum((1, 2)) == expected).all()


def test_counts_round_half_to_even():
    # 0.5 * 5 = 2.5 -> 2 (Python's round), 0.5 * 7 = 3.5 -> 4.
    assert ((~RandomMask2d(0.5, seed=1, shape=(3, 1, 5)).mask).sum((1, 2)) == 2).all()
    assert ((~RandomMask2d(0.5, seed=1, shape=(3, 1, 7)).mask).sum((1, 2)) == 4).all()


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_random_mode_over_the_whole_tensor_drops_round_ratio_chw(ratio):
    shape = (8, 6, 6)
    layer = RandomMask2d(ratio, per_channel=False, seed=5, shape=shape)
    assert (~layer.mask).sum().item() == round(ratio * math.prod(shape))
    # Drawn over all C*H*W at once, the channels lose different counts.
    assert len(set((~layer.mask).sum((1, 2)).tolist())) > 1


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_same_mode_is_one_spatial_mask_for_every_channel(ratio):
    shape = (5, 4, 9)
    layer = RandomMask2d(ratio, mode="same", seed=2)
    y = layer(positive_input((3,) + shape))
    mask = layer.mask
    assert torch.equal(mask, mask[:1].expand(shape))
    assert (~mask[0]).sum().item() == round(ratio * 4 * 9)
    assert torch.equal(y != 0, mask.expand_as(y))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.6])
def test_channel_mode_drops_round_ratio_c_whole_channels(ratio):
    shape = (10, 3, 4)
    layer = RandomMask2d(ratio, mode="channel", seed=9)
    y = layer(positive_input((2,) + shape))
    per_channel_kept = layer.mask.sum((1, 2))
    assert set(per_channel_kept.tolist()) <= {0, 12}
    assert (per_channel_kept == 0).sum().item() == round(ratio * 10)
    assert torch.equal((y != 0).sum((0, 2, 3)) == 0, per_channel_kept == 0)


@pytest.mark.parametrize("mode, per_channel", [("random", True), ("random", False), ("same", True),
                                               ("channel", True)])
def test_mask_is_the_reference_draw(mode, per_channel):
    shape = (3, 4, 10)
    layer = RandomMask2d(0.4, mode=mode, per_channel=per_channel, seed=2**64 + 21, shape=shape)
    expected = random_keep_mask(shape, 0.4, mode=mode, per_channel=per_channel, seed=21)
    assert torch.equal(layer.mask, expected)


def test_forward_is_a_select_of_the_same_mask_for_every_sample():
    shape = (4, 3, 11)
    layer = RandomMask2d(0.5, seed=4)
    x = torch.randn((5,) + shape)
    x[:, ~RandomMask2d(0.5, seed=4, shape=shape).mask] = float("nan")  # only at dropped positions
    y = layer(x)
    keep = layer.mask
    assert torch.equal(y, torch.where(keep, x, torch.zeros(())))
    for sample in y:
        assert torch.equal(sample != 0, keep)
    assert not y.isnan().any()


def test_eval_is_train():
    layer = RandomMask2d(0.6, seed=8)
    x = torch.randn(2, 3, 5, 5)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert torch.equal(y_train, y_eval) and (y_eval == 0).any()


def test_mask_is_built_once_and_kept():
    layer = RandomMask2d(0.5, seed=3)
    assert layer.mask is None and layer.shape is None
    layer(torch.randn(1, 2, 4, 4))
    first = layer.mask.clone()
    for _ in range(3):
        layer(torch.randn(3, 2, 4, 4))
    assert torch.equal(layer.mask, first)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_is_built_on_x_device_and_follows_to(device):
    layer = RandomMask2d(0.5, seed=3)
    y = layer(torch.ones(2, 3, 4, 5, device=device))
    assert layer.mask.device == y.device and layer.packed_mask.device == y.device
    assert torch.equal(y.cpu(), layer.mask.cpu().expand(2, 3, 4, 5).float())
    # A mask built at construction moves with the module.
    built = RandomMask2d(0.5, seed=3, shape=(3, 4, 5)).to(device)
    assert built.mask.device == built.packed_mask.device == torch.ones(1, device=device).device
    assert torch.equal(built.mask.cpu(), layer.mask.cpu())


def test_a_mask_built_under_inference_mode_serves_training():
    layer = RandomMask2d(0.5, seed=3)
    with torch.inference_mode():
        layer(torch.randn(1, 2, 4, 4))
    assert not layer.mask.is_inference() and not layer.packed_mask.is_inference()
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(x.grad, layer.mask.expand_as(x).float())


def test_torch_compile():
    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    built = RandomMask2d(0.5, seed=1, shape=(3, 4, 6))
    compiled = torch.compile(built, fullgraph=True)
    y = compiled(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y, built(x)) and torch.equal(grad, built.mask.expand_as(x).float())
    lazy = RandomMask2d(0.5, seed=1)
    compiled = torch.compile(lazy)  # the build is a graph break
    for _ in range(2):
        assert torch.equal(compiled(x), built(x))


# Seeds

def test_same_seed_same_mask_different_seeds_different_masks():
    shape = (4, 6, 6)
    masks = [RandomMask2d(0.5, seed=seed, shape=shape).mask for seed in (1, 1, 2)]
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


def test_seed_none_is_repeatable_under_manual_seed():
    shape = (4, 6, 6)
    torch.manual_seed(123)
    first = RandomMask2d(0.5, shape=shape)
    torch.manual_seed(123)
    second = RandomMask2d(0.5, shape=shape)
    third = RandomMask2d(0.5, shape=shape)
    assert first.seed == second.seed != third.seed
    assert torch.equal(first.mask, second.mask)
    assert not torch.equal(first.mask, third.mask)


def test_lazy_and_eager_builds_give_the_same_mask():
    lazy = RandomMask2d(0.3, mode="same", seed=17)
    lazy(torch.randn(1, 3, 7, 5))
    assert torch.equal(lazy.mask, RandomMask2d(0.3, mode="same", seed=17, shape=(3, 7, 5)).mask)


# Gradient

@pytest.mark.parametrize("inplace", [False, True])
def test_gradient_is_masked(inplace):
    layer = RandomMask2d(0.5, seed=6, inplace=inplace)
    leaf = torch.randn(2, 3, 4, 6, requires_grad=True)
    x = leaf * 1  # a non-leaf, so the in-place apply is allowed
    y = layer(x)
    assert (y is x) == inplace
    grad = torch.randn(y.shape)
    y.backward(grad)
    assert torch.equal(leaf.grad, torch.where(layer.mask, grad, torch.zeros(())))


# Persistence

def test_state_dict_holds_the_bool_mask_only():
    layer = RandomMask2d(0.5, seed=3)
    assert list(layer.state_dict()) == []  # nothing to save before the mask is built
    layer(torch.randn(1, 2, 3, 9))
    state = layer.state_dict()
    assert list(state) == ["mask"]
    assert state["mask"].dtype == torch.bool and tuple(state["mask"].shape) == (2, 3, 9)


@pytest.mark.parametrize("target", ["unbuilt", "built_with_another_seed"])
def test_mask_survives_save_and_load(target):
    shape = (3, 5, 10)
    x = torch.randn((2,) + shape)
    source = RandomMask2d(0.5, seed=1)
    expected = source(x)
    state = save_and_load(source.state_dict())
    if target == "unbuilt":
        loaded = RandomMask2d(0.5, seed=2)
    else:
        loaded = RandomMask2d(0.5, seed=2, shape=shape)
        assert not torch.equal(loaded.mask, source.mask)
    loaded.load_state_dict(state)
    assert torch.equal(loaded.mask, source.mask)
    assert torch.equal(loaded.packed_mask, source.packed_mask)
    assert torch.equal(loaded(x), expected)


def test_model_masks_survive_save_and_load():
    x = torch.randn(2, 3, 16, 16)
    source = robustdrop.apply_random_mask(SmallCNN(), 0.5, seed=1).eval()
    expected = source(x)
    state = save_and_load(source.state_dict())
    loaded = robustdrop.apply_random_mask(SmallCNN(), 0.5, seed=99).eval()
    loaded.load_state_dict(state)  # masks not built yet: they are built from the checkpoint
    assert torch.equal(loaded(x), expected)
    for name in SmallCNN.shallow_convolutions:
        a, b = source.get_submodule(name)[1], loaded.get_submodule(name)[1]
        assert torch.equal(a.mask, b.mask) and a.seed != b.seed


def test_loading_a_mask_of_another_shape_is_a_clear_error():
    source = RandomMask2d(0.5, seed=1, shape=(3, 5, 10))
    built = RandomMask2d(0.5, seed=1, shape=(3, 5, 9))
    with pytest.raises(RuntimeError, match=r"RandomMask2d holds a mask for \(C, H, W\) = \(3, 5, 9\)"):
        built.load_state_dict(source.state_dict())
    with pytest.raises(RuntimeError, match="bool keep mask"):
        RandomMask2d(0.5).load_state_dict({"mask": torch.ones(3, 5, 9)})


def test_plain_pretrained_weights_load_before_and_after_apply_random_mask():
    """A checkpoint of the plain model (torchvision's or timm's weights: ``conv1.weight``) loads before
    apply_random_mask, and after it too: the wrappers map the plain keys to ``conv1.0.weight`` and keep their
    own masks (built or not), also under strict loading."""
    x = torch.randn(2, 3, 16, 16)
    plain = save_and_load(resnet18(num_classes=10).state_dict())
    before = resnet18(num_classes=10)
    before.load_state_dict(plain)
    robustdrop.apply_random_mask(before, 0.5, seed=3).eval()
    expected = before(x)
    unbuilt = robustdrop.apply_random_mask(resnet18(num_classes=10), 0.5, seed=3).eval()
    assert "conv1.0.weight" in unbuilt.state_dict() and "conv1.weight" not in unbuilt.state_dict()
    result = unbuilt.load_state_dict(plain)  # strict: nothing missing or unexpected
    assert result.missing_keys == result.unexpected_keys == []
    assert torch.equal(unbuilt(x), expected)
    built = copy.deepcopy(robustdrop.apply_random_mask(resnet18(num_classes=10), 0.5, seed=3).eval())
    built(x)
    masks = [built.get_submodule(name)[1].mask.clone() for name in RESNET18_SHALLOW]
    built.load_state_dict(plain)
    assert torch.equal(built(x), expected)
    assert all(torch.equal(built.get_submodule(name)[1].mask, mask) for name, mask in zip(RESNET18_SHALLOW, masks))
    assert torch.equal(built.conv1[0].weight, plain["conv1.weight"])
    assert list(plain)[0] == "conv1.weight"  # the checkpoint itself is not changed
    both = {**plain, "conv1.0.weight": plain["conv1.weight"]}  # ambiguous: the plain key is not moved
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "conv1.weight"'):
        built.load_state_dict(both)


def test_a_checkpoint_saved_before_the_masks_were_built_does_not_load_into_a_built_model():
    state = robustdrop.apply_random_mask(SmallCNN(), 0.5, seed=1).state_dict()  # no forward: no masks saved
    built = robustdrop.apply_random_mask(SmallCNN(), 0.5, seed=1)
    built(torch.randn(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match=r"Missing key.*layer1\.conv\.1\.mask"):
        built.load_state_dict(state)


# Bad input

@pytest.mark.parametrize("ratio", [1.0, -0.1, float("nan"), 1.5, float("inf")])
def test_ratio_outside_zero_one_is_a_value_error(ratio):
    with pytest.raises(ValueError, match="ratio"):
        RandomMask2d(ratio)


@pytest.mark.parametrize("ratio", [True, "0.5", None, torch.tensor(0.5)])
def test_ratio_of_the_wrong_type_is_a_type_error(ratio):
    with pytest.raises(TypeError, match="ratio"):
        RandomMask2d(ratio)


@pytest.mark.parametrize("kwargs, error, name", [
    ({"mode": "bogus"}, ValueError, "mode"),
    ({"mode": None}, ValueError, "mode"),
    ({"per_channel": 1}, TypeError, "per_channel"),
    ({"seed": "7"}, TypeError, "seed"),
    ({"seed": 1.0}, TypeError, "seed"),
    ({"shape": (3, 4)}, ValueError, "shape"),
    ({"shape": (3, 0, 4)}, ValueError, "shape"),
    ({"inplace": None}, TypeError, "inplace"),
    ({"backend": "gpu"}, ValueError, "backend"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, name):
    with pytest.raises(error, match=name):
        RandomMask2d(0.5, **kwargs)


@pytest.mark.parametrize("x_shape", [(2, 3, 5, 8), (2, 4, 5, 9), (2, 3, 4, 9)])
def test_input_that_no_longer_fits_the_mask_is_a_value_error(x_shape):
    layer = RandomMask2d(0.5, seed=1)
    layer(torch.randn(1, 3, 5, 9))
    with pytest.raises(ValueError, match=r"RandomMask2d holds a mask for \(C, H, W\) = \(3, 5, 9\), got x of shape"):
        layer(torch.randn(x_shape))


@pytest.mark.parametrize("x_shape", [(3, 5, 9), (1, 2, 3, 5, 9), (6,)])
def test_non_4d_input_is_a_value_error(x_shape):
    with pytest.raises(ValueError, match="x must be 4-D"):
        RandomMask2d(0.5, seed=1)(torch.randn(x_shape))


@pytest.mark.parametrize("x_shape", [(2, 0, 5, 9), (2, 3, 0, 9), (2, 3, 5, 0)])
def test_first_input_with_an_empty_map_is_a_value_error(x_shape):
    """The mask is built from the first forward's (C, H, W), which must be positive, as shape= must be; the
    module stays unbuilt, and an empty batch of a real map builds it."""
    layer = RandomMask2d(0.5, seed=1)
    with pytest.raises(ValueError, match=r"x must have C, H and W >= 1 for RandomMask2d to build"):
        layer(torch.randn(x_shape))
    assert layer.mask is None
    assert layer(torch.randn(0, 3, 5, 9)).shape == (0, 3, 5, 9) and layer.shape == (3, 5, 9)


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="x must be a floating-point"):
        RandomMask2d(0.5, seed=1)(torch.ones(1, 2, 3, 3, dtype=torch.int64))


def test_extra_repr_names_every_setting():
    text = repr(RandomMask2d(0.25, mode="same", seed=5, shape=(2, 3, 4)))
    for part in ("ratio=0.25", "mode='same'", "per_channel=True", "seed=5", "shape=(2, 3, 4)", "inplace=False",
                 "backend='auto'"):
        assert part in text


# apply_random_mask

def assert_masked_exactly(model: nn.Module, names: list[str], original: dict[str, nn.Module]):
    """Each name is Sequential(the original conv, RandomMask2d) and no other module is masked."""
    assert sorted(masked_names(model)) == sorted(names)
    assert sum(isinstance(module, RandomMask2d) for module in model.modules()) == len(names)
    for name in names:
        wrapper = model.get_submodule(name)
        assert isinstance(wrapper, nn.Sequential) and len(wrapper) == 2
        assert wrapper[0] is original[name] and isinstance(wrapper[1], RandomMask2d)


def test_shallow_resnet18_masks_the_stem_and_the_main_path_of_layer1_and_layer2():
    model = resnet18()
    original = dict(model.named_modules())
    assert robustdrop.apply_random_mask(model, 0.5, seed=0) is model
    assert_masked_exactly(model, RESNET18_SHALLOW, original)
    assert isinstance(model.layer2[0].downsample[0], nn.Conv2d)  # the shortcut is not masked
    model(torch.randn(1, 3, 16, 16))
    shapes = {name: model.get_submodule(name)[1].shape for name in RESNET18_SHALLOW}
    assert shapes["conv1"] == shapes["layer1.1.conv2"] == (64, 16, 16)
    assert shapes["layer2.0.conv1"] == shapes["layer2.1.conv2"] == (128, 8, 8)


def test_explicit_layers_mask_exactly_those_convs():
    model = resnet18()
    original = dict(model.named_modules())
    names = ["layer3.0.conv1", "layer4.1.conv2", "layer2.0.downsample.0"]
    robustdrop.apply_random_mask(model, 0.3, layers=names, mode="same", seed=4)
    assert_masked_exactly(model, names, original)
    layers = [model.get_submodule(name)[1] for name in names]
    assert all(layer.ratio == 0.3 and layer.mode == "same" for layer in layers)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


class SharedConv(nn.Module):
    """One conv applied twice, registered under two names (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(4, 4, 3, padding=1)
        self.second = self.first

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


@pytest.mark.parametrize("name", ["first", "second"])
def test_a_conv_registered_under_two_names_is_masked_where_named(name):
    """Either name of a shared conv places a mask after that use of it, and only there."""
    model = robustdrop.apply_random_mask(SharedConv(), 0.5, layers=[name], seed=3)
    other = {"first": "second", "second": "first"}[name]
    assert isinstance(getattr(model, name), nn.Sequential) and isinstance(getattr(model, other), nn.Conv2d)
    assert getattr(model, name)[0] is getattr(model, other)
    mask = RandomMask2d(0.5, seed=3)
    x = torch.randn(2, 4, 6, 6)
    conv = model.get_submodule(other)
    expected = conv(torch.relu(mask(conv(x)))) if name == "first" else mask(conv(torch.relu(conv(x))))
    assert torch.equal(model(x), expected)


def test_shallow_uses_the_model_s_shallow_convolutions():
    model = SmallCNN()
    original = dict(model.named_modules())
    robustdrop.apply_random_mask(model, 0.5, per_channel=False)
    assert_masked_exactly(model, ["layer1.conv", "layer2.conv"], original)
    assert all(not model.get_submodule(name)[1].per_channel for name in SmallCNN.shallow_convolutions)


def test_shallow_on_a_deep_stem_masks_every_stem_conv_and_skips_shortcuts():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.downsample = nn.Sequential(nn.Conv2d(4, 4, 1))

    class DeepStem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
            self.layer1 = nn.Sequential(Block())
            self.layer2 = nn.Sequential(Block(), Block())
            self.layer3 = nn.Sequential(Block())

    model = DeepStem()
    original = dict(model.named_modules())
    robustdrop.apply_random_mask(model, 0.5, seed=0)
    expected = ["conv1.0", "conv1.2", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
                "layer2.1.conv1", "layer2.1.conv2"]
    assert_masked_exactly(model, expected, original)


def test_masks_get_consecutive_seeds_and_different_masks():
    model = robustdrop.apply_random_mask(resnet18(), 0.5, seed=40)
    layers = [model.get_submodule(name)[1] for name in RESNET18_SHALLOW]
    assert [layer.seed for layer in layers] == list(range(40, 40 + len(RESNET18_SHALLOW)))
    model(torch.randn(1, 3, 16, 16))
    same_shape = [layer.mask for layer in layers[:5]]  # conv1 and layer1: all (64, 16, 16)
    assert all(not torch.equal(a, b) for i, a in enumerate(same_shape) for b in same_shape[i + 1:])


def test_seed_none_draws_a_base_seed_repeatably():
    torch.manual_seed(7)
    first = robustdrop.apply_random_mask(SmallCNN(), 0.5)
    torch.manual_seed(7)
    second = robustdrop.apply_random_mask(SmallCNN(), 0.5)
    seeds = [[model.get_submodule(name)[1].seed for name in SmallCNN.shallow_convolutions]
             for model in (first, second)]
    assert seeds[0] == seeds[1] and seeds[0][1] == seeds[0][0] + 1


@pytest.mark.parametrize("layers, match", [
    (["conv1", "layer9.0.conv1"], r"'layer9.0.conv1'.*not a module.*'conv1'"),
    (["layer1.0.bn1"], r"'layer1.0.bn1', a BatchNorm2d, not an nn.Conv2d"),
    (["layer1"], r"'layer1', a Sequential, not an nn.Conv2d"),
    ([""], r"'', which is not a module"),
    (["conv1", "conv1"], "'conv1' twice"),
    ([], "at least one"),
    ((), "at least one"),
    ("deep", "'shallow' or a list"),
])
def test_bad_layer_names_are_value_errors_naming_them(layers, match):
    model = resnet18()
    before = [name for name, _ in model.named_modules()]
    with pytest.raises(ValueError, match=match):
        robustdrop.apply_random_mask(model, 0.5, layers=layers)
    assert [name for name, _ in model.named_modules()] == before  # nothing changed


def test_bad_arguments_leave_the_model_unchanged():
    model = resnet18()
    before = [name for name, _ in model.named_modules()]
    with pytest.raises(ValueError, match="ratio"):
        robustdrop.apply_random_mask(model, 1.0)
    with pytest.raises(ValueError, match="mode"):
        robustdrop.apply_random_mask(model, 0.5, mode="bogus")
    with pytest.raises(TypeError, match="layers"):
        robustdrop.apply_random_mask(model, 0.5, layers=3)
    with pytest.raises(TypeError, match="model"):
        robustdrop.apply_random_mask("resnet18", 0.5)
    assert [name for name, _ in model.named_modules()] == before


def test_a_model_without_shallow_blocks_needs_explicit_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"pass layers=\[\.\.\.\].*'0', '2'"):
        robustdrop.apply_random_mask(model, 0.5)
    robustdrop.apply_random_mask(model, 0.5, layers=["2"])
    assert masked_names(model) == ["2"]


def test_masking_a_conv_twice_is_an_error_but_other_convs_can_be_added():
    model = robustdrop.apply_random_mask(resnet18(), 0.3, seed=0)  # 0.3-Shallow ...
    with pytest.raises(ValueError, match="already has a RandomMask2d"):
        robustdrop.apply_random_mask(model, 0.5)
    with pytest.raises(ValueError, match="already has a RandomMask2d"):
        robustdrop.apply_random_mask(model, 0.5, layers=["conv1.0"])
    robustdrop.apply_random_mask(model, 0.7, layers=["layer3.0.conv1", "layer4.0.conv1"], seed=1)  # ... 0.7-Deep
    assert len(masked_names(model)) == len(RESNET18_SHALLOW) + 2


def test_torchvision_resnets():
    models = pytest.importorskip("torchvision.models")
    model = models.resnet18(num_classes=10)
    original = dict(model.named_modules())
    robustdrop.apply_random_mask(model, 0.5, seed=0)
    assert_masked_exactly(model, RESNET18_SHALLOW, original)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert model.conv1[1].shape == (64, 32, 32) and model.layer2[1].conv2[1].shape == (128, 8, 8)
    bottleneck = models.resnet50()
    robustdrop.apply_random_mask(bottleneck, 0.5, seed=0)
    # The stem, 3 blocks x 3 convs of layer1 and 4 x 3 of layer2; no downsample.
    assert len(masked_names(bottleneck)) == 1 + 9 + 12
    assert not any("downsample" in name for name in masked_names(bottleneck))
