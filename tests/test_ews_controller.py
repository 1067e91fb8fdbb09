"""EWS's controller (LSTM policy over subnets, REINFORCE) and trainer (Algorithm 1)."""
import contextlib
import functools
import itertools
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustdrop.attacks
from robustdrop import ews
from robustdrop.ews.controller import Controller, choices_to_masks, plackett_luce_log_prob
from robustdrop.models import SmallCNN, resnet18


@contextlib.contextmanager
def one_thread():
    """Tiny ops run fastest on one thread (and the test machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bias_only(controller: Controller, biases) -> Controller:
    """Make decision t's logits exactly biases[t], whatever the LSTM state."""
    with torch.no_grad():
        for head, bias in zip(controller.heads, biases):
            head.weight.zero_()
            head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return controller


DECISIONS = [("paths", 2, 2), ("channels", 10, 7), ("paths", 3, 2), ("channels", 5, 1), ("channels", 4, 4)]


# ----------------------------------------------------------------------------- controller


def test_sampled_subsets_have_exact_sizes_and_distinct_items():
    controller = Controller(DECISIONS)
    choices, log_probs, entropies = controller.sample_choices(64, generator=torch.Generator().manual_seed(0))
    assert log_probs.shape == entropies.shape == (64,)
    for order, mask, decision in zip(choices, choices_to_masks(choices, controller.decisions), controller.decisions):
        assert order.shape == (64, decision.keep) and order.dtype == torch.int64
        assert mask.shape == (64, decision.size) and mask.dtype == torch.bool
        assert torch.equal(mask.sum(1), torch.full((64,), decision.keep))
    assert bool((log_probs <= 0).all()) and bool((entropies >= 0).all())


def test_log_prob_and_entropy_equal_a_hand_computation():
    # Two decisions with fixed logits: keep 2 of 3 (ordered draw a, b) and keep 1 of 2.
    controller = bias_only(Controller([("channels", 3, 2), ("paths", 2, 1), ("paths", 2, 2)]),
                           [[0.5, -1.0, 2.0], [0.3, -0.2], [0.0, 0.0]])
    choices, log_probs, entropies = controller.sample_choices(16, generator=torch.Generator().manual_seed(3))
    l1, l2 = [0.5, -1.0, 2.0], [0.3, -0.2]
    lse = lambda values: math.log(sum(math.exp(v) for v in values))  # noqa: E731
    entropy = lambda values: -sum(math.exp(v - lse(values)) * (v - lse(values)) for v in values)  # noqa: E731
    for row in range(16):
        a, b = choices[0][row].tolist()
        (c,) = choices[1][row].tolist()
        expected = (l1[a] - lse(l1)) + (l1[b] - lse([l1[i] for i in range(3) if i != a])) + (l2[c] - lse(l2))
        assert log_probs[row].item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
        assert entropies[row].item() == pytest.approx(entropy(l1) + entropy(l2), rel=1e-6)
    assert torch.equal(choices[2], torch.tensor([[0, 1]] * 16))  # keep == size: one outcome, log p 0


def test_draws_follow_the_plackett_luce_distribution():
    logits = [0.5, -1.0, 2.0, 0.0]
    controller = bias_only(Controller([("channels", 4, 2)]), [logits])
    with torch.no_grad():
        choices, log_probs, _ = controller.sample_choices(20000, generator=torch.Generator().manual_seed(1))
    weights = [math.exp(v) for v in logits]
    for a, b in itertools.permutations(range(4), 2):
        probability = weights[a] / sum(weights) * weights[b] / (sum(weights) - weights[a])
        hits = (choices[0] == torch.tensor([a, b])).all(1)
        assert hits.float().mean().item() == pytest.approx(probability, abs=4 * math.sqrt(probability / 20000) + 1e-3)
        if bool(hits.any()):
            assert log_probs[hits][0].item() == pytest.approx(math.log(probability), rel=1e-5)


def test_plackett_luce_log_prob_is_stable_for_extreme_logits():
    logits = torch.tensor([[80.0, 0.0, -80.0, -200.0]], dtype=torch.float32, requires_grad=True)
    order = torch.tensor([[3, 2, 1]])
    log_prob = plackett_luce_log_prob(logits, order)
    # By hand: -280 - log(1 + e^-80 + e^-200 ...) ~= -280, then -80 - 80, then 0 - 80 (float32 exact).
    assert log_prob.item() == pytest.approx(-280.0 - 160.0 - 80.0, rel=1e-6)
    log_prob.backward()
    assert bool(torch.isfinite(logits.grad).all())


