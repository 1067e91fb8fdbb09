"""Subnets of a network (EWS, the paper's Sec. 3.1): channel gates on its gated
layers and path gates on its residual blocks, S subnets evaluated in one
batched forward.

A subnet of width rho keeps, in every gated layer j with c_j channels, exactly
``ceil(rho * c_j)`` of them, and in every path-gated block i with n_i paths,
exactly ``ceil(rho * n_i)`` paths (``kept_count``). What is gated:

* ResNet-style models (``layers=None``): every residual block, recognised by
  its class name ``BasicBlock`` or ``Bottleneck`` (robustdrop.models,
  torchvision) with a ``downsample`` attribute and batch norms ``bn1, bn2[,
  bn3]``, is path gated; inside it, every batch norm but the last (``bn1`` of a
  BasicBlock; ``bn1``, ``bn2`` of a Bottleneck: the block-internal channels) is
  channel gated. The stem, the last batch norm of each block (its output is
  added to the skip path) and the classifier are not gated.
* Models without such blocks (``layers=None``): every batch-norm layer
  (robustdrop.models.SmallCNN: ``layer1.bn`` .. ``layer4.bn``).
* ``layers=[...]``: the modules named; a name of a recognised residual block is
  path gated, any other module is channel gated: its output (N, C, ...) is
  gated on dim 1 (every call of it, when the forward calls it more than once).

Path gates. A block's paths are ``PATHS = ("residual", "skip")``: its output is
``relu(g_r * residual(x) + g_s * skip(x))`` with g in {0, 1}, the skip path being
``downsample(x)`` or x. Any ``ceil(rho * 2)`` of the two may be kept (rho <= 0.5:
the residual path alone or the skip path alone; rho > 0.5: both, so at the
default width 0.7 path gates keep everything). g_r gates the output of the
block's last batch norm; g_s gates ``downsample``'s output, or, in a block
without one, a parameter-free gate module put in as ``downsample`` for the
duration of the forward (the block's own forward runs; nothing is rewritten).

Channel gates: ``y[n, c] = keep[n, c] ? layer_output[n, c] : 0``, through the
fused ``channel_gate`` op in forward hooks that exist only during a gated
forward. A subnet's gates are per sample: ``gn(x, [s_0, ..., s_{S-1}])`` with
x of S*N samples (the batch repeated S times) gates copy s, rows
s*N..(s+1)*N-1, with subnet s.

Normalisation statistics. Running a subnet never changes a normalisation
layer's running statistics or counters: a batch-norm (or instance-norm) layer
that normalises by batch statistics (training mode, or no running statistics)
runs with its running buffers detached for the forward, so it reads and writes
none; in eval mode running statistics are read as usual. With S > 1 subnets, a
batch-norm layer that uses batch statistics normalises each copy by its own
copy's statistics (as S separate forwards would), not by the S*N batch's.

What a batched forward equals. The gates are exact per sample (a select), so
copy s of ``gn(x.repeat(S, ...), subnets)`` is ``gn(x, subnets[s])`` bit for bit
in eval mode whenever the model's own layers compute each sample independently
of the batch size (robustdrop.models on CPU do; a BLAS or cuDNN may pick other
kernels for another batch size, and then the two agree to float rounding). In
train mode each copy's batch norms are the module's batch norm on that copy
alone, so the same holds there too.
The full subnet (every gate True) runs no gate op: in eval mode
``gn(x, gn.full_subnet())`` is ``model(x)`` bit for bit.
"""
import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from robustdrop import _backend, _checks
from robustdrop.ops.channel_gate import channel_gate
from robustdrop.reference.channel_gate import pack_channel_keep

__all__ = ["PATHS", "KINDS", "Decision", "Subnet", "GatedNetwork", "gated_layers", "kept_count"]

PATHS = ("residual", "skip")
BLOCK_CLASS_NAMES = ("BasicBlock", "Bottleneck")
KINDS = ("paths", "channels")


class Decision(NamedTuple):
    """One choice that defines a subnet: keep exactly ``keep`` of ``size`` items.

    kind: "paths" (a block's paths, in PATHS order) or "channels" (a layer's channels).
    """

    kind: str
    size: int
    keep: int


