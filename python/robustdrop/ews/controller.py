"""EWS's controller (the paper's Section 3.2): an LSTM policy over subnets, trained by
policy gradient to find subnets of low accuracy.

The policy makes a sequence of decisions, block by block: for a residual block, which
of its ``n_i`` paths stay, then, for each gated layer of the block, which of its ``c_j``
channels stay. Decision ``t`` keeps exactly ``keep_t`` of its ``size_t`` items::

    h_t, c_t = LSTMCell(input_t, (h_{t-1}, c_{t-1}))     input_0 = a learned constant (H,)
    l_t = W_t h_t + b_t                                   item logits (size_t,)
    order_t ~ PL(l_t, keep_t)                             keep_t distinct items, in draw order
    input_{t+1} = mean of E_t[i] over the kept items i    E_t: (size_t, H) item embeddings

``PL(l, k)`` draws ``k`` items one after the other without replacement, each from the
softmax of ``l`` over the items not drawn yet (Plackett-Luce), sampled exactly as the
``k`` largest of ``l + Gumbel noise`` in decreasing order. The log-probability of the
draw ``i_1..i_k`` is::

    log p = sum_j [ l[i_j] - logsumexp(l[m] for m not in {i_1..i_{j-1}}) ]

(the ordered draw's probability; the set's probability would sum over its k! orders,
and REINFORCE is unbiased with either). The remaining items at draw ``j`` are the
items never drawn and ``i_j..i_k``, so every normaliser is a logaddexp of one
logsumexp and a reversed logcumsumexp: one pass, no cancellation. A decision with
``keep == size`` has one outcome: log-probability 0, entropy 0 (GatedNetwork's path
decisions at width > 0.5). The channels of a block whose residual path is dropped are
drawn and scored all the same: they do not change the subnet, and leaving their terms
out would bias the gradient, since later LSTM steps depend on them.

The entropy of a decision is that of its softmax ``softmax(l_t)`` (the distribution of
its first draw; the later draws are its renormalised restrictions); a sample's
entropy is the sum over its decisions.

Training (``update``): REINFORCE on the reward ``-accuracy`` (the controller seeks weak
subnets, the paper's Eq. 1 ``min E[R(alpha)]``) with a moving-average baseline ``b``
and an entropy bonus::

    loss = -mean_i[(r_i - b) * log p_i] - entropy_weight * mean_i[H_i]
    b <- decay * b + (1 - decay) * mean_i r_i         (b starts at the first batch's mean)

then one step of the controller's own Adam optimizer.
"""
import math

import torch
from torch import nn

from robustdrop._checks import check_non_negative, check_positive_int, real_number
from robustdrop.ews.gates import KINDS, Decision, GatedNetwork, Subnet

__all__ = ["Controller", "plackett_luce_log_prob", "choices_to_masks"]


