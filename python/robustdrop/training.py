"""Training steps that a method needs beyond a plain forward and backward.

``active_dropblock_step`` is Active DropBlock's step (the paper's Eq. 5-6): one
forward per drop-rate policy, and the loss of the policy with the largest loss
is the one to minimise::

    model = robustdrop.models.resnet18(method="active_dropblock", stage=3)
    for images, labels in loader:
        step = robustdrop.training.active_dropblock_step(model, criterion, images, labels)
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()

``LinearRateSchedule`` is DropBlock's linear schedule of the drop rate (and the
inverted one of CamDrop's Table 5) for every DropBlock2d and CamDrop2d of a
model, stepped like a learning-rate scheduler::

    model = robustdrop.models.resnet18(method="dropblock")
    schedule = robustdrop.training.LinearRateSchedule(model, total_steps=len(loader) * epochs)
    for images, labels in loader:
        ...
        optimizer.step()
        schedule.step()
"""
import dataclasses

import torch
from torch import nn

from robustdrop._checks import as_float, check_choice, check_positive_int, check_probability, is_integral, is_real
from robustdrop.nn._rate import ScheduledRate
from robustdrop.nn.active_drop_block import ActiveDropBlock2d

__all__ = ["ActiveDropBlockStep", "LinearRateSchedule", "active_dropblock_step"]

MODES = ("sequential", "batched")


@dataclasses.dataclass
class ActiveDropBlockStep:
    """The outcome of one Active DropBlock step.

    Attributes:
        losses: (P,) the loss of each policy, detached, in pool order.
        policy: the drop rate of the largest loss (the first, on a tie; a NaN
            loss counts as the largest, as in ``torch.argmax``).
        policy_index: its index in the pool. With a ``change_threshold``, a
            layer may have re-picked another rate in that forward (Algorithm 1):
            its ``last_policy`` is the rate it applied there.
        loss: that loss, with its graph: ``loss.backward()`` trains with exactly
            the masks that produced ``losses[policy_index]``, and
            ``loss == losses.max()``.
    """

    losses: torch.Tensor
    policy: float
    policy_index: int
    loss: torch.Tensor


def active_dropblock_step(model: nn.Module, loss_fn, inputs: torch.Tensor, targets, *,
                          mode: str = "sequential") -> ActiveDropBlockStep:
    """Evaluate every policy of the model's ActiveDropBlock2d layers; keep the largest loss.

    Every ActiveDropBlock2d in ``model`` uses the same policy in a forward (its
    own pool's value at that index; the pools must have one length).

    Args:
        model: a module holding at least one ActiveDropBlock2d, in training mode,
            as its ActiveDropBlock2d layers must be (in eval mode they are the
            identity, so every policy would give the same loss): a ValueError
            otherwise. Other layers may be in eval mode (a frozen BatchNorm).
        loss_fn: ``loss_fn(outputs, targets)`` -> a scalar tensor.
        inputs: the batch (N, ...), fed to ``model`` as its one argument.
        targets: passed to ``loss_fn`` as they are.
        mode: ``"sequential"``: one forward of the batch per policy. Each
            forward records its graph, and only the largest loss's graph is
            kept (at most two at a time). The model's buffers (BatchNorm
            statistics, counters, a mask built at the first forward) end as
            if only the chosen policy's forward had run, and each layer's
            ``last_policy`` is the rate it applied there; if a forward or
            ``loss_fn`` raises, they are as before the step. A
            ``torch.compile``d model compiles once for the step, not once
            per policy: the layers read the policy's index as a tensor.
            ``"batched"``: one forward of the batch repeated once per
            policy (P*N samples), copy k masked with policy k and normalised
            on its own; the P losses come from the P slices of the output.
            Faster on a GPU for small batches, but layers that mix samples see
            all copies: BatchNorm's batch statistics after an ActDB layer span
            every policy, and its running statistics are updated once from the
            P*N batch. Algorithm 1's change_threshold does not apply here.

    Returns:
        ActiveDropBlockStep(losses, policy, policy_index, loss).
    """
    layers = _active_layers(model)
    check_choice(mode, "mode", MODES)
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor batch, got {type(inputs).__name__}")
    count = len(layers[0].policies)
    if mode == "sequential":
        return _sequential_step(model, layers, count, loss_fn, inputs, targets)
    if any(layer.change_threshold is not None for layer in layers):
        raise ValueError("mode='batched' does not re-pick policies: set change_threshold=None on every "
                         "ActiveDropBlock2d, or use mode='sequential'")
    return _batched_step(model, layers, count, loss_fn, inputs, targets)