@dataclasses.dataclass(eq=False)
class Subnet:
    """A subnet: which channels of each gated layer and which paths of each block it keeps.

    Attributes:
        channels: gated layer name -> bool (C,), True where the channel is kept.
        paths: path-gated block name -> bool (n_i,) = (2,), (residual, skip),
            True where the path is kept.

    A GatedNetwork checks the counts (``GatedNetwork.check_subnet``): exactly
    ``kept_count(width, size)`` True per entry, every gated name present once.
    The masks may live on any device; CPU tensors cost no synchronisation.
    """

    channels: dict = dataclasses.field(default_factory=dict)
    paths: dict = dataclasses.field(default_factory=dict)


def kept_count(width: float, size: int) -> int:
    """ceil(width * size), at least 1 for size >= 1. width * size is rounded to 9 decimals first,
    so that binary rounding of width (0.7 * 10 = 7.000000000000001 in some orders) cannot add one."""
    if size == 0:
        return 0
    return min(size, max(1, math.ceil(round(width * size, 9))))


def gated_layers(model: nn.Module, layers=None) -> list[str]:
    """Names of the gated modules of ``model`` in the model's module order: path-gated residual
    blocks and channel-gated layers (see the module docstring for which).

    Args:
        model: the network.
        layers: None for the automatic choice, or a list of module names of
            ``model`` (as in ``model.named_modules()``) to gate.

    Returns:
        The names, each block followed by its channel-gated layers.
    """
    _check_model(model)
    modules = _named_modules(model)
    if layers is None:
        # Each module once, by its first name: a module registered under two names (an alias such as
        # model.tail = model.layer4) is one layer, gated once.
        unique = dict(model.named_modules())
        blocks = [name for name, module in unique.items() if name and _residual_parts(module) is not None]
        if blocks:
            names = blocks + [f"{block}.{child}" for block in blocks for child in _residual_parts(modules[block])[0]]
        else:
            names = [name for name, module in unique.items() if isinstance(module, _BatchNorm)]
        if not names:
            raise ValueError(f"model ({type(model).__name__}) has no residual blocks (BasicBlock, Bottleneck) and no "
                             f"batch-norm layers to gate: name the layers to gate with layers=[...]")
    else:
        if isinstance(layers, str) or not isinstance(layers, Sequence):
            raise TypeError(f"layers must be None or a list of module names, got {type(layers).__name__}")
        for name in layers:
            if not isinstance(name, str):
                raise TypeError(f"layers must hold module names (str), got {type(name).__name__}")
        unknown = [name for name in layers if name not in modules or name == ""]
        if unknown:
            raise ValueError(f"layers names no submodule of model ({type(model).__name__}): {unknown}")
        if not layers:
            raise ValueError("layers must name at least one module to gate, got an empty list")
        seen = {}
        for name in layers:
            other = seen.setdefault(id(modules[name]), name)
            if other != name or layers.count(name) > 1:
                raise ValueError(f"layers must name each module once, got {name!r}"
                                 + (f" and {other!r} (the same module)" if other != name else " twice"))
        names = list(layers)
    order = {name: index for index, name in enumerate(modules)}
    return sorted(names, key=order.__getitem__)