def test_score_rescores_sampled_draws():
    torch.manual_seed(0)
    controller = Controller(DECISIONS, hidden_size=16)
    choices, log_probs, entropies = controller.sample_choices(5)
    scored_log_probs, scored_entropies = controller.score(choices)
    torch.testing.assert_close(scored_log_probs, log_probs)
    torch.testing.assert_close(scored_entropies, entropies)
    # The LSTM carries earlier draws: the second decision's logits depend on the first's.
    swapped = [choices[0], choices[1].roll(1, 0), *choices[2:]]
    assert not torch.equal(controller.score(swapped)[1], entropies)


def test_sampling_is_deterministic_under_a_generator_or_manual_seed():
    controller = Controller(DECISIONS)
    first = controller.sample_choices(4, generator=torch.Generator().manual_seed(7))[0]
    second = controller.sample_choices(4, generator=torch.Generator().manual_seed(7))[0]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    torch.manual_seed(11)
    first = controller.sample_choices(4)[0]
    torch.manual_seed(11)
    second = controller.sample_choices(4)[0]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_baseline_is_a_moving_average_of_the_rewards():
    controller = Controller(DECISIONS, baseline_decay=0.9)
    assert math.isnan(controller.baseline.item())
    _, log_probs, entropies = controller.sample_choices(4)
    stats = controller.update(log_probs, entropies, torch.tensor([-0.5, -0.3, -0.1, -0.3]))
    assert stats["baseline"] == pytest.approx(-0.3) and stats["reward"] == pytest.approx(-0.3)
    assert controller.baseline.item() == pytest.approx(-0.3)
    _, log_probs, entropies = controller.sample_choices(2)
    stats = controller.update(log_probs, entropies, [-1.0, -0.8])
    assert stats["baseline"] == pytest.approx(-0.3)  # the advantages use the baseline before this batch
    assert controller.baseline.item() == pytest.approx(0.9 * -0.3 + 0.1 * -0.9)
    assert int(controller.updates) == 2


def test_entropy_bonus_raises_the_entropy_and_only_it_acts_on_equal_rewards():
    decisions = [("channels", 6, 3)]
    peaked = [[3.0, 2.0, 0.0, -1.0, -2.0, -3.0]]
    with_bonus = bias_only(Controller(decisions, entropy_weight=1.0, lr=0.05), peaked)
    without = bias_only(Controller(decisions, entropy_weight=0.0, lr=0.05), peaked)
    start = {name: value.clone() for name, value in without.state_dict().items()}
    entropy_before = with_bonus.score([torch.tensor([[0, 1, 2]])])[1].item()
    for _ in range(5):
        for controller in (with_bonus, without):
            _, log_probs, entropies = controller.sample_choices(4)
            stats = controller.update(log_probs, entropies, torch.full((4,), -0.5))
    entropy_after = with_bonus.score([torch.tensor([[0, 1, 2]])])[1].item()
    assert entropy_after > entropy_before
    assert stats["loss"] == pytest.approx(0.0, abs=1e-7)  # no bonus, zero advantages: nothing to learn
    for name, value in without.named_parameters():
        assert torch.equal(value, start[name]), name