def _active_layers(model: nn.Module) -> list[ActiveDropBlock2d]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    named = [(name, module) for name, module in model.named_modules() if isinstance(module, ActiveDropBlock2d)]
    if not named:
        raise ValueError(f"model has no ActiveDropBlock2d layer to choose a policy for ({type(model).__name__})")
    # In eval mode the layers are the identity: every policy would give the same loss, and policy 0.
    evaluating = [name or "model" for name, module in named if not module.training]
    if not model.training or evaluating:
        raise ValueError(f"active_dropblock_step needs model in training mode (its ActiveDropBlock2d layers are the "
                         f"identity in eval mode, so every policy would give the same loss): call model.train() "
                         f"first; got model.training = {model.training}, ActiveDropBlock2d layers in eval mode: "
                         f"{evaluating}")
    layers = [module for _, module in named]
    counts = {len(layer.policies) for layer in layers}
    if len(counts) != 1:
        raise ValueError(f"every ActiveDropBlock2d of model must have a policy pool of one length, got lengths "
                         f"{sorted(counts)}")
    return layers


def _scalar_loss(loss_fn, outputs, targets) -> torch.Tensor:
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got "
                         f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
    return loss.reshape(())


def _sequential_step(model, layers, count, loss_fn, inputs, targets) -> ActiveDropBlockStep:
    # Each forward runs on fresh copies of the buffers: a graph may keep the
    # buffers it read (BatchNorm keeps its running statistics), so they must
    # not change under it. The chosen forward's buffers are put back at the end.
    owners = _buffer_owners(model)
    originals = [module._buffers[name] for module, name in owners]
    losses, best_index, best_loss, best_buffers, best_keys, best_rates = [], 0, None, None, [], []
    # One index for every layer, changed in place: a compiled model sees the same tensor input at every
    # policy, so it compiles once for the step (ActiveDropBlock2d.step_policy_index).
    policy_index = torch.zeros(1, dtype=torch.int64)
    for layer in layers:
        layer.step_policy_index = policy_index
    try:
        for index in range(count):
            copies = [None if buffer is None else buffer.detach().clone() for buffer in originals]
            for (module, name), copy in zip(owners, copies):
                module._buffers[name] = copy
            policy_index.fill_(index)
            for layer in layers:
                layer._policy_forward_keys = []
            loss = _scalar_loss(loss_fn, model(inputs), targets)
            losses.append(loss.detach())
            if best_loss is None or _larger(loss.detach(), best_loss.detach()):
                # What the forward left: the copies, or tensors it assigned in their place.
                best_buffers = [(copy, module._buffers.get(name)) for (module, name), copy in zip(owners, copies)]
                best_index, best_loss = index, loss
                best_keys = [layer._policy_forward_keys for layer in layers]
                best_rates = [layer.last_policy for layer in layers]
    finally:
        for layer in layers:
            layer.step_policy_index = None
        for (module, name), original in zip(owners, originals):
            module._buffers[name] = original
    # The kept graph is the chosen policy's: a checkpointed layer recomputes it in the backward. Recorded
    # again, as the policy 0.0 draws no seed and so shares its key with the next policy's forward.
    for layer, keys, rate in zip(layers, best_keys, best_rates):
        for key in keys:
            layer._step_forwards.remember(key, (False, best_index))
        layer.last_policy = rate
    _keep_buffers(owners, originals, best_buffers)
    return ActiveDropBlockStep(torch.stack(losses), layers[0].policies[best_index], best_index, best_loss)


