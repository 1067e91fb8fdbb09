"""EWS training (the paper's Algorithm 1, Eq. 2; Eq. 3-4 for adversarial training).

Iteration t of ``EWSTrainer.step(x, y)`` (t = 1, 2, ...), for a model M, a gated
network over its subnets and the controller's policy pi::

    x' = attack(M, x, y)  if an attack is given, else x          (Eq. 3; w.r.t. the full M)
    if t % interval == 0:                                         (Algorithm 1, lines 3-7)
        alpha_1..alpha_C ~ pi                                     C = candidates
        R(alpha_i) = accuracy of alpha_i on (x', y)               one batched forward, no_grad
        controller.update(reward = -R)                            REINFORCE, seeks weak subnets
    alpha ~ pi                                                    (line 10)
    loss = CE(M(x'), y) + distill_weight * KL(alpha(x'), M(x'))   (Eq. 2 / Eq. 4, line 11)
    optimizer.zero_grad(); loss.backward(); optimizer.step()

where ``KL(alpha(x'), M(x')) = kl_distill(student = subnet logits, teacher = full logits
detached)`` = KL(softmax(M(x')) || softmax(alpha(x'))), mean over the batch. The
gradient reaches M's weights through the subnet forward (the weights alpha keeps)
and the cross-entropy; the teacher is a target only::

    from robustdrop.ews import EWSTrainer

    model = robustdrop.models.resnet18()
    trainer = EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for images, labels in loader:
        stats = trainer.step(images, labels)   # {"loss", "ce", "kl"[, "controller_*", ...]}
"""

import torch
import torch.nn.functional as F
from torch import nn

from robustdrop._checks import check_non_negative, check_positive_int, check_target
from robustdrop.ews.controller import Controller
from robustdrop.ews.gates import GatedNetwork
from robustdrop.ops.kl_distill import kl_distill

__all__ = ["EWSTrainer"]


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside a data-parallel wrapper, else model. A gated forward sets the batch norms'
    running buffers aside (GatedNetwork), and through DistributedDataParallel its buffer broadcast
    at the start of the forward then fails (an empty list of buffers to broadcast)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