class Controller(nn.Module):
    """The LSTM policy over subnets (see the module docstring for the maths).

    Args:
        decisions: the decisions in order, each ``(kind, size, keep)`` (a
            ``robustdrop.ews.gates.Decision`` or a plain tuple): kind "paths" or
            "channels", keep of size items stay (1 <= keep <= size). Built from a
            GatedNetwork by ``for_network``.
        names: one name per decision, the keys of the Subnets ``sample`` returns (a
            block's or layer's module name); default "0", "1", ...
        hidden_size: the LSTM's width H.
        entropy_weight: the entropy bonus's weight (>= 0).
        baseline_decay: the moving-average baseline's decay, in [0, 1).
        lr: the learning rate of the controller's Adam optimizer (> 0).

    Attributes:
        decisions: tuple of ``Decision``; names: tuple of str.
        network: the GatedNetwork of ``for_network``, else None.
        optimizer: the controller's own ``torch.optim.Adam`` over its parameters.
        baseline: 0-d float32 buffer, the moving average of the rewards (NaN before the
            first update).
        updates: 0-d int64 buffer, the number of ``update`` calls.
    """

    def __init__(self, decisions, *, names=None, hidden_size: int = 64, entropy_weight: float = 1e-3,
                 baseline_decay: float = 0.95, lr: float = 3.5e-4) -> None:
        super().__init__()
        self.decisions = _check_decisions(decisions)
        self.names = _check_names(names, len(self.decisions))
        self.hidden_size = check_positive_int(hidden_size, "hidden_size")
        self.entropy_weight = check_non_negative(entropy_weight, "entropy_weight")
        self.baseline_decay = _check_decay(baseline_decay)
        self.lr = _check_lr(lr)
        self.network = None
        self.start = nn.Parameter(torch.empty(self.hidden_size))
        self.cell = nn.LSTMCell(self.hidden_size, self.hidden_size)
        self.heads = nn.ModuleList(nn.Linear(self.hidden_size, d.size) for d in self.decisions)
        self.embeddings = nn.ModuleList(nn.Embedding(d.size, self.hidden_size) for d in self.decisions)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -0.1, 0.1)
        for head in self.heads:
            nn.init.zeros_(head.bias)  # a near-uniform first policy
        self.register_buffer("baseline", torch.tensor(float("nan")))
        self.register_buffer("updates", torch.tensor(0, dtype=torch.int64))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)

    @classmethod
    def for_network(cls, network: GatedNetwork, **options) -> "Controller":
        """The controller of a ``GatedNetwork``'s subnets: its ``decisions`` and ``names``.

        Decisions come block by block, in module order: a path-gated block's paths, then
        the channels of each gated layer inside it (layers outside every block: their
        channels, in module order); each keeps ``ceil(width * size)`` items. ``sample``
        returns Subnets that ``network`` accepts. ``options`` go to ``Controller``.

        The controller stays on the CPU (move it with ``.to``, before its first update):
        it is small and sequential, and GatedNetwork reads subnet masks on the CPU.
        """
        if not isinstance(network, GatedNetwork):
            raise TypeError(f"network must be a robustdrop.ews.GatedNetwork, got {type(network).__name__}")
        controller = cls(network.decisions, names=network.names, **options)
        object.__setattr__(controller, "network", network)  # a reference, never a submodule of the policy
        return controller

    @property
    def device(self) -> torch.device:
        return self.start.device

    def sample(self, count: int = 1, *, generator: torch.Generator | None = None):
        """Draw ``count`` subnets from the policy.

        Args:
            count: the number of subnets S (>= 1).
            generator: a torch.Generator on the controller's device for the Gumbel noise;
                None uses torch's default generator (``torch.manual_seed`` repeats runs).

        Returns:
            (subnets, log_probs, entropies): a list of S ``Subnet`` (each with bool keep
            masks (size,) on the CPU, keyed by the decisions' names),
            log_probs (S,) and entropies (S,) float32 with their graph to the
            controller's parameters (sample under ``torch.no_grad()`` when only the
            subnets are wanted).
        """
        choices, log_probs, entropies = self.sample_choices(count, generator=generator)
        return self.to_subnets(choices), log_probs, entropies

    def sample_choices(self, count: int = 1, *, generator: torch.Generator | None = None):
        """As ``sample``, with each decision's draw instead of Subnet objects.

        Returns:
            (choices, log_probs, entropies): choices a list, one per decision, of int64
            (S, keep) item indices in draw order; log_probs (S,), entropies (S,).
        """
        count = check_positive_int(count, "count")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        return self._run(count, None, generator)

    def score(self, choices):
        """The log-probabilities and entropies of given draws (teacher forcing).

        Args:
            choices: one int64 (S, keep) tensor per decision, item indices in draw order,
                as ``sample_choices`` returns them.

        Returns:
            (log_probs (S,), entropies (S,)) with their graph; equal to what
            ``sample_choices`` returned for the same draws and parameters.
        """
        choices = self._check_choices(choices)
        return self._run(choices[0].shape[0], choices, None)[1:]

    def to_subnets(self, choices) -> list[Subnet]:
        """Subnet objects for draws (one int64 (S, keep) tensor per decision), masks on the CPU
        (one copy from the controller's device)."""
        masks = torch.cat(choices_to_masks(choices, self.decisions), dim=1).cpu()
        subnets = []
        for row in masks:
            subnet = Subnet()
            for decision, name, mask in zip(self.decisions, self.names, row.split([d.size for d in self.decisions])):
                (subnet.paths if decision.kind == "paths" else subnet.channels)[name] = mask
            subnets.append(subnet)
        return subnets

    def update(self, log_probs: torch.Tensor, entropies: torch.Tensor, rewards) -> dict:
        """One REINFORCE step of the controller's Adam (the module docstring's loss).

        Args:
            log_probs: (S,) from ``sample``, with their graph.
            entropies: (S,) from ``sample``, with their graph.
            rewards: (S,) the rewards, higher is better: ``-accuracy`` of each subnet
                (a tensor or a sequence of floats; not differentiated).

        Returns:
            dict of floats: loss, reward (mean), baseline (the one the advantages used),
            entropy (mean), log_prob (mean).
        """
        log_probs, entropies, rewards = self._check_update(log_probs, entropies, rewards)
        mean_reward = rewards.mean()
        baseline = mean_reward if bool(torch.isnan(self.baseline)) else self.baseline.clone()
        advantages = rewards - baseline
        entropy = entropies.mean()
        loss = -(advantages * log_probs).mean() - self.entropy_weight * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.baseline.copy_(self.baseline_decay * baseline + (1.0 - self.baseline_decay) * mean_reward)
            self.updates += 1
        return {"loss": float(loss.detach()), "reward": float(mean_reward), "baseline": float(baseline),
                "entropy": float(entropy.detach()), "log_prob": float(log_probs.detach().mean())}

    def extra_repr(self) -> str:
        return (f"decisions={len(self.decisions)}, hidden_size={self.hidden_size}, "
                f"entropy_weight={self.entropy_weight}, baseline_decay={self.baseline_decay}, lr={self.lr}")

    def _run(self, count: int, choices, generator):
        """Step the LSTM through every decision; draw (choices None) or score given draws."""
        device = self.device
        inputs = self.start.expand(count, self.hidden_size)
        state = None
        drawn, log_probs, entropies = [], [], []
        for index, decision in enumerate(self.decisions):
            state = self.cell(inputs, state)
            logits = self.heads[index](state[0])  # (S, size)
            if choices is not None:
                order = choices[index]
            elif decision.keep == decision.size:
                order = torch.arange(decision.size, device=device).expand(count, -1)
            else:
                order = _gumbel_top_k(logits.detach(), decision.keep, generator)
            if decision.keep < decision.size:
                log_probs.append(plackett_luce_log_prob(logits, order))
                entropies.append(-(logits.softmax(1) * logits.log_softmax(1)).sum(1))
            drawn.append(order)
            kept = torch.zeros(count, decision.size, dtype=logits.dtype, device=device).scatter_(
                1, order, 1.0 / decision.keep)
            inputs = kept @ self.embeddings[index].weight
        # A sum over no parameter entries: exactly 0, yet with a graph, so that log_probs carry one
        # even when no decision draws (width 1 keeps everything) and an update is a zero step.
        zero = self.start[:0].sum().expand(count)
        return drawn, sum(log_probs, zero), sum(entropies, zero)

    def _check_choices(self, choices) -> list[torch.Tensor]:
        if not isinstance(choices, (list, tuple)) or len(choices) != len(self.decisions):
            raise ValueError(f"choices must be a list of one (S, keep) index tensor per decision "
                             f"({len(self.decisions)}), got {type(choices).__name__} of length "
                             f"{len(choices) if isinstance(choices, (list, tuple)) else '-'}")
        count = None
        for index, (order, decision) in enumerate(zip(choices, self.decisions)):
            if not isinstance(order, torch.Tensor) or order.dtype != torch.int64:
                raise TypeError(f"choices[{index}] must be an int64 tensor (S, keep)")
            if order.dim() == 2 and count is None:
                count = order.shape[0]
            if order.dim() != 2 or tuple(order.shape) != (count, decision.keep) or count < 1:
                raise ValueError(f"choices[{index}] must have shape (S, keep) = ({count or 'S'}, {decision.keep}) with "
                                 f"S >= 1 as every decision's, got {tuple(order.shape)}")
            if order.device != self.device:
                raise ValueError(f"choices[{index}] must be on the controller's device {self.device}, "
                                 f"got {order.device}")
            if order.numel() and (int(order.min()) < 0 or int(order.max()) >= decision.size):
                raise ValueError(f"choices[{index}] must hold item indices in [0, {decision.size})")
            if bool((order.sort(1).values.diff(dim=1) == 0).any()):
                raise ValueError(f"choices[{index}] must hold distinct items in each row")
        return list(choices)

    def _check_update(self, log_probs, entropies, rewards):
        for name, value in (("log_probs", log_probs), ("entropies", entropies)):
            if not isinstance(value, torch.Tensor) or value.dim() != 1:
                raise ValueError(f"{name} must be a 1-D tensor (S,) from sample(), got "
                                 f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        rewards = torch.as_tensor(rewards).detach().to(device=log_probs.device, dtype=log_probs.dtype).reshape(-1)
        if not log_probs.shape == entropies.shape == rewards.shape:
            raise ValueError(f"log_probs, entropies and rewards must have one shape (S,), got "
                             f"{tuple(log_probs.shape)}, {tuple(entropies.shape)} and {tuple(rewards.shape)}")
        if log_probs.numel() == 0:
            raise ValueError("rewards must not be empty")
        if not bool(torch.isfinite(rewards).all()):
            raise ValueError("rewards must be finite")
        if not log_probs.requires_grad:
            raise ValueError("log_probs must carry their graph: sample() outside torch.no_grad() for an update")
        return log_probs, entropies, rewards


def plackett_luce_log_prob(logits: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """log P(order) of drawing ``order`` (S, k) one by one without replacement from
    ``softmax(logits)`` (S, n) over the items not drawn yet; returns (S,).

    ``sum_j l[i_j] - logsumexp(l over the items left at draw j)``; the items left at
    draw j are the undrawn ones and ``i_j..i_k``.
    """
    drawn = logits.gather(1, order)  # (S, k)
    rest = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, True), -math.inf)
    rest = rest.logsumexp(1, keepdim=True)  # (S, 1); -inf when k == n
    suffix = drawn.flip(1).logcumsumexp(1).flip(1)  # logsumexp(drawn[:, j:])
    return (drawn - torch.logaddexp(suffix, rest)).sum(1)