def _larger(loss: torch.Tensor, best: torch.Tensor) -> bool:
    """Whether loss displaces best as the largest so far, as torch.argmax orders them: strictly larger
    (a tie keeps the lower index), and NaN above every number (the first NaN stays)."""
    if bool(best.isnan()):
        return False
    return bool(loss.isnan()) or bool(loss > best)


def _keep_buffers(owners, originals, chosen) -> None:
    """Puts the chosen forward's buffers in the model: a copy's values into the original tensor, in
    place (whoever holds the original, an optimizer or a user's reference, sees them); a tensor that
    the forward assigned instead of its copy (a counter ``self.n = self.n + 1``, a mask built on the
    first forward) as the module's buffer."""
    with torch.no_grad():
        for (module, name), original, (copy, final) in zip(owners, originals, chosen):
            if final is not None and final is copy and original is not None and original.shape == copy.shape:
                original.copy_(copy)
            else:
                module._buffers[name] = final


def _batched_step(model, layers, count, loss_fn, inputs, targets) -> ActiveDropBlockStep:
    batch = inputs.shape[0]
    repeated = inputs.repeat(count, *([1] * (inputs.dim() - 1)))
    for layer in layers:
        layer.batched_policies = True
    try:
        outputs = model(repeated)
    finally:
        for layer in layers:
            layer.batched_policies = False
    if not isinstance(outputs, torch.Tensor) or outputs.shape[0] != count * batch:
        raise ValueError(f"model must return one output row per sample for mode='batched', got "
                         f"{tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__}")
    losses = torch.stack([_scalar_loss(loss_fn, part, targets) for part in outputs.split(batch)])
    best_index = int(torch.argmax(losses.detach()))
    return ActiveDropBlockStep(losses.detach(), layers[0].policies[best_index], best_index, losses[best_index])