class EWSTrainer:
    """Train a model by enhancing its weak subnets (EWS), one ``step`` per batch.

    Args:
        model: the classifier M, returning (N, K) logits. Gated as ``GatedNetwork``
            gates it: ResNet-style blocks and their inner batch norms, every batch norm
            of a model without such blocks, or the modules named in ``layers``.
        optimizer: the optimizer of M's parameters (``zero_grad`` and ``step`` are
            called once per ``step``).
        width: rho in (0, 1], the fraction of channels and paths a subnet keeps (0.7).
        layers: None, or the module names of M to gate (see ``gated_layers``).
        interval: K >= 1: the controller is updated at iterations K, 2K, ... (10).
        distill_weight: lambda >= 0, the weight of the distillation loss (1.0).
            The KL is averaged over the batch ("batchmean", the paper's Algorithm 1):
            the authors' CIFAR code used nn.KLDivLoss's default "mean", which also
            divides by the K classes, so its lambda = 1 is this lambda = 1 / K.
        candidates: C >= 1, the subnets sampled and evaluated per controller update (8).
        attack: None, or a callable ``attack(model, x, y) -> x_adv`` (e.g.
            ``functools.partial(robustdrop.attacks.pgd, eps=8/255, alpha=2/255, steps=10)``):
            x_adv, computed against the full model every iteration, replaces x in the
            search, the cross-entropy and the distillation (Eq. 3-4). The attack runs in
            the model's current mode (see ``robustdrop.attacks``).
        example_input: passed to ``GatedNetwork`` (channel counts of named layers
            that carry none).
        hidden_size, entropy_weight, baseline_decay: the controller's (``Controller``).
        controller_lr: the learning rate of the controller's Adam (3.5e-4).
        generator: a CPU torch.Generator for the controller's sampling (None: torch's
            default generator, so ``torch.manual_seed`` makes runs repeatable).

    Attributes:
        model, optimizer, network (the GatedNetwork), controller (the Controller),
        iteration (steps taken), subnet (the subnet alpha of the last step).

    The model's train/eval mode is the caller's. In train mode the full forward
    updates batch-norm running statistics as usual; the subnet forwards and the
    candidates' evaluation never do (``GatedNetwork``), and each candidate is
    normalised by its own batch statistics.

    Data-parallel training: ``model`` may be a ``DistributedDataParallel`` (or
    ``nn.DataParallel``) wrapper. The full forward (and the attack's) goes through
    the wrapper; the subnet forwards and the candidates' evaluation run on
    ``model.module`` directly (through DDP, its buffer broadcast would fail on
    the batch norms whose running buffers a gated forward sets aside). The
    subnet's gradients reach the same parameters, whose gradients DDP averages
    once in ``loss.backward()``, so the replicas stay identical. No
    ``find_unused_parameters`` is needed: the full forward uses every parameter.
    The controller is not synchronised: each rank keeps its own, updated from
    its own shard's rewards (seed the ranks alike for identical first samples).
    """

    def __init__(self, model: nn.Module, optimizer, *, width: float = 0.7, layers=None, interval: int = 10,
                 distill_weight: float = 1.0, candidates: int = 8, attack=None, example_input=None,
                 hidden_size: int = 64, entropy_weight: float = 1e-3, baseline_decay: float = 0.95,
                 controller_lr: float = 3.5e-4, generator: torch.Generator | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not (callable(getattr(optimizer, "step", None)) and callable(getattr(optimizer, "zero_grad", None))):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (step and zero_grad), got "
                            f"{type(optimizer).__name__}")
        self.interval = check_positive_int(interval, "interval")
        self.candidates = check_positive_int(candidates, "candidates")
        self.distill_weight = check_non_negative(distill_weight, "distill_weight")
        if attack is not None and not callable(attack):
            raise TypeError(f"attack must be None or a callable (model, x, y) -> x_adv, got {type(attack).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.attack = attack
        self.generator = generator
        # Subnets run on the wrapped module itself; see the class docstring.
        self.network = GatedNetwork(_unwrapped(model), width=width, layers=layers, example_input=example_input)
        self.controller = Controller.for_network(self.network, hidden_size=hidden_size, entropy_weight=entropy_weight,
                                                 baseline_decay=baseline_decay, lr=controller_lr)
        self.iteration = 0
        self.subnet = None

    def __repr__(self) -> str:
        return (f"EWSTrainer({self.network!r}, interval={self.interval}, distill_weight={self.distill_weight}, "
                f"candidates={self.candidates}, attack={'None' if self.attack is None else 'given'})")

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One iteration of Algorithm 1 on the batch (x (N, ...), y (N,) int64 class indices).

        Returns:
            dict of floats: ``loss`` (the total), ``ce``, ``kl`` (before the weight);
            on the iterations that update the controller also ``subnet_accuracy`` and
            ``subnet_accuracy_min`` (mean and lowest accuracy of the candidates) and
            ``controller_loss``, ``controller_reward``, ``controller_baseline``,
            ``controller_entropy``, ``controller_log_prob`` (``Controller.update``).
        """
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError(f"x must be a torch.Tensor batch (N, ...), got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else 'a 0-d tensor'}")
        check_target(y, x.shape[0], x.device, "y")
        inputs = self._adversarial(x, y) if self.attack is not None else x
        # Counted once the step is done: a step that raises (bad labels) is not taken.
        iteration = self.iteration + 1
        stats = {}
        if iteration % self.interval == 0:
            stats = self.update_controller(inputs, y)
        with torch.no_grad():
            (self.subnet,), _, _ = self.controller.sample(1, generator=self.generator)
        full = self.model(inputs)
        ce = F.cross_entropy(full, y)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.distill_weight > 0):  # lambda = 0: report only
            kl = kl_distill(self.network(inputs, self.subnet), full.detach())
        loss = ce + self.distill_weight * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.iteration = iteration
        return {"loss": float(loss.detach()), "ce": float(ce.detach()), "kl": float(kl.detach()), **stats}

    def update_controller(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Algorithm 1's lines 5-7 on (x, y): sample ``candidates`` subnets, evaluate their
        accuracies in one batched forward, one REINFORCE step on reward = -accuracy.
        ``step`` calls it every ``interval`` iterations; returns its part of ``step``'s dict."""
        subnets, log_probs, entropies = self.controller.sample(self.candidates, generator=self.generator)
        accuracies = self.network.evaluate(x, y, subnets).cpu()
        stats = self.controller.update(log_probs, entropies, -accuracies)
        return {"subnet_accuracy": float(accuracies.mean()), "subnet_accuracy_min": float(accuracies.min()),
                **{f"controller_{name}": value for name, value in stats.items()}}

    def _adversarial(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = self.attack(self.model, x, y)
        if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
            raise ValueError(f"attack must return x_adv with x's shape {tuple(x.shape)}, got "
                             f"{tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__}")
        return x_adv.detach()
