"""Random Mask (DESIGN.md 4.4) as an nn.Module, and the way to put it into a model.

Random Mask removes a fixed random set of neurons from a convolution's output
before training; the set is part of the architecture, so it is saved with the
model and applied in training and evaluation alike, without rescale::

    model = robustdrop.models.resnet18()                # or torchvision.models.resnet18()
    robustdrop.apply_random_mask(model, 0.5)            # the paper's "0.5-Shallow"
    robustdrop.apply_random_mask(model, 0.7, layers=["layer3.0.conv1"])   # any other conv

Each chosen conv becomes ``nn.Sequential(conv, RandomMask2d(...))``; the masks
are built at the first forward (the conv's output shape is not known before).
Its parameters are renamed so (``conv1.weight`` is ``conv1.0.weight``), but a
checkpoint of the plain model (torchvision's or timm's weights) still loads,
before or after ``apply_random_mask`` (see there).
"""

import torch
from torch import nn

from robustdrop import _backend, _checks
from robustdrop._backend import eager_only, extension_error
from robustdrop._seed import draw_seed, op_seed
from robustdrop.nn._fx import fx_leaf_call
from robustdrop.nn._script import NotScriptable
from robustdrop.ops.fixed_mask import fixed_mask2d, pack_fixed_mask
from robustdrop.reference.fixed_mask import MODES, random_keep_mask
from robustdrop.reference.philox import philox_uniform

__all__ = ["RandomMask2d", "apply_random_mask", "shallow_convolutions"]


def _check_ratio(ratio) -> float:
    fraction = _checks.real_number(ratio, "ratio")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"ratio must be in [0, 1) (the fraction of neurons removed), got {ratio}")
    return fraction


def _check_shape(shape) -> tuple[int, int, int] | None:
    if shape is None:
        return None
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 3:
        raise ValueError(f"shape must be None or (C, H, W), got {shape!r}")
    if any(not _checks.is_integral(size) or size < 1 for size in shape):
        raise ValueError(f"shape must be None or (C, H, W) of positive ints, got {tuple(shape)!r}")
    return tuple(int(size) for size in shape)


def _fast_uniform():
    """The compiled RNG op when the extension is built (the same bits as the reference's, faster)."""
    if extension_error() is None:
        return torch.ops.robustdrop.philox_uniform
    return philox_uniform


_BUILD_FIRST = ("RandomMask2d builds its mask at the first forward: run one eager forward, or pass shape=, before "
                "torch.compile(fullgraph=True), torch.export, torch.onnx.export or torch.jit.trace")


def _not_compiled(function):
    """A graph break under torch.compile: the mask is drawn once, by Python-level work not worth tracing."""
    return eager_only(function, _BUILD_FIRST)


