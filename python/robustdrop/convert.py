"""``robustdrop.convert(model)``: put robustdrop's DropBlock in place of torchvision's and timm's.

A model built with ``torchvision.ops.DropBlock2d`` or timm's ``DropBlock2d``
(``timm.layers.drop``; ``timm.models.layers.drop`` in older timm) gets
``robustdrop.nn.DropBlock2d`` modules with the same hyper-parameters, in place::

    model, report = robustdrop.convert(model)      # prints one line per module it replaced or skipped
    report.replaced                                # [Replacement(name, old, new, note), ...]

Modules are recognised by class name and module path (a class ``DropBlock2d``
whose ``__module__`` starts with ``torchvision.ops``, ``timm.layers`` or
``timm.models.layers``), so neither package has to be importable here. What
each attribute becomes, and when a module is left as it is (and listed in
``report.skipped`` with the reason), is the table in ``convert``'s docstring.

``robustdrop.convert`` is the function; the report's classes come from this
module: ``from robustdrop.convert import ConversionReport, Replacement, Skipped``.
"""
from __future__ import annotations

import copy
import dataclasses

from torch import nn

from robustdrop import _backend, _checks
from robustdrop.nn.drop_block import DropBlock2d

__all__ = ["convert", "ConversionReport", "Replacement", "Skipped"]

TORCHVISION_PREFIXES = ("torchvision.ops",)
TIMM_PREFIXES = ("timm.layers", "timm.models.layers")

# timm's own eps in its normalisation numel / (sum(keep) + eps): 1e-6 in its fast path before 1.0.23, else 1e-7.
TIMM_FAST_EPS = 1e-6
TIMM_EPS = 1e-7

PARTIAL_EDGE_NOTE = ("approximated: timm draws block centres over the whole H x W map and clips blocks at the edges, "
                     "so it drops more than drop_prob (0.21 for drop_prob 0.1 at 14x14 with block_size 7); robustdrop "
                     "keeps whole blocks inside the map (timm's fast=False rule) and drops 0.093 there")
EVEN_BLOCK_NOTE = ("even block_size: the original's forward fails on it (torchvision refuses an even block size with a "
                   "ValueError; timm before 1.0.23 builds a mask one larger than the map when min(block_size, H, W) "
                   "is even); robustdrop's block from a seed at (i, j) covers rows i..i+bs-1 and columns j..j+bs-1")


@dataclasses.dataclass(frozen=True)
class Replacement:
    """One module replaced: its qualified name ("" for the model itself), the class path of the
    module it was, the repr of the robustdrop module it is now, and how the two differ ("" if
    they compute the same function up to the random draw)."""

    name: str
    old: str
    new: str
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """One recognised module left as it is, and why robustdrop cannot reproduce it."""

    name: str
    old: str
    reason: str


@dataclasses.dataclass
class ConversionReport:
    """What ``convert`` did: ``replaced`` and ``skipped`` in module order."""

    replaced: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        """One line per replaced or skipped module (or one saying there was none)."""
        lines = []
        for item in self.replaced:
            lines.append(f"replaced {_label(item.name)} ({item.old}) with {item.new}"
                         + (f" [{item.note}]" if item.note else ""))
        for item in self.skipped:
            lines.append(f"skipped {_label(item.name)} ({item.old}): {item.reason}")
        return lines or ["no torchvision or timm DropBlock2d modules found"]

    def __str__(self) -> str:
        return "\n".join(self.lines())


class _Unsupported(Exception):
    """A recognised module whose configuration robustdrop does not reproduce (the message says why)."""