def test_policy_gradient_raises_the_probability_of_rewarded_draws():
    controller = Controller([("channels", 4, 1)], entropy_weight=0.0, lr=0.01)
    choices = [torch.tensor([[0], [1], [2], [3]])]
    before = controller.score(choices)[0].detach()
    log_probs, entropies = controller.score(choices)
    controller.update(log_probs, entropies, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    after = controller.score(choices)[0].detach()
    assert after[0] > before[0] and bool((after[1:] < before[1:]).all())


@pytest.mark.parametrize("settings,updates", [({"lr": 0.01, "entropy_weight": 0.01}, 200), ({}, 500)],
                         ids=["lr0.01", "defaults"])
def test_controller_learns_to_remove_a_planted_weak_channel_set(settings, updates):
    """Toy problem: a subnet's 'accuracy' is the fraction of the planted channels it keeps; it is
    lowest (0) exactly when the subnet removes the whole planted set of every decision. With the
    paper's defaults (lr 3.5e-4, entropy weight 1e-3) it takes longer: in one seeded run, 0.70 of
    the sampled subnets removed the set after 200 updates, 0.96 after 500 and all after 2000."""
    decisions = [("paths", 3, 2), ("channels", 10, 7), ("channels", 8, 6)]
    planted = [torch.tensor([0]), torch.tensor([1, 4, 7]), torch.tensor([0, 5])]

    def accuracy(choices):
        masks = choices_to_masks(choices, controller.decisions)
        kept = sum(mask[:, items].sum(1) for mask, items in zip(masks, planted))
        return kept.float() / sum(len(items) for items in planted)

    torch.manual_seed(0)
    controller = Controller(decisions, **settings)
    generator = torch.Generator().manual_seed(0)
    with one_thread():
        initial = accuracy(controller.sample_choices(200, generator=generator)[0])
        for _ in range(updates):
            choices, log_probs, entropies = controller.sample_choices(8, generator=generator)
            controller.update(log_probs, entropies, -accuracy(choices))
        with torch.no_grad():
            final = accuracy(controller.sample_choices(200, generator=generator)[0])
    assert (initial == 0).float().mean() < 0.05
    assert (final == 0).float().mean() > 0.9


@pytest.mark.parametrize("kwargs,match", [
    ({"decisions": []}, "decisions must not be empty"),
    ({"decisions": [("layers", 4, 2)]}, "kind"),
    ({"decisions": [("channels", 4, 5)]}, "keep must be <= size"),
    ({"decisions": [("channels", 4, 0)]}, "keep"),
    ({"decisions": [("channels", 0, 0)]}, "size"),
    ({"decisions": [("channels", 4, 2, "a")]}, "decisions\\[0\\] must be a \\(kind, size, keep\\)"),
    ({"decisions": [("channels", 4, 2), ("paths", 2, 1)], "names": ["a", "a"]}, "names must be distinct"),
    ({"names": ["a", "b"]}, "names must hold one str per decision"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"entropy_weight": -1.0}, "entropy_weight"),
    ({"baseline_decay": 1.0}, "baseline_decay"),
    ({"lr": 0.0}, "lr"),
])
def test_controller_bad_arguments_are_named(kwargs, match):
    kwargs = {"decisions": [("channels", 4, 2)], **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        Controller(kwargs.pop("decisions"), **kwargs)


def test_sample_and_update_bad_arguments_are_named():
    controller = Controller([("channels", 4, 2)])
    with pytest.raises(ValueError, match="count"):
        controller.sample(0)
    with pytest.raises(TypeError, match="generator"):
        controller.sample(1, generator=3)
    _, log_probs, entropies = controller.sample_choices(3)
    with pytest.raises(ValueError, match="one shape"):
        controller.update(log_probs, entropies, torch.zeros(2))
    with torch.no_grad():
        _, log_probs, entropies = controller.sample_choices(3)
    with pytest.raises(ValueError, match="graph"):
        controller.update(log_probs, entropies, torch.zeros(3))
    with pytest.raises(ValueError, match="distinct"):
        controller.score([torch.tensor([[1, 1]])])
    with pytest.raises(ValueError, match=r"choices\[1\] must have shape \(S, keep\) = \(1, 1\)"):
        Controller([("channels", 4, 2), ("channels", 3, 1)]).score([torch.tensor([[0, 1]]), torch.tensor([[0], [1]])])


def test_for_network_decides_block_by_block_and_its_subnets_fit_the_network():
    network = ews.GatedNetwork(resnet18(), width=0.5)
    controller = Controller.for_network(network, hidden_size=8)
    assert controller.names == tuple(network.names) and controller.decisions == tuple(network.decisions)
    assert controller.names[:3] == ("layer1.0", "layer1.0.bn1", "layer1.1")
    subnets, log_probs, _ = controller.sample(3)
    for subnet in subnets:
        network.check_subnet(subnet)
        assert all(mask.device.type == "cpu" for mask in [*subnet.channels.values(), *subnet.paths.values()])
    with pytest.raises(TypeError, match="network"):
        Controller.for_network(resnet18())


# ----------------------------------------------------------------------------- trainer


class NamedNet(nn.Module):
    """A user model whose gated layers the user names: a conv and a hidden linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 6, 3, padding=1), act=nn.ReLU(),
                                                  pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten()))
        self.hidden = nn.Linear(6, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(self.features(x))))


def batch(classes: int, n: int = 8, size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def run_steps(trainer, steps, x, y):
    with one_thread():
        return [trainer.step(x, y) for _ in range(steps)]


@pytest.mark.parametrize("make,layers", [(lambda: SmallCNN(num_classes=4), None),
                                         (NamedNet, ["features.conv", "hidden"])])
def test_trainer_steps_update_the_model_and_the_controller_every_interval(make, layers):
    torch.manual_seed(0)
    model = make()
    classes = 4 if layers is None else 3
    x, y = batch(classes)
    trainer = ews.EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), layers=layers, interval=3,
                             candidates=4, generator=torch.Generator().manual_seed(0))
    assert trainer.network.layers == (["layer1.bn", "layer2.bn", "layer3.bn", "layer4.bn"] if layers is None
                                      else layers)
    before = [p.detach().clone() for p in model.parameters()]
    controller_before = [p.detach().clone() for p in trainer.controller.parameters()]
    results = run_steps(trainer, 7, x, y)
    assert [index + 1 for index, stats in enumerate(results) if "controller_loss" in stats] == [3, 6]
    assert int(trainer.controller.updates) == 2 and trainer.iteration == 7
    for stats in results:
        assert all(isinstance(value, float) and math.isfinite(value) for value in stats.values())
        assert stats["loss"] == pytest.approx(stats["ce"] + stats["kl"], rel=1e-5)
        assert stats["kl"] >= 0
    assert 0.0 <= results[2]["subnet_accuracy_min"] <= results[2]["subnet_accuracy"] <= 1.0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(controller_before, trainer.controller.parameters()))
    trainer.network.check_subnet(trainer.subnet)


def test_trainer_runs_on_resnet18_with_path_gates():
    torch.manual_seed(0)
    model = resnet18(num_classes=3)
    x, y = batch(3, n=2)
    trainer = ews.EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01), width=0.5, interval=1,
                             candidates=2)
    (stats,) = run_steps(trainer, 1, x, y)
    assert "controller_loss" in stats and all(math.isfinite(value) for value in stats.values())
    assert sum(int(mask.sum()) for mask in trainer.subnet.paths.values()) == len(trainer.network.blocks)


def test_trainer_is_repeatable_under_manual_seed():
    x, y = batch(3)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        model = NamedNet()
        trainer = ews.EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), layers=["features.conv"],
                                 interval=2, candidates=3)
        runs.append((run_steps(trainer, 3, x, y), trainer.subnet.channels["features.conv"]))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_step_on_cuda():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4).cuda()
    x, y = (tensor.cuda() for tensor in batch(4))
    trainer = ews.EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), interval=1, candidates=3)
    stats = trainer.step(x, y)
    assert "controller_loss" in stats and all(math.isfinite(value) for value in stats.values())
    assert trainer.controller.device.type == "cpu"


def test_trainer_distills_the_subnet_towards_the_full_model():
    torch.manual_seed(0)
    model = NamedNet()
    x, y = batch(3)
    trainer = ews.EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0), layers=["hidden"], interval=100)
    (stats,) = run_steps(trainer, 1, x, y)
    with torch.no_grad():
        full = model(x)
        sub = trainer.network(x, trainer.subnet)
    expected = F.kl_div(F.log_softmax(sub, 1), F.log_softmax(full, 1), log_target=True, reduction="batchmean")
    assert stats["kl"] == pytest.approx(expected.item(), rel=1e-5)
    assert stats["ce"] == pytest.approx(F.cross_entropy(full, y).item(), rel=1e-5)


def test_adversarial_variant_uses_the_attack_for_search_ce_and_distillation(monkeypatch):
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4)
    x, y = batch(4)
    fgsm = functools.partial(robustdrop.attacks.fgsm, eps=0.05)
    seen = {"attack": [], "evaluate": [], "gated": []}

    def attack(model_, x_, y_):
        x_adv = fgsm(model_, x_, y_)
        seen["attack"].append(x_adv)
        return x_adv

    evaluate, call = ews.GatedNetwork.evaluate, ews.GatedNetwork.__call__
    monkeypatch.setattr(ews.GatedNetwork, "evaluate",
                        lambda self, x_, y_, s: seen["evaluate"].append(x_) or evaluate(self, x_, y_, s))
    monkeypatch.setattr(ews.GatedNetwork, "__call__",
                        lambda self, x_, s=None: seen["gated"].append(x_) or call(self, x_, s))
    trainer = ews.EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0), attack=attack, interval=1,
                             candidates=2)
    expected_adv = fgsm(model, x, y)  # train mode, no dropout: deterministic
    with torch.no_grad():
        expected_ce = F.cross_entropy(model(expected_adv), y).item()
    (stats,) = run_steps(trainer, 1, x, y)
    (x_adv,) = seen["attack"]
    assert torch.equal(x_adv, expected_adv) and not torch.equal(x_adv, x)
    assert (x_adv - x).abs().max().item() == pytest.approx(0.05, rel=1e-5)
    # evaluate's batched forward goes through __call__ with x_adv repeated once per candidate.
    assert all(torch.equal(copy, x_adv) for used in seen["evaluate"] + seen["gated"] for copy in used.split(len(x)))
    assert len(seen["evaluate"]) == 1 and seen["gated"]
    assert stats["ce"] == pytest.approx(expected_ce, rel=1e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"interval": 0}, ValueError, "interval"),
    ({"interval": 2.5}, TypeError, "interval"),
    ({"width": 0.0}, ValueError, "width"),
    ({"width": 1.5}, ValueError, "width"),
    ({"candidates": 0}, ValueError, "candidates"),
    ({"distill_weight": -1.0}, ValueError, "distill_weight"),
    ({"distill_weight": float("inf")}, ValueError, "distill_weight"),
    ({"attack": "pgd"}, TypeError, "attack"),
    ({"layers": ["nope"]}, ValueError, "layers"),
])
def test_trainer_bad_arguments_are_named(kwargs, error, match):
    model = NamedNet()
    kwargs = {"layers": ["hidden"], **kwargs}
    with pytest.raises(error, match=match):
        ews.EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_trainer_step_bad_inputs_are_named():
    model = NamedNet()
    trainer = ews.EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), layers=["hidden"])
    x, y = batch(3)
    with pytest.raises(ValueError, match="y"):
        trainer.step(x, y[:3])
    with pytest.raises(TypeError, match="y"):
        trainer.step(x, y.float())
    with pytest.raises(ValueError, match="attack"):
        ews.EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), layers=["hidden"],
                       attack=lambda m, x_, y_: x_[:2]).step(x, y)
    assert trainer.iteration == 0
    # A label outside [0, K) is refused by the candidates' evaluation, before the controller learns from
    # it, and the step is not counted: the next step updates the controller as this one would have.
    updating = ews.EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), layers=["hidden"], interval=1)
    controller_before = [p.detach().clone() for p in updating.controller.parameters()]
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, K\) = \[0, 3\)"):
        updating.step(x, torch.full_like(y, 3))
    assert updating.iteration == 0 and int(updating.controller.updates) == 0
    assert all(torch.equal(a, b) for a, b in zip(controller_before, updating.controller.parameters()))
    assert "controller_loss" in updating.step(x, y) and updating.iteration == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_controller_in_another_dtype_samples_scores_and_updates(dtype):
    torch.manual_seed(0)
    controller = Controller(DECISIONS).to(dtype)
    choices, log_probs, entropies = controller.sample_choices(3, generator=torch.Generator().manual_seed(1))
    assert log_probs.dtype == entropies.dtype == dtype
    rescored, _ = controller.score(choices)
    assert torch.equal(rescored, log_probs)
    controller.update(log_probs, entropies, torch.tensor([0.1, 0.5, 0.3]))
    assert int(controller.updates) == 1


def test_width_one_keeps_everything_and_updates_are_zero_steps():
    """At width 1 no decision draws: every subnet is the full network, log-probabilities and entropies are
    exactly 0 and still carry a graph, and an update changes no parameter."""
    controller = Controller([("paths", 2, 2), ("channels", 4, 4)])
    _, log_probs, entropies = controller.sample_choices(3)
    assert log_probs.requires_grad and torch.equal(log_probs, torch.zeros(3))
    assert torch.equal(entropies, torch.zeros(3))
    before = [p.detach().clone() for p in controller.parameters()]
    controller.update(log_probs, entropies, torch.tensor([0.0, 1.0, 0.5]))
    assert all(torch.equal(a, b) for a, b in zip(before, controller.parameters()))
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4)
    x, y = batch(4)
    trainer = ews.EWSTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), width=1.0, interval=2,
                             candidates=2)
    results = run_steps(trainer, 2, x, y)
    assert results[1]["subnet_accuracy"] == results[1]["subnet_accuracy_min"]
    assert results[0]["kl"] == 0.0