class RandomMask2d(NotScriptable, nn.Module):
    r"""A fixed random keep mask over (N, C, H, W) feature maps: Random Mask.

    .. math::
        y[n, c, h, w] = \mathrm{keep}[c, h, w] \; ? \; x[n, c, h, w] \; : \; 0

    The keep mask (C, H, W) is drawn once from ``seed`` (DESIGN.md section 3:
    u(i) = uniform(seed, i), the positions of smallest u are dropped) and is
    the same for every sample. It is architecture, not regularisation: applied
    in train and eval mode alike, with no rescale of the kept values.

    Args:
        ratio: the fraction of neurons removed, in [0, 1).
        mode: ``"random"``: exactly round(ratio*H*W) positions dropped in every
            channel, independently per channel (the paper's Random Mask);
            ``"same"``: one spatial mask of round(ratio*H*W) dropped positions
            shared by all channels (the paper's "Same Mask"); ``"channel"``:
            round(ratio*C) whole channels dropped (the paper's "Channel Mask").
        per_channel: ``mode="random"`` only. False drops round(ratio*C*H*W)
            positions over the whole (C, H, W) tensor, as the authors' code
            does, so channels lose different counts.
        seed: the mask's seed (taken modulo 2**64). None draws one at
            construction from torch's default CPU generator, so
            ``torch.manual_seed`` makes it repeatable; the same on every
            distributed rank seeded alike (no per-rank key, unlike dropout
            seeds: the mask is architecture).
        shape: (C, H, W) to build the mask now; None builds it at the first
            forward from x.shape[1:], on x's device.
        inplace: write y into x (autograd allows it wherever it allows an
            in-place op: the backward needs only the mask).
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Shapes: x (N, C, H, W) floating point, y the same; buffer ``mask``: bool
    (C, H, W) keep mask, None until built. ``mask`` is saved in the
    ``state_dict``; loading it into a module not yet built builds it from the
    saved tensor (a checkpoint restores the architecture, whatever this
    module's own seed). The bit-packed (C, H, ceil(W/8)) uint8 form the op
    reads is the non-persistent buffer ``packed_mask``.

    Under ``torch.compile`` the first forward, which builds the mask, is a
    graph break; ``fullgraph=True`` and ``torch.export`` need the mask built
    first (``shape=`` or one eager forward): exporting an unbuilt module is an
    error.
    """

    def __init__(self, ratio: float, *, mode: str = "random", per_channel: bool = True, seed: int | None = None,
                 shape: tuple[int, int, int] | None = None, inplace: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.ratio = _check_ratio(ratio)
        self.mode = _checks.check_choice(mode, "mode", MODES)
        self.per_channel = _checks.check_bool(per_channel, "per_channel")
        _checks.check_seed(seed)
        # Shared across distributed ranks: the mask is architecture, the same on every replica.
        self.seed = draw_seed(per_rank=False) if seed is None else int(seed)
        shape = _check_shape(shape)
        self.inplace = _checks.check_bool(inplace, "inplace")
        self.backend = _backend.check_backend_name(backend)
        self.register_buffer("mask", None)
        # Empty until built: it follows the module's .to()/.cuda(), so a mask
        # loaded into an unbuilt module lands on the module's device.
        self.register_buffer("packed_mask", torch.empty(0, dtype=torch.uint8), persistent=False)
        if shape is not None:
            self._build(shape, self.packed_mask.device)

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of the mask, None until built."""
        return None if self.mask is None else tuple(self.mask.shape)

    def _draw_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The keep mask (C, H, W) bool, on the CPU, that this module's seed and settings give for ``shape``."""
        return random_keep_mask(tuple(shape), self.ratio, mode=self.mode, per_channel=self.per_channel,
                                seed=op_seed(self.seed), uniform=_fast_uniform())

    @_not_compiled
    def _build(self, shape: tuple[int, int, int], device: torch.device) -> None:
        if torch._guards.detect_fake_mode() is not None or torch.jit.is_tracing():
            # Traced on fake tensors (torch.export, FakeTensorMode): a mask drawn now would be a fake
            # tensor kept in the module, and the program would rebuild it at every call. The TorchScript
            # tracer (torch.jit.trace, the older ONNX exporter) gives the shape as traced tensors.
            raise RuntimeError(_BUILD_FIRST)
        # Normal tensors even when the first forward runs under torch.inference_mode():
        # the buffers outlive it, and later training forwards save them for backward.
        with torch.inference_mode(False):
            self.mask = self._draw_mask(shape).to(device)
            self._repack()

    def _repack(self) -> None:
        self.packed_mask = pack_fixed_mask(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (leaf := fx_leaf_call(self, x)) is not None:
            return leaf
        _checks.check_feature_map(x)
        if self.mask is None:
            if min(x.shape[1:]) == 0:
                # A mask for an empty map would be frozen into the module, and shape= refuses it too.
                raise ValueError(f"x must have C, H and W >= 1 for RandomMask2d to build its (C, H, W) mask at "
                                 f"its first forward, got shape {tuple(x.shape)}")
            self._build(tuple(x.shape[1:]), x.device)
        elif tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"RandomMask2d holds a mask for (C, H, W) = {self.shape}, got x of shape "
                             f"{tuple(x.shape)}")
        return fixed_mask2d(x, self.packed_mask, inplace=self.inplace, backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "mask"
        saved = state_dict.get(key)
        if saved is not None:
            if not isinstance(saved, torch.Tensor) or saved.dtype != torch.bool or saved.dim() != 3:
                error_msgs.append(f"RandomMask2d: {key} must be a bool keep mask (C, H, W), got "
                                  f"{getattr(saved, 'dtype', type(saved).__name__)} of shape "
                                  f"{tuple(getattr(saved, 'shape', ()))}")
                return
            if self.mask is None:
                # Unbuilt: take the saved architecture (copied into place by the default loading below).
                self.mask = torch.empty(saved.shape, dtype=torch.bool, device=self.packed_mask.device)
            elif tuple(saved.shape) != self.shape:
                error_msgs.append(f"RandomMask2d holds a mask for (C, H, W) = {self.shape}, but {key} in the "
                                  f"state_dict has shape {tuple(saved.shape)}: the checkpoint is of another "
                                  f"architecture")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.mask is not None:
            self._repack()

    def extra_repr(self) -> str:
        return (f"ratio={self.ratio}, mode={self.mode!r}, per_channel={self.per_channel}, seed={self.seed}, "
                f"shape={self.shape}, inplace={self.inplace}, backend={self.backend!r}")


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name and isinstance(module, nn.Conv2d)]


def _resnet_main_path(stage: nn.Module, prefix: str) -> list[str]:
    """The nn.Conv2d names under ``stage``, outside any ``downsample`` shortcut."""
    return [f"{prefix}.{name}" for name, module in stage.named_modules()
            if isinstance(module, nn.Conv2d) and "downsample" not in name.split(".")]


def shallow_convolutions(model: nn.Module) -> list[str]:
    """The names of the convs Random Mask's "Shallow" setting masks in ``model``.

    ``model.shallow_convolutions`` (a sequence of module names) when the model
    defines it; else, for a ResNet-style model (``conv1``, ``layer1``,
    ``layer2``, as torchvision, timm and ``robustdrop.models``), the stem
    ``conv1`` (every conv of it, for a deep stem) and every nn.Conv2d on the
    main path of ``layer1`` and ``layer2``, not the ``downsample`` shortcuts:
    the paper's first three of ResNet-18's five blocks.
    """
    names = getattr(model, "shallow_convolutions", None)
    if names is not None:
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise TypeError(f"{type(model).__name__}.shallow_convolutions must be a sequence of module names, "
                            f"got {names!r}")
        return list(names)
    parts = [getattr(model, name, None) for name in ("conv1", "layer1", "layer2")]
    if all(isinstance(part, nn.Module) for part in parts):
        stem = ["conv1"] if isinstance(parts[0], nn.Conv2d) else _resnet_main_path(parts[0], "conv1")
        return stem + _resnet_main_path(parts[1], "layer1") + _resnet_main_path(parts[2], "layer2")
    raise ValueError(f"apply_random_mask cannot tell the shallow convolutions of a {type(model).__name__} (it has "
                     f"no `shallow_convolutions` attribute and is not ResNet-style with conv1, layer1, layer2): "
                     f"pass layers=[...], names of its nn.Conv2d modules, e.g. {_conv_names(model)[:6]}")


def _check_layer_names(model: nn.Module, names: list[str]) -> None:
    # Every name a module has: a conv registered twice (self.b = self.a) can be named by either.
    modules = dict(model.named_modules(remove_duplicate=False))
    seen = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layers must hold module names (str), got {name!r}")
        if name in seen:
            raise ValueError(f"layers names {name!r} twice")
        seen.add(name)
        module = modules.get(name) if name else None
        if module is None:
            raise ValueError(f"layers names {name!r}, which is not a module of the {type(model).__name__}; "
                             f"its nn.Conv2d modules include {_conv_names(model)[:8]}")
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"layers names {name!r}, a {type(module).__name__}, not an nn.Conv2d")
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name]
        if (child == "0" and isinstance(parent, nn.Sequential) and len(parent) == 2
                and isinstance(parent[1], RandomMask2d)):
            raise ValueError(f"layers names {name!r}, which already has a RandomMask2d after it "
                             f"({parent_name!r})")