def convert(model: nn.Module, *, backend: str = "auto", approximate: bool = False, inplace: bool = True,
            verbose: bool = True) -> tuple[nn.Module, ConversionReport]:
    """Replace torchvision's and timm's DropBlock2d modules in ``model`` with ``robustdrop.nn.DropBlock2d``.

    Every DropBlock below computes, in training mode, ``y = keep * x * scale``
    with seeds drawn with probability gamma and expanded to bs x bs blocks, and
    ``scale = numel / (eps + kept)``; robustdrop's gamma is
    ``p*H*W / (bs**2 (H-bs+1)(W-bs+1))``, ``bs = min(block_size, H, W)``,
    with whole blocks inside the map (DESIGN.md 4.1). The hyper-parameters map
    as follows (robustdrop draws its own random numbers, so masks are equal in
    distribution, not bit for bit):

    ============================ ===================================== ========================================
    source attribute             robustdrop.nn.DropBlock2d             notes
    ============================ ===================================== ========================================
    **torchvision.ops**          (the same four arguments)
    ``DropBlock2d``
    p, block_size, inplace, eps  p, block_size, inplace, eps           same gamma, seed grid, whole blocks and
                                                                       normalisation: the same function
    (per-channel masks)          couple_channels=False,
                                 normalize="batch"
    **timm** ``DropBlock2d``
    drop_prob, gamma_scale       p = drop_prob * gamma_scale           timm's gamma is robustdrop's times
                                                                       gamma_scale, so the product gives the
                                                                       same gamma (block_size <= min(H, W));
                                                                       skipped if the product is not in [0, 1]
    block_size, inplace          block_size, inplace
    with_noise=True              --                                    skipped: dropped blocks get Gaussian
                                                                       noise, robustdrop zeroes them
    *timm < 1.0.23* fast=False   eps=1e-7, couple_channels=False       whole blocks at valid centres: the same
                                                                       function on square maps (on H != W its
                                                                       mask of valid centres is reshaped from
                                                                       (W, H), so it is not the map's interior)
    *timm < 1.0.23* fast=True    eps=1e-6, couple_channels=False       partial edge blocks: skipped unless
    (its default)                                                      ``approximate=True``
    *timm < 1.0.23* batchwise    --                                    with fast=False: skipped (one mask for
                                                                       the whole batch); ignored by timm when
                                                                       fast=True
    *timm >= 1.0.23*             couple_channels                       True (its default): one mask per sample
    couple_channels                                                    for all channels
    *timm >= 1.0.23*             normalize="batch" (True, eps=1e-7)    timm counts kept positions of its
    scale_by_keep                or "none" (False)                     (N, 1, H, W) mask when coupled: the
                                                                       same scale up to eps
    *timm >= 1.0.23* (always)    --                                    partial edge blocks: skipped unless
                                                                       ``approximate=True``
    ============================ ===================================== ========================================

    Partial edge blocks (timm's fast path, and every timm DropBlock2d since
    1.0.23): timm draws block centres over the whole H x W map and clips the
    blocks at its edges, so it drops more than ``drop_prob``: in expectation
    0.21 of a 14 x 14 map with block_size 7 and drop_prob 0.1, where whole
    blocks drop 0.093; 0.15 against 0.095 at 7 x 7 with block_size 3.
    robustdrop has no such mode; ``approximate=True`` replaces these modules
    anyway, with robustdrop's whole blocks (the drop rate ``p`` asks for, as
    timm's own ``fast=False``), and notes it in the report.

    Even block sizes: torchvision's and timm's (before 1.0.23) forwards fail
    when ``min(block_size, H, W)`` is even; the robustdrop module runs, with
    the block from a seed at (i, j) covering rows i..i+bs-1 (noted in the
    report). timm >= 1.0.23 uses ``min(block_size, H)`` x ``min(block_size, W)``
    blocks; robustdrop's are square, ``min(block_size, H, W)``: the two differ
    only for a block larger than the map's shorter side.

    ``torchvision.ops.DropBlock3d`` is listed as skipped (robustdrop has no 3-D
    DropBlock). Each new module takes the training flag of the one it replaces;
    forward hooks registered on the old module are not carried over. A module
    shared by several parents becomes one shared robustdrop module. robustdrop's
    own DropBlock2d is not touched, so converting twice changes nothing.

    Args:
        model: the network; a DropBlock2d itself is converted too (use the
            returned model).
        backend: the backend of the new modules ("auto", "cuda", "triton",
            "cpu" or "reference").
        approximate: also replace timm modules with partial edge blocks (see
            above); False leaves them and lists them as skipped.
        inplace: convert ``model`` itself (True) or a deep copy of it (False).
        verbose: print the report, one line per replaced or skipped module.

    Returns:
        (model, report): the converted model (``model`` itself when inplace,
        unless ``model`` was a DropBlock2d) and a ``ConversionReport`` whose
        ``replaced`` holds ``Replacement(name, old, new, note)`` and ``skipped``
        holds ``Skipped(name, old, reason)``, in module order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _backend.check_backend_name(backend)
    for value, name in ((approximate, "approximate"), (inplace, "inplace"), (verbose, "verbose")):
        _checks.check_bool(value, name)
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    converted = {}  # id(old module) -> its replacement, or None when skipped: shared modules are converted once
    model = _replace(model, "", report, converted, backend, approximate)
    _convert_children(model, "", report, converted, set(), backend, approximate)
    if verbose:
        for line in report.lines():
            print(f"robustdrop.convert: {line}")
    return model, report


def _convert_children(parent: nn.Module, prefix: str, report: ConversionReport, converted: dict, visited: set,
                      backend: str, approximate: bool) -> None:
    """Replace recognised children of ``parent``, depth first, so that the report follows module order.

    named_modules() would list a module shared by two parents once; walking the
    children of every parent replaces it everywhere it is registered.
    """
    if id(parent) in visited:
        return
    visited.add(id(parent))
    for name, child in list(parent.named_children()):
        if child is None:
            continue
        qualified = f"{prefix}.{name}" if prefix else name
        replacement = _replace(child, qualified, report, converted, backend, approximate)
        if replacement is not child:
            setattr(parent, name, replacement)
        else:
            _convert_children(child, qualified, report, converted, visited, backend, approximate)


def _replace(module: nn.Module, name: str, report: ConversionReport, converted: dict, backend: str,
             approximate: bool) -> nn.Module:
    """The module to put at ``name``: a robustdrop DropBlock2d for a convertible one, else module itself."""
    source = _source(module)
    if source is None:
        return module
    old = f"{type(module).__module__}.{type(module).__qualname__}"
    if id(module) in converted:  # a shared module: converted (or skipped) where it was first seen
        return converted[id(module)] or module
    try:
        options, note = _options(module, source, approximate)
    except _Unsupported as error:
        report.skipped.append(Skipped(name, old, str(error)))
        converted[id(module)] = None
        return module
    new = DropBlock2d(options.pop("p"), options.pop("block_size"), backend=backend, **options)
    new.train(module.training)
    report.replaced.append(Replacement(name, old, repr(new), note))
    converted[id(module)] = new
    return new


def _source(module: nn.Module) -> str | None:
    """"torchvision", "torchvision-3d", "timm" or None: which library's DropBlock module this is."""
    cls = type(module)
    path = cls.__module__ or ""
    if path.startswith(TORCHVISION_PREFIXES):
        return {"DropBlock2d": "torchvision", "DropBlock3d": "torchvision-3d"}.get(cls.__name__)
    if path.startswith(TIMM_PREFIXES) and cls.__name__ == "DropBlock2d":
        return "timm"
    return None