def choices_to_masks(choices, decisions) -> list[torch.Tensor]:
    """Bool keep masks (S, size), one per decision, from draws (S, keep) int64."""
    return [torch.zeros(order.shape[0], decision.size, dtype=torch.bool, device=order.device).scatter_(1, order, True)
            for order, decision in zip(choices, decisions)]


def _gumbel_top_k(logits: torch.Tensor, k: int, generator) -> torch.Tensor:
    """k items per row drawn without replacement from softmax(logits), in draw order:
    the k largest of logits + Gumbel(0, 1) noise, decreasing (Plackett-Luce)."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(logits.dtype).tiny)))
    return torch.topk(logits + gumbel, k, dim=1, sorted=True).indices


def _check_decisions(decisions) -> tuple[Decision, ...]:
    if isinstance(decisions, (str, bytes)) or not hasattr(decisions, "__iter__"):
        raise TypeError(f"decisions must be a list of (kind, size, keep) tuples, got {type(decisions).__name__}")
    checked = []
    for index, decision in enumerate(decisions):
        if not isinstance(decision, (tuple, list)) or len(decision) != 3:
            raise TypeError(f"decisions[{index}] must be a (kind, size, keep) tuple, got {decision!r}")
        kind, size, keep = decision
        if kind not in KINDS:
            raise ValueError(f"decisions[{index}] kind must be one of {KINDS}, got {kind!r}")
        size = check_positive_int(size, f"decisions[{index}] size")
        keep = check_positive_int(keep, f"decisions[{index}] keep")
        if keep > size:
            raise ValueError(f"decisions[{index}] keep must be <= size = {size}, got {keep}")
        checked.append(Decision(kind, size, keep))
    if not checked:
        raise ValueError("decisions must not be empty")
    return tuple(checked)


def _check_names(names, count: int) -> tuple[str, ...]:
    if names is None:
        return tuple(str(index) for index in range(count))
    if isinstance(names, str) or not hasattr(names, "__iter__"):
        raise TypeError(f"names must be None or a list of str, one per decision, got {type(names).__name__}")
    names = tuple(names)
    if len(names) != count or not all(isinstance(name, str) for name in names):
        raise ValueError(f"names must hold one str per decision ({count}), got {names!r}")
    if len(set(names)) != count:
        raise ValueError(f"names must be distinct, got {names!r}")
    return names


def _check_decay(value) -> float:
    decay = real_number(value, "baseline_decay")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"baseline_decay must be in [0, 1), got {value}")
    return decay


def _check_lr(value) -> float:
    lr = real_number(value, "lr")
    if not 0.0 < lr < math.inf:
        raise ValueError(f"lr must be > 0 and finite, got {value}")
    return lr
