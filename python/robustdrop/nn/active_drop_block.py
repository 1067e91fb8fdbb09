"""Active DropBlock (ActDB) as an nn.Module: DropBlock whose drop rate comes from a
pool of policies, the one of largest loss chosen by
``robustdrop.training.active_dropblock_step`` (the paper's Eq. 5-6).

The paper calls the pool's values gamma (Eq. 3-4) and also "drop rate"; its
experiments pool 0, 0.025, ..., 0.225 next to a vanilla DropBlock of "gamma"
0.2. robustdrop reads them as drop rates p, the probability that an element is
dropped, and derives the seed probability gamma from p as DropBlock does
(DESIGN.md 4.1). A pool value of 0 means no drop.
"""

import torch
from torch import nn

from robustdrop import _checks
from robustdrop._backend import (check_backend_name, eager_only, host_to_device, in_checkpoint_recompute,
                                 resolve_backend)
from robustdrop._seed import check_host_draw_allowed
from robustdrop.nn._fx import fx_leaf_call
from robustdrop.nn._recompute import ForwardRecords, forward_key
from robustdrop.nn._script import NotScriptable
from robustdrop.ops.block_mask import NORMALIZE_MODES, block_drop, drop_block2d, rate_per_sample

__all__ = ["ActiveDropBlock2d", "DEFAULT_POLICIES"]

# The paper's pool: drop rates from 0 to 0.225 in steps of 0.025 (ten values).
DEFAULT_POLICIES = tuple(round(0.025 * i, 3) for i in range(10))