def _options(module: nn.Module, source: str, approximate: bool) -> tuple[dict, str]:
    """(robustdrop DropBlock2d keyword arguments, note) for a recognised module; _Unsupported if it cannot be
    converted."""
    if source == "torchvision-3d":
        raise _Unsupported("robustdrop has no 3-D DropBlock")
    if source == "torchvision":
        options = {"p": _probability(_attribute(module, "p"), "p"),
                   "block_size": _block_size(_attribute(module, "block_size")),
                   "inplace": _flag(module, "inplace"), "eps": _eps(_attribute(module, "eps")),
                   "couple_channels": False, "normalize": "batch"}
        return options, EVEN_BLOCK_NOTE if options["block_size"] % 2 == 0 else ""
    return _timm_options(module, approximate)


def _timm_options(module: nn.Module, approximate: bool) -> tuple[dict, str]:
    """The mapping for timm's DropBlock2d, before 1.0.23 (attribute ``fast``) or since (``scale_by_keep``)."""
    before_1023 = hasattr(module, "fast")
    if not before_1023 and not hasattr(module, "scale_by_keep"):
        raise _Unsupported("unrecognised timm DropBlock2d version (neither a fast nor a scale_by_keep attribute)")
    if _flag(module, "with_noise"):
        raise _Unsupported("with_noise=True fills dropped blocks with Gaussian noise; robustdrop zeroes them")
    if before_1023:
        fast = _flag(module, "fast")
        if not fast and _flag(module, "batchwise"):
            raise _Unsupported("batchwise=True (with fast=False) draws one mask for the whole batch; "
                               "robustdrop draws one per sample")
        partial_edges, eps, couple, normalize = fast, TIMM_FAST_EPS if fast else TIMM_EPS, False, "batch"
    else:
        partial_edges, eps = True, TIMM_EPS
        couple = _flag(module, "couple_channels")
        normalize = "batch" if _flag(module, "scale_by_keep") else "none"
    drop_prob, gamma_scale = _attribute(module, "drop_prob"), _attribute(module, "gamma_scale")
    for value, name in ((drop_prob, "drop_prob"), (gamma_scale, "gamma_scale")):
        if not _checks.is_real(value):
            raise _Unsupported(f"{name} is not a real number ({value!r})")
    p = _probability(_checks.as_float(drop_prob) * _checks.as_float(gamma_scale),
                     f"drop_prob * gamma_scale = {drop_prob} * {gamma_scale}")
    block_size = _block_size(_attribute(module, "block_size"))
    if partial_edges and not approximate:
        raise _Unsupported("timm clips blocks at the map's edges (partial edge blocks"
                           + (", fast=True" if before_1023 else "")
                           + "), which drops more than drop_prob; robustdrop keeps whole blocks: pass "
                             "approximate=True to replace it anyway")
    notes = [PARTIAL_EDGE_NOTE] if partial_edges else []
    if block_size % 2 == 0 and before_1023:
        notes.append(EVEN_BLOCK_NOTE)
    options = {"p": p, "block_size": block_size, "inplace": _flag(module, "inplace"), "eps": eps,
               "couple_channels": couple, "normalize": normalize}
    return options, "; ".join(notes)


def _attribute(module: nn.Module, name: str):
    if not hasattr(module, name):
        raise _Unsupported(f"no attribute {name!r}: an unrecognised version")
    return getattr(module, name)


def _flag(module: nn.Module, name: str) -> bool:
    value = _attribute(module, name)
    if not isinstance(value, bool):
        raise _Unsupported(f"{name} is not a bool ({value!r})")
    return value


def _probability(value, what: str) -> float:
    rate = _checks.as_float(value) if _checks.is_real(value) else None
    if rate is None or not 0.0 <= rate <= 1.0:
        raise _Unsupported(f"{what} is not a drop rate in [0, 1]")
    return rate


def _block_size(value) -> int:
    if not _checks.is_integral(value) or value < 1:
        raise _Unsupported(f"block_size {value!r} is not an int >= 1")
    return int(value)


def _eps(value) -> float:
    eps = _checks.as_float(value) if _checks.is_real(value) else None
    if eps is None or not 0.0 <= eps < float("inf"):
        raise _Unsupported(f"eps {value!r} is not a finite real number >= 0")
    return eps


def _label(name: str) -> str:
    return name or "(the model itself)"