def apply_random_mask(model: nn.Module, ratio: float, *, layers="shallow", mode: str = "random",
                      per_channel: bool = True, seed: int | None = None) -> nn.Module:
    """Put a RandomMask2d right after chosen convolutions of ``model``, in place.

    Each chosen ``nn.Conv2d`` at name ``a.b.conv`` is replaced by
    ``nn.Sequential(conv, RandomMask2d(ratio, mode=mode, per_channel=per_channel,
    seed=base + i))`` (i its position in the list of names), so the masks of
    different layers differ. The masks are built at the first forward, from the
    convs' output shapes; run one forward (on a batch of the training input
    size) before saving, loading into, compiling or exporting the model.

    The conv's parameters move under the wrapper's ``0.``: ``a.b.conv.weight``
    becomes ``a.b.conv.0.weight`` in ``state_dict()``, next to the mask's
    ``a.b.conv.1.mask``. Pretrained weights of the plain model (torchvision's,
    timm's) load best before ``apply_random_mask``; loaded after it, each
    wrapper maps the plain ``a.b.conv.*`` keys to ``a.b.conv.0.*`` (a
    load_state_dict pre-hook; only keys whose new name the checkpoint lacks),
    and its mask, which such a checkpoint cannot hold, stays the module's own,
    also under ``strict=True``. A checkpoint of the masked model loads as it is.

    Args:
        model: the network; modified in place and returned.
        ratio: the fraction of each conv output's neurons removed, in [0, 1).
        layers: ``"shallow"`` (see ``shallow_convolutions``: for ResNet-18 the
            stem and the main-path convs of layer1 and layer2, the paper's
            "Shallow" blocks) or a list of nn.Conv2d module names.
        mode, per_channel: as RandomMask2d.
        seed: the base seed; None draws one from torch's default CPU generator.

    Returns:
        model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(layers, str):
        if layers != "shallow":
            raise ValueError(f"layers must be 'shallow' or a list of nn.Conv2d names, got {layers!r}")
        names = shallow_convolutions(model)
    elif isinstance(layers, (list, tuple)):
        names = list(layers)
    else:
        raise TypeError(f"layers must be 'shallow' or a list of nn.Conv2d names, got {type(layers).__name__}")
    if not names:
        raise ValueError("layers must name at least one nn.Conv2d, got an empty list")
    _check_layer_names(model, names)
    _checks.check_seed(seed)
    base = draw_seed(per_rank=False) if seed is None else int(seed)
    masks = [RandomMask2d(ratio, mode=mode, per_channel=per_channel, seed=base + i) for i in range(len(names))]
    for name, mask in zip(names, masks):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        conv = getattr(parent, child)
        wrapper = nn.Sequential(conv, mask)
        wrapper.register_load_state_dict_pre_hook(_load_plain_conv_keys)
        setattr(parent, child, wrapper)
    return model


def _load_plain_conv_keys(wrapper: nn.Sequential, state_dict, prefix, local_metadata, strict, missing_keys,
                          unexpected_keys, error_msgs) -> None:
    """Pre-hook of apply_random_mask's ``nn.Sequential(conv, mask)`` for a checkpoint of the plain model: its
    ``prefix + name`` conv keys (no child of the wrapper) move to ``prefix + "0." + name`` where that is free,
    and, when one did, the built mask (absent from such a checkpoint) is loaded from the module itself."""
    plain = [key for key in state_dict
             if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0] not in wrapper._modules]
    moved = [key for key in plain if prefix + "0." + key[len(prefix):] not in state_dict]
    for key in moved:
        state_dict[prefix + "0." + key[len(prefix):]] = state_dict.pop(key)
    mask_key = prefix + "1.mask"
    if moved and wrapper[1].mask is not None and mask_key not in state_dict:
        state_dict[mask_key] = wrapper[1].mask