class ActiveDropBlock2d(NotScriptable, nn.Module):
    """DropBlock over (N, C, H, W) maps with a drop rate picked from ``policies``.

    Args:
        block_size: side of the dropped squares (clamped to min(H, W)).
        policies: the pool of drop rates in [0, 1], non-empty.
        change_threshold: Algorithm 1's re-pick, off (None) by default. When
            set, a training forward whose relative change ``||y - x|| / ||x||``
            is below it is redone with another policy of the pool (in random
            order) until one changes x by at least the threshold; if none does,
            the one that changed it most is kept. It reads the norms (a
            synchronisation on a GPU) and does not apply to the batched step.
        couple_channels, normalize, eps: as ``robustdrop.drop_block2d``.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Which rate a training forward uses:

    * inside ``active_dropblock_step``: the policy the step is evaluating
      (sequential mode), or every policy at once, one per copy of the batch
      (batched mode);
    * otherwise the attribute ``policy`` when set to a rate, else a policy
      drawn uniformly from the pool with torch's default generator at each
      forward.

    Under torch.compile the drawn policy and the step's stay tensors in the
    graph, so a compiled model compiles once for the random draw and once for
    the sequential step, not once per policy. ``last_policy`` records the rate
    the last training forward used (None after a batched forward, and under
    torch.compile where the rate is a tensor). The identity in eval mode.
    ``change_threshold`` reads norms on the host: under torch.compile that part
    runs between graphs, and ``fullgraph=True`` refuses it with that reason.
    Under activation checkpointing (``torch.utils.checkpoint``) the forward
    recomputed in the backward uses the policy of the forward it recomputes,
    the step's included once the step has ended, also when several steps'
    losses wait for one backward.
    """

    def __init__(self, block_size: int, *, policies=DEFAULT_POLICIES, change_threshold: float | None = None,
                 couple_channels: bool = False, normalize: str = "batch", eps: float = 1e-6,
                 backend: str = "auto") -> None:
        super().__init__()
        self.block_size = _checks.check_positive_int(block_size, "block_size")
        self.policies = _check_policies(policies)
        self.change_threshold = _check_threshold(change_threshold)
        self.couple_channels = _checks.check_bool(couple_channels, "couple_channels")
        self.normalize = _checks.check_choice(normalize, "normalize", NORMALIZE_MODES)
        self.eps = _checks.check_non_negative(eps, "eps")
        self.backend = check_backend_name(backend)
        # A fixed rate for every training forward, when set (tests, experiments).
        self.policy: float | None = None
        # Set by active_dropblock_step (sequential mode) for the forwards it runs: the pool index of
        # the policy under evaluation, a (1,) int64 CPU tensor that the step changes in place between
        # forwards. A compiled model reads it as a tensor input, where a float rate would be a
        # constant that Dynamo recompiles for at every policy.
        self.step_policy_index: torch.Tensor | None = None
        self.batched_policies = False
        self.last_policy: float | None = None
        # (batched, policy index) of recent eager forwards that ran inside active_dropblock_step, for
        # activation checkpointing's recompute after the step; and the keys of the forwards of the step's
        # current policy, which the sequential step records again for the policy it keeps.
        self._step_forwards = ForwardRecords()
        self._policy_forward_keys: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (leaf := fx_leaf_call(self, x)) is not None:
            return leaf
        if not self.training:
            return x
        if _checks.values_are_traced():  # nothing to record: see forward_key
            return self._forward(x)
        if in_checkpoint_recompute():
            recorded = self._step_forwards.recall(forward_key(x))
            if recorded is not None:
                return self._recompute_step_forward(x, recorded)
        elif self.batched_policies or self.step_policy_index is not None:
            key, index = forward_key(x), self.step_policy_index
            self._step_forwards.remember(key, (self.batched_policies, None if index is None else int(index)))
            self._policy_forward_keys.append(key)
        return self._forward(x)

    def _recompute_step_forward(self, x: torch.Tensor, recorded: tuple[bool, int | None]) -> torch.Tensor:
        """Activation checkpointing's recompute, in the backward, of a forward that ran inside
        ``active_dropblock_step``: the step is over, so its policy is put back for the recompute.
        checkpoint restores torch's random state, so the mask seed is the original one, and the
        forward's record is the one kept under that state (``nn._recompute``). Forwards outside a
        step need nothing: their policy draw is repeated from that random state."""
        batched, index = recorded
        if batched:
            return self._forward_every_policy(x)
        outside_step = self.step_policy_index
        self.step_policy_index = torch.tensor([index])
        try:
            return self._forward(x)
        finally:
            self.step_policy_index = outside_step

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batched_policies:
            self.last_policy = None
            return self._forward_every_policy(x)
        if self.change_threshold is not None:
            return _forward_repicking(self, x)
        if _checks.values_are_traced() and (self.step_policy_index is not None or self.policy is None):
            self.last_policy = None
            index = self.step_policy_index
            if index is None:
                # Shape (1,), not (): the same one draw as eager's, and a tensor index keeps the lookup in the graph.
                index = torch.randint(len(self.policies), (1,))
            return self._forward_traced(x, index)
        rate = self._eager_policy(x.device)
        self.last_policy = rate
        return self._drop(x, rate)

    def _drop(self, x: torch.Tensor, rate: float) -> torch.Tensor:
        return drop_block2d(x, rate, self.block_size, couple_channels=self.couple_channels, normalize=self.normalize,
                            eps=self.eps, backend=self.backend)

    def _eager_policy(self, device: torch.device) -> float:
        """The rate of an eager training forward on ``device``: the step's, else the fixed policy, else a
        random draw."""
        if self.step_policy_index is not None:
            return self.policies[int(self.step_policy_index)]
        if self.policy is not None:
            return self.policy
        check_host_draw_allowed(device)
        return self.policies[int(torch.randint(len(self.policies), ()))]

    def _forward_traced(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """A training forward under torch.compile or torch.vmap with the policy of pool index ``index``
        (1,) int64: drawn here (the random policy) or the step's. The same draws as eager (the policy
        index when drawn, then the mask seed, both from torch's default generator), but the rate stays
        a tensor, given to every sample as a per-sample rate (N,): a Python float read from a tensor
        would break the graph, a float constant would recompile per policy, and under vmap with
        randomness="different" each vmapped call draws its own policy. The same gamma in float64
        as the scalar path, so the same mask bits. A policy of 0 differs in two small ways: it still
        draws a mask seed (eager skips the op and the draw), and with normalize="batch" its scale
        float32(numel / (eps + numel)) is 1 only for numel >= 34 (below, kept values move by one ulp)."""
        rates = rate_per_sample(torch.tensor(self.policies, dtype=torch.float64)[index].reshape(()), x)
        groups = x.shape[0] if self.normalize == "sample" and x.shape[0] > 0 else 1
        return self._drop_per_sample(x, rates, groups)

    def _drop_per_sample(self, x: torch.Tensor, rates: torch.Tensor, groups: int) -> torch.Tensor:
        """DropBlock with the per-sample drop rates ``rates`` (N,) float64 on x's device, the N samples
        normalised in ``groups`` consecutive groups, and a seed drawn from torch's default generator."""
        return block_drop(x, rates, self.block_size, couple_channels=self.couple_channels,
                          normalize=self.normalize != "none", eps=self.eps, normalize_groups=groups, seed=None,
                          backend=resolve_backend(self.backend, x))

    def _repick(self, x: torch.Tensor, rate: float, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Algorithm 1, steps 8-11: other policies until x changes by at least the threshold."""
        norm = torch.linalg.vector_norm(x.detach().float()).item()
        best = (relative_change(x, y, norm), rate, y)
        if best[0] >= self.change_threshold:
            return rate, y
        tried = {rate}
        for index in torch.randperm(len(self.policies)).tolist():
            candidate = self.policies[index]
            if candidate in tried:
                continue
            tried.add(candidate)
            y = self._drop(x, candidate)
            change = relative_change(x, y, norm)
            if change >= self.change_threshold:
                return candidate, y
            if change > best[0]:
                best = (change, candidate, y)
        return best[1], best[2]

    def _forward_every_policy(self, x: torch.Tensor) -> torch.Tensor:
        """x is the batch repeated once per policy: copy k gets policies[k], normalised on its own."""
        count = len(self.policies)
        if x.shape[0] % count != 0:
            raise ValueError(f"ActiveDropBlock2d in a batched step needs a batch of len(policies) = {count} equal "
                             f"copies, got x of shape {tuple(x.shape)}")
        copy_size = x.shape[0] // count
        rates = host_to_device(torch.tensor(self.policies, dtype=torch.float64), x.device)
        # Each rate copy_size times, by a broadcast: no size to compute on the device.
        rates = rates.view(count, 1).expand(count, copy_size).reshape(-1)
        groups = {"batch": count, "sample": _checks.size_at_least(x.shape[0], 1), "none": 1}[self.normalize]
        return self._drop_per_sample(x, rates, groups)

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, policies={self.policies}, change_threshold={self.change_threshold}, "
                f"couple_channels={self.couple_channels}, normalize={self.normalize!r}, eps={self.eps}, "
                f"backend={self.backend!r}")


def _forward_repicking(layer: ActiveDropBlock2d, x: torch.Tensor) -> torch.Tensor:
    """A training forward with Algorithm 1's re-pick, which branches on norms read on the host."""
    rate = layer._eager_policy(x.device)
    rate, y = layer._repick(x, rate, layer._drop(x, rate))
    layer.last_policy = rate
    return y


_forward_repicking = eager_only(_forward_repicking, "ActiveDropBlock2d's change_threshold reads norms on the host: it "
                                                    "runs between graphs, not under torch.compile(fullgraph=True)")


def relative_change(x: torch.Tensor, y: torch.Tensor, x_norm: float) -> float:
    """||y - x|| / ||x|| (0 for a zero x that stays zero)."""
    difference = torch.linalg.vector_norm((y.detach().float() - x.detach().float())).item()
    if x_norm == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / x_norm


def _check_policies(policies) -> tuple[float, ...]:
    if isinstance(policies, (str, bytes, torch.Tensor)) or not hasattr(policies, "__iter__"):
        raise TypeError(f"policies must be a sequence of drop rates, got {type(policies).__name__}")
    values = tuple(_checks.check_probability(value, "policies") for value in policies)
    if not values:
        raise ValueError("policies must hold at least one drop rate, got an empty pool")
    return values


def _check_threshold(threshold) -> float | None:
    if threshold is None:
        return None
    if not _checks.is_real(threshold):
        raise TypeError(f"change_threshold must be a real number or None, got {type(threshold).__name__}")
    value = _checks.as_float(threshold)
    if not 0.0 < value < float("inf"):
        raise ValueError(f"change_threshold must be > 0 and finite, got {threshold}")
    return value
