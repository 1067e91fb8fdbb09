"""What a layer's forward used beside its input, kept for activation checkpointing's recompute.

``torch.utils.checkpoint`` drops a region's activations and runs its forward
again in the backward. It restores torch's random state for that recompute, so
a seed drawn there is the original forward's, but not a module's attributes:
CamDrop's targets may be gone by then (the backward runs after ``with
cam_targets``) and its step counter has moved on; Active DropBlock's step has
put its policy index away. Several forwards may wait for one backward (a clean
and an adversarial pass, a layer used twice, two steps' losses summed), so one
slot per layer would give every recompute the last forward's state.

``ForwardRecords`` keeps each eager training forward's state under a key of
torch's CPU random state as the forward starts and of the input's shape
(``forward_key``): the recompute starts from the same state with an input of
the same shape, and finds its own forward's entry. Two forwards share a key
only when nothing was drawn between them (the older one then drew no seed:
it dropped nothing, and any state of the same shape recomputes it alike; Active
DropBlock's step, whose policy 0.0 draws nothing, writes the chosen policy's
state last) or when the caller reset the generator between them.
"""
import collections

import torch

from robustdrop import _checks

__all__ = ["ForwardRecords", "forward_key"]


def forward_key(x: torch.Tensor) -> int | None:
    """A hash of torch's default CPU generator's state and x's shape. Every seed robustdrop draws
    comes from that generator (``robustdrop._seed``), and checkpointing restores it for the
    recompute. A few microseconds. None under torch.compile, whose checkpointed regions are
    recomputed inside the compiled backward, and under torch.func transforms, where the state is
    out of Python's reach: nothing is recorded there."""
    if _checks.values_are_traced():
        return None
    return hash((torch.default_generator.get_state().numpy().tobytes(), tuple(x.shape)))


class ForwardRecords:
    """The last ``capacity`` forwards' states, by ``forward_key``; the oldest go first."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._states: collections.OrderedDict = collections.OrderedDict()

    def remember(self, key: int, state) -> None:
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)

    def recall(self, key: int):
        """The state remembered under ``key``, or None."""
        return self._states.get(key)

    def latest(self):
        """The most recent forward's state, or None."""
        return next(reversed(self._states.values()), None)