def _buffer_owners(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every buffer of model, each module once; buffers registered as None too
    (a forward may set them)."""
    return [(module, name) for module in model.modules() for name in module._buffers]


class LinearRateSchedule:
    """A linear schedule of the drop rate p of every DropBlock2d and CamDrop2d in ``model``.

    At step t the rate of each layer is ``start + (end - start) * min(t, T) / T``
    with T = ``total_steps``: ``start`` at step 0, ``end`` from step T on.
    ``start`` or ``end`` None stands for each layer's own rate (its target
    rate). The defaults are DropBlock's schedule, from no drop to the target
    (its keep probability decreased linearly from 1); ``start=None, end=0.0``
    is the inverted one of CamDrop's Table 5.

    A layer's own rate is its p when a schedule first takes it over. The layer
    remembers it (with the rate the schedule last set, in its ``__dict__``, so
    it follows ``copy.deepcopy`` and pickling of the model, not its
    ``state_dict``): a later schedule on the same layers, a second training
    stage or a re-run notebook cell, aims at that rate, not at the p the first
    schedule left (0.0 at its step 0). A p set by hand since, different from
    the schedule's last rate, is the layer's own rate again.

    Making the schedule sets step 0's rates; ``step()`` advances one step, so
    call it after each optimizer step (or each epoch, with T in epochs). The
    layers take a reassigned p under torch.compile without recompiling per
    value (``robustdrop.nn.DropBlock2d``). ``state_dict()`` and
    ``load_state_dict()`` save and restore the step, the target rates, T,
    ``start`` and ``end``, for a resumed run.

    Args:
        model: a module holding at least one DropBlock2d or CamDrop2d.
        total_steps: T >= 1, the steps from ``start`` to ``end``.
        start, end: drop rates in [0, 1], or None for each layer's own p (then
            a float, not a tensor of per-sample rates).
    """

    def __init__(self, model: nn.Module, *, total_steps: int, start: float | None = 0.0,
                 end: float | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.layers = [module for module in model.modules() if isinstance(module, ScheduledRate)]
        if not self.layers:
            raise ValueError(f"model has no DropBlock2d or CamDrop2d whose rate to schedule ({type(model).__name__})")
        self.total_steps = check_positive_int(total_steps, "total_steps")
        self.start = None if start is None else check_probability(start, "start")
        self.end = None if end is None else check_probability(end, "end")
        self._own_rates = [_own_rate(layer) for layer in self.layers]
        self.targets = [self._target_rate(layer, own) for layer, own in zip(self.layers, self._own_rates)]
        self.last_step = 0
        self._set_rates()

    def _target_rate(self, layer: nn.Module, own: float | None) -> float | None:
        """The layer's own rate, which the schedule needs when start or end is None (else None)."""
        if self.start is not None and self.end is not None:
            return None
        if isinstance(layer.p, torch.Tensor):
            raise TypeError(f"the schedule's layers must have a float p when start or end is None (their own "
                            f"rate), got a tensor in {type(layer).__name__}")
        return check_probability(layer.p, "p") if own is None else own

    def rates(self) -> list[float]:
        """The rate of each scheduled layer at the current step, in ``model.modules()`` order."""
        t = min(self.last_step, self.total_steps)
        rates = []
        for target in self.targets:
            start = target if self.start is None else self.start
            end = target if self.end is None else self.end
            rates.append(end if t == self.total_steps else start + (end - start) * t / self.total_steps)
        return rates

    def step(self) -> None:
        """Advances one step and sets the layers' rates."""
        self.last_step += 1
        self._set_rates()

    def _set_rates(self) -> None:
        for layer, own, rate in zip(self.layers, self._own_rates, self.rates()):
            layer.p = rate
            if own is not None:
                layer.__dict__[_OWN_RATE] = (own, rate)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "targets": list(self.targets), "total_steps": self.total_steps,
                "start": self.start, "end": self.end}

    def load_state_dict(self, state: dict) -> None:
        """Restores what ``state_dict()`` saved (the step, the target rates, and T, start and end as
        torch's schedulers restore their settings) and sets the layers' rates. A state that does not
        fit this model is a ValueError that leaves the schedule as it was."""
        last_step, targets = state["last_step"], state["targets"]
        if not is_integral(last_step) or last_step < 0:
            raise ValueError(f"state's last_step must be an int >= 0, got {last_step!r}")
        # States saved before T, start and end were part of them keep this schedule's.
        total_steps = check_positive_int(state.get("total_steps", self.total_steps), "state's total_steps")
        start, end = (None if value is None else check_probability(value, f"state's {key}")
                      for key, value in (("start", state.get("start", self.start)),
                                         ("end", state.get("end", self.end))))
        if len(targets) != len(self.layers):
            raise ValueError(f"state has {len(targets)} target rates, but the model has {len(self.layers)} "
                             f"scheduled layers")
        targets = [None if target is None else check_probability(target, "target rate") for target in targets]
        if (start is None or end is None) and None in targets:
            raise ValueError("state has no target rate (a layer's own p) for some layer, which a schedule with "
                             "start or end None needs: it was saved by a schedule with both set")
        self.total_steps, self.start, self.end = total_steps, start, end
        self.targets = targets
        self._own_rates = [own if target is None else target for own, target in zip(self._own_rates, self.targets)]
        self.last_step = int(last_step)
        self._set_rates()


# A scheduled layer's (own rate, the rate a schedule last set): see LinearRateSchedule.
_OWN_RATE = "_schedule_own_rate"


def _own_rate(layer: nn.Module) -> float | None:
    """The layer's p when a schedule first took it over, while p is still a schedule's last rate; else p.
    None for a p that is no float rate (a tensor)."""
    p = as_float(layer.p) if is_real(layer.p) else None
    if p is None or not 0.0 <= p <= 1.0:
        return None
    remembered = layer.__dict__.get(_OWN_RATE)
    return remembered[0] if remembered is not None and remembered[1] == p else p