class GatedNetwork:
    """A model with subnet gates: ``gn(x, subnets)`` runs the model with the subnets' gates.

    Args:
        model: the network; it is used, not copied (the gates exist only during
            a gated call, so ``model(x)`` stays the full network). For activation
            checkpointing, checkpoint the gated call
            (``checkpoint(gated, x, subnets, use_reentrant=False)``), not a region
            inside the model: that region's recompute in the backward would run
            without the gates.
        width: rho in (0, 1]: the fraction of channels and paths a subnet keeps.
        layers: None or module names to gate (``gated_layers``).
        example_input: an input for one dry forward (no gates, no gradient,
            statistics untouched) that finds the channel counts of named layers
            that do not carry them (num_features, out_channels, out_features,
            num_channels); not needed otherwise.
        backend: the channel_gate backend ("auto", "cuda", "triton", "cpu", "reference").

    Attributes:
        blocks: path-gated block names; layers: channel-gated layer names.
        channels: layer name -> C (block name -> its output channels); names:
            blocks and layers in module order.
        decisions: one Decision per name (same order): ("paths", 2, ceil(rho*2))
            for a block, ("channels", C, ceil(rho*C)) for a layer: block by
            block, its paths and then its layers' channels, as the EWS
            controller decides them.
    """

    def __init__(self, model: nn.Module, *, width: float = 0.7, layers=None, example_input=None,
                 backend: str = "auto") -> None:
        self.width = _check_width(width)
        self.names = gated_layers(model, layers)
        self.model = model
        self.backend = _backend.check_backend_name(backend)
        modules = _named_modules(model)
        self.blocks = [name for name in self.names if _residual_parts(modules[name]) is not None]
        self.layers = [name for name in self.names if name not in self.blocks]
        self.channels = self._channel_counts(modules, example_input)
        self.decisions = [Decision("paths", len(PATHS), kept_count(self.width, len(PATHS))) if name in self.blocks
                          else Decision("channels", self.channels[name], kept_count(self.width, self.channels[name]))
                          for name in self.names]

    def __repr__(self) -> str:
        return (f"GatedNetwork({type(self.model).__name__}, width={self.width}, {len(self.blocks)} path-gated blocks, "
                f"{len(self.layers)} channel-gated layers)")

    # ------------------------------------------------------------------ subnets

    def full_subnet(self) -> Subnet:
        """The subnet that keeps every channel and path: the full network (its gates are skipped)."""
        return self._subnet([torch.ones(decision.size, dtype=torch.bool) for decision in self.decisions])

    def random_subnet(self, generator: torch.Generator | None = None) -> Subnet:
        """A uniformly random subnet: per decision, ``keep`` of ``size`` items drawn without replacement
        (torch.randperm with ``generator``, a CPU torch.Generator, or torch's default)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        masks = []
        for decision in self.decisions:
            mask = torch.zeros(decision.size, dtype=torch.bool)
            mask[torch.randperm(decision.size, generator=generator)[:decision.keep]] = True
            masks.append(mask)
        return self._subnet(masks)

    def subnet(self, choices) -> Subnet:
        """The subnet of one choice per decision (in ``decisions`` order): each the indices of the kept
        items (a sequence or an int tensor of ``keep`` distinct values in [0, size)) or a bool mask (size,)."""
        if isinstance(choices, (str, torch.Tensor)) or not isinstance(choices, Sequence):
            raise TypeError(f"choices must be a sequence of one index set per decision, got {type(choices).__name__}")
        if len(choices) != len(self.decisions):
            raise ValueError(f"choices must hold one entry per decision ({len(self.decisions)}), got {len(choices)}")
        masks = []
        for name, decision, choice in zip(self.names, self.decisions, choices):
            index = torch.as_tensor(choice).detach().to("cpu")
            if index.dtype == torch.bool:
                masks.append(index)  # its shape is checked with the subnet's
                continue
            if index.numel() == 0:
                index = index.to(torch.int64)  # [] reads as float32; it selects nothing
            index = index.reshape(-1)
            if index.is_floating_point() or index.is_complex():
                raise TypeError(f"choices for {name} must be integer indices or a bool mask, got {index.dtype}")
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= decision.size):
                raise ValueError(f"choices for {name} must be indices in [0, {decision.size}), got {index.tolist()}")
            mask = torch.zeros(decision.size, dtype=torch.bool)
            mask[index] = True
            if int(mask.sum()) != index.numel():
                raise ValueError(f"choices for {name} must be distinct indices, got {index.tolist()}")
            masks.append(mask)
        subnet = self._subnet(masks)
        self.check_subnet(subnet)
        return subnet

    def check_subnet(self, subnet: Subnet) -> None:
        """Raise a ValueError (TypeError for wrong types) unless subnet gates exactly this network's layers
        and blocks, keeping exactly ``keep`` of each decision's items (or everything: the full subnet)."""
        self._stacked_gates([subnet])

    def _subnet(self, masks) -> Subnet:
        subnet = Subnet()
        for name, decision, mask in zip(self.names, self.decisions, masks):
            (subnet.paths if decision.kind == "paths" else subnet.channels)[name] = mask
        return subnet

    # ------------------------------------------------------------------ forwards

    def __call__(self, x: torch.Tensor, subnets=None):
        """The model's output on x with gates.

        Args:
            x: the model's input, batch first: N samples for one Subnet (all
                gated alike), S*N samples for a list of S subnets (copy s =
                rows s*N..(s+1)*N-1 gated by subnets[s]).
            subnets: a Subnet, a list of S Subnets, or None: the plain model(x), no gates
                (and, in train mode, running statistics updated as usual).

        Returns:
            The model's output. Running statistics are untouched (module docstring).
        """
        if subnets is None:
            return self.model(x)
        subnets = _subnet_list(subnets)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor batch, got {type(x).__name__}")
        copies = len(subnets)
        if x.dim() == 0 or x.shape[0] % copies != 0:
            raise ValueError(f"x must hold S*N samples for S = {copies} subnets (the batch repeated S times), got "
                             f"shape {tuple(x.shape)}")
        gates = self._stacked_gates(subnets)
        with self._gated(gates, x.shape[0] // copies, x.device), _statistics_untouched(self.model, copies):
            return self.model(x)

    def logits(self, x: torch.Tensor, subnets) -> torch.Tensor:
        """(S, N, ...) outputs of S subnets on the same batch x (N, ...), in one forward of the batch
        repeated S times (with gradients, if enabled). One Subnet gives S = 1."""
        subnets = _subnet_list(subnets)
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError(f"x must be a torch.Tensor batch (N, ...), got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else 'a 0-d tensor'}")
        count, batch = len(subnets), x.shape[0]
        out = self(x.repeat(count, *([1] * (x.dim() - 1))), subnets)
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != count * batch:
            raise ValueError(f"model must return one output row per sample, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return out.view(count, batch, *out.shape[1:])

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, subnets) -> torch.Tensor:
        """(S,) float32 accuracies of S subnets on (x (N, ...), y (N,) class indices): one forward of
        the batch repeated S times under no_grad, the model in the mode the caller set (train mode:
        each copy normalised by its own batch statistics; running statistics untouched)."""
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            _checks.check_target(y, x.shape[0], x.device, "y")
        with torch.no_grad():
            out = self.logits(x, subnets)
            if out.dim() != 3:
                raise ValueError(f"evaluate needs (N, K) logits from the model, got {tuple(out.shape[1:])} per copy")
            # An index outside [0, K) would silently count as a miss.
            _checks.check_target_values(y, out.shape[-1], "y")
            return (out.argmax(-1) == y).to(torch.float32).mean(1)

    # ------------------------------------------------------------------ internals

    def _channel_counts(self, modules: dict, example_input) -> dict:
        counts, missing = {}, []
        for name in self.layers:
            count = _channel_count(modules[name])
            if count is None:
                missing.append(name)
            else:
                counts[name] = count
        if missing and example_input is None:
            raise ValueError(f"cannot tell the channel count of layers {missing} (no num_features, out_channels, "
                             f"out_features or num_channels): pass example_input= for one dry forward")
        if missing:
            found = {}

            def record(name):
                def hook(module, inputs, output):
                    found.setdefault(name, _output_channels(name, output))
                return hook

            hooks = [modules[name].register_forward_hook(record(name)) for name in missing]
            try:
                with torch.no_grad(), _statistics_untouched(self.model, 1):
                    self.model(example_input)
            finally:
                for hook in hooks:
                    hook.remove()
            never = [name for name in missing if name not in found]
            if never:
                raise ValueError(f"layers {never} did not run in the forward of example_input")
            counts.update(found)
        for name in self.blocks:
            # A block's path gates span its output channels, those of its residual path's last batch norm.
            counts[name] = modules[name].get_submodule(_residual_parts(modules[name])[1]).num_features
        return counts

    def _stacked_gates(self, subnets: list) -> dict:
        """name -> (S, size) bool on the CPU, checked: the network's names exactly, and in each subnet
        either exactly ``keep`` items of every decision or every item of every decision (the full subnet)."""
        many = len(subnets) > 1
        for index, subnet in enumerate(subnets):
            label = _label(index, many)
            if not isinstance(subnet, Subnet):
                raise TypeError(f"subnets must be Subnet objects, got {type(subnet).__name__}")
            for kind, expected in (("channels", self.layers), ("paths", self.blocks)):
                table = getattr(subnet, kind)
                if not isinstance(table, dict):
                    raise TypeError(f"{label}.{kind} must be a dict name -> bool mask, got {type(table).__name__}")
                unknown = sorted(set(table) - set(expected))
                absent = [name for name in expected if name not in table]
                if unknown or absent:
                    what = "layers" if kind == "channels" else "blocks"
                    problems = [f"unknown names {unknown}"] if unknown else []
                    problems += [f"missing {absent}"] if absent else []
                    raise ValueError(f"{label}.{kind} must gate exactly the network's {what}: {'; '.join(problems)}")
        gates = {}
        for name, decision in zip(self.names, self.decisions):
            masks = []
            for index, subnet in enumerate(subnets):
                mask = getattr(subnet, decision.kind)[name]
                label = f"{_label(index, many)}.{decision.kind}[{name!r}]"
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                    raise TypeError(f"{label} must be a bool tensor, got "
                                    f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
                if tuple(mask.shape) != (decision.size,):
                    raise ValueError(f"{label} must have shape ({decision.size},), got {tuple(mask.shape)}")
                masks.append(mask.detach().to("cpu"))
            gates[name] = torch.stack(masks)
        if self.decisions:
            full = torch.stack([gates[name].all(1) for name in self.names]).all(0)  # (S,): the full subnet
            for name, decision in zip(self.names, self.decisions):
                kept = gates[name].sum(1)
                wrong = ((kept != decision.keep) & ~full).nonzero().flatten()
                if wrong.numel():
                    index = int(wrong[0])
                    raise ValueError(f"{_label(index, many)} keeps {int(kept[index])} {decision.kind} of {name!r}, "
                                     f"expected ceil(width * {decision.size}) = {decision.keep} (width {self.width}), "
                                     f"or all of every layer and block (the full subnet)")
        return gates

    @contextlib.contextmanager
    def _gated(self, gates: dict, batch: int, device: torch.device):
        """Forward hooks (and skip gates) that apply ``gates`` (name -> (S, size) bool) to S copies of
        ``batch`` samples, for the duration of the context."""
        modules = _named_modules(self.model)
        targets, masks = [], []  # (kind, module name or block, expected channels), per-sample packed mask
        for name in self.layers:
            if not bool(gates[name].all()):
                targets.append(("hook", name, self.channels[name]))
                masks.append(pack_channel_keep(gates[name]))
        for name in self.blocks:
            row_bytes = (self.channels[name] + 7) // 8
            for path, gate in zip(PATHS, gates[name].unbind(1)):
                if not bool(gate.all()):
                    targets.append((path, name, self.channels[name]))
                    masks.append(torch.where(gate, 255, 0).to(torch.uint8).view(-1, 1).expand(-1, row_bytes))
        masks = _per_sample(masks, batch, device)
        handles, installed = [], []
        try:
            for (kind, name, channels), mask in zip(targets, masks):
                if kind == "hook":
                    handles.append(modules[name].register_forward_hook(self._hook(name, mask, channels)))
                    continue
                block = modules[name]
                if kind == "residual":
                    end = block.get_submodule(_residual_parts(block)[1])
                    handles.append(end.register_forward_hook(self._hook(f"{name} (residual path)", mask, channels)))
                elif block.downsample is not None:
                    handles.append(block.downsample.register_forward_hook(
                        self._hook(f"{name} (skip path)", mask, channels)))
                else:
                    installed.append(_install_skip_gate(block, _SkipGate(self._hook(f"{name} (skip path)", mask,
                                                                                      channels))))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for restore in installed:
                restore()

    def _hook(self, name: str, mask: torch.Tensor, channels: int):
        backend = self.backend

        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                raise TypeError(f"gated layer {name} must return a tensor (N, C, ...), got "
                                f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}")
            if output.shape[1] != channels or output.shape[0] != mask.shape[0]:
                raise ValueError(f"gated layer {name} returned shape {tuple(output.shape)}; its gates are for "
                                 f"{mask.shape[0]} samples of {channels} channels")
            return channel_gate(output, mask, backend=backend)

        return hook


class _SkipGate(nn.Module):
    """The skip path's gate of a block without downsample, put in as its downsample."""

    def __init__(self, hook) -> None:
        super().__init__()
        self._gate = hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gate(self, (x,), x)


def _install_skip_gate(block: nn.Module, gate: nn.Module):
    """Put gate in as block.downsample (None before); returns the function that restores the block."""
    plain = "downsample" in block.__dict__
    block.downsample = gate

    def restore():
        del block._modules["downsample"]
        if plain:
            object.__setattr__(block, "downsample", None)
        else:
            block._modules["downsample"] = None

    return restore


def _per_sample(masks: list, batch: int, device: torch.device) -> list:
    """Each (S, B) packed mask repeated to (S*batch, B), copy s in rows s*batch..; moved to device in one copy
    that the host does not wait for."""
    rows = [mask.repeat_interleave(batch, 0) for mask in masks]
    if device.type == "cpu" or not rows:
        return rows
    flat = _backend.host_to_device(torch.cat([row.reshape(-1) for row in rows]), device)
    out, start = [], 0
    for row in rows:
        out.append(flat[start:start + row.numel()].view(row.shape))
        start += row.numel()
    return out


@contextlib.contextmanager
def _statistics_untouched(model: nn.Module, copies: int):
    """Normalisation layers that use batch statistics run without their running buffers (so none
    is read or written) and, with copies > 1, batch norms normalise each copy on its own."""
    changed = []
    try:
        for module in model.modules():
            if not isinstance(module, _NormBase) or not (module.training or module.running_mean is None):
                continue
            buffers = {name: module._buffers[name] for name in ("running_mean", "running_var", "num_batches_tracked")
                       if module._buffers.get(name) is not None}
            for name in buffers:
                module._buffers[name] = None
            own_forward = module.__dict__.get("forward")
            if copies > 1 and isinstance(module, _BatchNorm):
                module.forward = _per_copy_batch_norm(module, copies)
            changed.append((module, buffers, own_forward))
        yield
    finally:
        for module, buffers, own_forward in changed:
            module._buffers.update(buffers)
            if own_forward is not None:
                module.forward = own_forward
            else:
                module.__dict__.pop("forward", None)


def _per_copy_batch_norm(module: _BatchNorm, copies: int):
    """A batch-norm forward for input (S*N, C, ...) that normalises each copy of N samples by its own
    batch statistics: the module's own forward on each copy (a contiguous slice of the batch, as a
    separate forward would see it), the S results concatenated. The module's own, not F.batch_norm:
    a subclass may add to it (timm's BatchNormAct2d applies its activation). With the running
    buffers set aside, it normalises by batch statistics."""
    own_forward = module.__dict__.get("forward") or type(module).forward.__get__(module)

    def forward(input: torch.Tensor) -> torch.Tensor:
        return torch.cat([own_forward(part) for part in input.split(input.shape[0] // copies)])

    return forward


def _residual_parts(module: nn.Module):
    """(channel-gated child names, residual-end child name) of a recognised residual block, else None."""
    if type(module).__name__ not in BLOCK_CLASS_NAMES or not hasattr(module, "downsample"):
        return None
    if module.downsample is not None and not isinstance(module.downsample, nn.Module):
        return None
    norms = []
    for name in ("bn1", "bn2", "bn3"):
        if not isinstance(getattr(module, name, None), _BatchNorm):
            break
        norms.append(name)
    if len(norms) < 2:
        return None
    return norms[:-1], norms[-1]


def _channel_count(module: nn.Module):
    for attribute in ("num_features", "out_channels", "out_features", "num_channels"):
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _output_channels(name: str, output) -> int:
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        raise TypeError(f"gated layer {name} must return a tensor (N, C, ...), got "
                        f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}")
    return output.shape[1]


def _named_modules(model: nn.Module) -> dict:
    return dict(model.named_modules(remove_duplicate=False))


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _check_width(width) -> float:
    if not _checks.is_real(width):
        raise TypeError(f"width must be a real number in (0, 1], got {type(width).__name__}")
    fraction = _checks.as_float(width)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width}")
    return fraction


def _subnet_list(subnets) -> list:
    if isinstance(subnets, Subnet):
        return [subnets]
    if isinstance(subnets, (list, tuple)) and subnets:
        return list(subnets)
    raise TypeError(f"subnets must be a Subnet or a non-empty list of Subnets, got "
                    f"{type(subnets).__name__ if not isinstance(subnets, (list, tuple)) else 'an empty list'}")


def _label(index: int, many: bool) -> str:
    return f"subnets[{index}]" if many else "subnet"
