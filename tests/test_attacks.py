"""robustdrop.attacks: FGSM, BIM, MIM and PGD against hand computations and a toy model trained here; ADP (Eq. 7)."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustdrop.attacks as attacks

EPS = 0.06
# The iterative attacks, each with a step size and count for EPS (L2 radius: EPS * 8 = EPS * sqrt(64), the L2 norm
# of an L-inf step of EPS on the 64 pixels).
ITERATIVE = {
    "bim": functools.partial(attacks.bim, eps=EPS, alpha=EPS / 4, steps=10),
    "mim": functools.partial(attacks.mim, eps=EPS, alpha=EPS / 4, steps=10),
    "pgd_inf": functools.partial(attacks.pgd, eps=EPS, alpha=EPS / 4, steps=10),
    "pgd_2": functools.partial(attacks.pgd, eps=8 * EPS, alpha=2 * EPS, steps=10, norm="2"),
}
ALL = {"fgsm": functools.partial(attacks.fgsm, eps=EPS), **ITERATIVE}


def make_data(count: int, seed: int):
    """3 classes of 1x8x8 images in [0, 1]: a class template of +-0.1 around 0.5, plus noise of std 0.1."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)).sign() * 0.1
    labels = torch.randint(0, 3, (count,), generator=generator)
    noise = torch.randn(count, 1, 8, 8, generator=generator) * 0.1
    return (0.5 + templates[labels] + noise).clamp(0.0, 1.0), labels


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 16), nn.ReLU(),
                         nn.Linear(16, 3))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The shapes here are tiny: more threads only add overhead (and contention on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread):
    """(model in eval mode, test images (128, 1, 8, 8), labels (128,)) after 200 full-batch Adam steps."""
    torch.manual_seed(0)
    model = small_net()
    x, y = make_data(256, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    x_test, y_test = make_data(128, seed=2)
    return model, x_test, y_test


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def assert_in_ball(x_adv, x, eps, norm):
    """||x_adv - x||_norm <= eps per sample, up to a few ulps of the values."""
    slack = 4 * torch.finfo(x.dtype).eps * max(1.0, x.abs().max().item())
    delta = (x_adv - x).flatten(1)
    if norm == "inf":
        assert delta.abs().max().item() <= eps + slack
    else:
        assert delta.norm(dim=1).max().item() <= eps * (1 + slack) + slack


def attack_norm(name):
    return "2" if name == "pgd_2" else "inf"


# --- FGSM against a hand computation ---------------------------------------------------------------------------------


def linear_model_and_grad(dtype):
    """A linear model (N, 5) -> (N, 3), a batch and its hand-computed gradient of the mean cross-entropy."""
    generator = torch.Generator().manual_seed(3)
    model = nn.Linear(5, 3).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 5, generator=generator))
        model.bias.copy_(torch.randn(3, generator=generator))
    x = torch.rand(6, 5, generator=generator, dtype=dtype)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        probabilities = torch.softmax(model(x), dim=1)
    # d/dx CE(Wx + b, y) / N = W^T (softmax - onehot) / N
    grad = (probabilities - F.one_hot(y, 3).to(dtype)) @ model.weight.detach() / len(x)
    return model, x, y, grad


def test_fgsm_moves_each_element_by_exactly_eps_sign_grad():
    model, x, y, grad = linear_model_and_grad(torch.float64)
    assert (grad.abs() > 1e-9).all()
    x_adv = attacks.fgsm(model, x, y, eps=0.3, clamp=None)
    assert torch.equal(x_adv, x + 0.3 * grad.sign())
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, 0.3), rtol=0, atol=1e-15)


def test_fgsm_clamps_after_the_step():
    model, x, y, grad = linear_model_and_grad(torch.float64)
    x_adv = attacks.fgsm(model, x, y, eps=0.3, clamp=(0.1, 0.9))
    assert torch.equal(x_adv, (x + 0.3 * grad.sign()).clamp(0.1, 0.9))


def test_fgsm_uses_the_gradient_of_loss_fn():
    model, x, y, _ = linear_model_and_grad(torch.float64)
    inputs = x.clone().requires_grad_(True)
    loss_fn = functools.partial(F.multi_margin_loss, reduction="sum")
    (grad,) = torch.autograd.grad(loss_fn(model(inputs), y), inputs)
    x_adv = attacks.fgsm(model, x, y, eps=0.05, clamp=None, loss_fn=loss_fn)
    assert torch.equal(x_adv, x + 0.05 * grad.sign())


# --- the iterative attacks against hand computations -----------------------------------------------------------------


def quadratic_loss(outputs, targets):
    """sum_n sum_i w_i * out_ni^2 with fixed weights w of both signs (grad: 2 w out)."""
    weights = torch.linspace(-1.0, 2.0, outputs.shape[1], dtype=outputs.dtype)
    return (weights * outputs ** 2).sum()


def quadratic_grad(x):
    return 2 * torch.linspace(-1.0, 2.0, x.shape[1], dtype=x.dtype) * x


def test_mim_accumulates_l1_normalised_gradients():
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    eps, alpha, decay = 0.5, 0.1, 0.7
    x_adv = attacks.mim(nn.Identity(), x, y, eps=eps, alpha=alpha, steps=4, decay=decay, clamp=None,
                        loss_fn=quadratic_loss)
    expected, momentum = x.clone(), torch.zeros_like(x)
    for _ in range(4):
        grad = quadratic_grad(expected)
        momentum = decay * momentum + grad / grad.abs().sum(dim=1, keepdim=True)
        expected = x + (expected + alpha * momentum.sign() - x).clamp(-eps, eps)
    assert torch.allclose(x_adv, expected, rtol=0, atol=1e-12)


def test_pgd_l2_steps_along_the_normalised_gradient_and_projects():
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    eps, alpha = 0.25, 0.1
    x_adv = attacks.pgd(nn.Identity(), x, y, eps=eps, alpha=alpha, steps=4, norm="2", random_start=False,
                        clamp=None, loss_fn=quadratic_loss)
    expected = x.clone()
    for _ in range(4):
        grad = quadratic_grad(expected)
        delta = expected + alpha * grad / grad.norm(dim=1, keepdim=True) - x
        expected = x + delta * (eps / delta.norm(dim=1, keepdim=True)).clamp(max=1.0)
    assert torch.allclose(x_adv, expected, rtol=0, atol=1e-12)
    assert torch.allclose((x_adv - x).norm(dim=1), torch.full((3,), eps, dtype=torch.float64))  # 4 * 0.1 > eps


def test_bim_is_pgd_without_random_start_and_mim_without_momentum(trained):
    model, x, y = trained
    options = dict(eps=EPS, alpha=EPS / 3, steps=5)
    bim = attacks.bim(model, x, y, **options)
    assert torch.equal(bim, attacks.pgd(model, x, y, random_start=False, **options))
    assert torch.equal(bim, attacks.mim(model, x, y, decay=0.0, **options))


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_pgd_random_start_is_uniform_in_the_ball_and_follows_the_generator(norm):
    x = torch.full((400, 1, 4, 4), 0.5)
    y = torch.zeros(400, dtype=torch.long)
    flat = lambda outputs, targets: (outputs * 0).sum()  # noqa: E731  (zero gradient: x_adv is the start)
    run = lambda seed: attacks.pgd(nn.Flatten(), x, y, eps=0.2, alpha=0.1, steps=1, norm=norm,  # noqa: E731
                                   loss_fn=flat, generator=torch.Generator().manual_seed(seed))
    delta = (run(0) - x).flatten(1)
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    assert_in_ball(run(0), x, 0.2, norm)
    if norm == "inf":  # U[-eps, eps] per element: mean 0, variance eps^2 / 3
        assert abs(delta.mean().item()) < 0.01 and abs(delta.var().item() - 0.04 / 3) < 0.002
    else:  # radius eps * u^(1/16): P(radius <= r) = (r / eps)^16
        radii = delta.norm(dim=1) / 0.2
        assert abs((radii <= 0.9).float().mean().item() - 0.9 ** 16) < 0.05
        assert radii.max().item() <= 1 + 1e-6


# --- on a trained toy model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ITERATIVE))
@pytest.mark.parametrize("clamp", [(0.0, 1.0), (0.3, 0.8)])
def test_iterative_attacks_stay_in_the_ball_and_the_valid_range(trained, name, clamp):
    model, x, y = trained
    x = x.clamp(*clamp)
    attack = ITERATIVE[name]
    x_adv = attack(model, x, y, clamp=clamp)
    assert_in_ball(x_adv, x, attack.keywords["eps"], attack_norm(name))
    low, high = torch.tensor(clamp, dtype=x.dtype)  # the bounds as x's dtype rounds them
    assert x_adv.min() >= low and x_adv.max() <= high


@pytest.mark.parametrize("name", sorted(ITERATIVE))
def test_iterative_attacks_stay_in_the_ball_without_clamp(trained, name):
    model, x, y = trained
    attack = ITERATIVE[name]
    x_adv = attack(model, x, y, clamp=None, alpha=attack.keywords["eps"])  # big steps: the projection is active
    assert_in_ball(x_adv, x, attack.keywords["eps"], attack_norm(name))


def test_the_toy_model_is_trained(trained):
    assert accuracy(*trained) >= 0.95


@pytest.mark.parametrize("name", sorted(ALL))
def test_attacks_lower_the_accuracy_of_a_trained_model(trained, name):
    model, x, y = trained
    torch.manual_seed(0)
    assert accuracy(model, ALL[name](model, x, y), y) < accuracy(model, x, y)


def test_pgd_with_more_steps_is_at_least_as_strong_as_fgsm(trained):
    model, x, y = trained
    torch.manual_seed(0)
    x_fgsm = attacks.fgsm(model, x, y, eps=EPS)
    x_pgd = attacks.pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=20)
    assert accuracy(model, x_pgd, y) <= accuracy(model, x_fgsm, y)
    with torch.no_grad():
        assert F.cross_entropy(model(x_pgd), y) >= F.cross_entropy(model(x_fgsm), y)


# --- what the attacks leave alone ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("training", [True, False])
def test_mode_requires_grad_grads_and_x_are_left_alone(name, training):
    torch.manual_seed(0)
    model = nn.Sequential(small_net(), nn.Dropout(0.1))
    model.train(training)
    model[0][0].train(not training)  # a submodule in the other mode
    model[0][0].weight.requires_grad_(False)
    model[0][3].bias.requires_grad_(False)
    model[0][5].weight.grad = torch.full_like(model[0][5].weight, 0.25)
    modes = [module.training for module in model.modules()]
    flags = [parameter.requires_grad for parameter in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    x, y = make_data(8, seed=3)
    x_before = x.clone()
    x_adv = ALL[name](model, x, y)
    assert [module.training for module in model.modules()] == modes
    assert [parameter.requires_grad for parameter in model.parameters()] == flags
    for parameter, grad in zip(model.parameters(), grads):
        assert (parameter.grad is None) if grad is None else torch.equal(parameter.grad, grad)
    assert torch.equal(x, x_before)
    assert not x_adv.requires_grad and x_adv.grad_fn is None


def test_requires_grad_is_restored_when_the_attack_fails():
    model = small_net()
    model[0].bias.requires_grad_(False)
    x, y = make_data(4, seed=3)

    def failing(outputs, targets):
        assert all(not parameter.requires_grad for parameter in model.parameters())  # frozen during the attack
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        attacks.pgd(model, x, y, eps=EPS, alpha=EPS, steps=2, loss_fn=failing)
    assert [p.requires_grad for p in model.parameters()] == [True, False] + [True] * 4


@pytest.mark.parametrize("name", sorted(ALL))
def test_x_that_requires_grad_is_not_touched(trained, name):
    model, x, y = trained
    x = x.clone().requires_grad_(True)
    x_adv = ALL[name](model, x, y)
    assert x.grad is None and not x_adv.requires_grad


@pytest.mark.parametrize("name", sorted(ALL))
def test_attacks_run_inside_no_grad(trained, name):
    model, x, y = trained
    torch.manual_seed(0)
    expected = ALL[name](model, x, y)
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(ALL[name](model, x, y), expected)
    assert not torch.equal(expected, x)


@pytest.mark.parametrize("name", sorted(ALL))
def test_attacks_inside_inference_mode_are_an_error_not_a_zero_gradient(trained, name):
    """torch.enable_grad() cannot lift inference mode: the loss would have no graph and x_adv would be x."""
    model, x, y = trained
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"outside the torch.inference_mode\(\) block"):
        ALL[name](model, x, y)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        ALL[name](model, x, y, eps=0.0)


@pytest.mark.parametrize("name", sorted(ALL))
def test_inference_tensors_made_inside_inference_mode_are_attacked_outside_it(trained, name):
    model, x, y = trained
    with torch.inference_mode():
        x_inference, y_inference = x.clone(), y.clone()
    torch.manual_seed(0)
    expected = ALL[name](model, x, y)
    torch.manual_seed(0)
    x_adv = ALL[name](model, x_inference, y_inference)
    assert torch.equal(x_adv, expected) and not x_adv.is_inference()
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("name", sorted(ALL))
def test_a_frozen_model_is_attacked_but_a_loss_without_a_graph_to_x_is_an_error(trained, name):
    """The gradient is w.r.t. x: frozen parameters change nothing. A model whose output has no graph back to x
    (here: it detaches its input) would give a zero gradient, x_adv = x and clean accuracy as robust accuracy."""
    model, x, y = trained
    torch.manual_seed(0)
    expected = ALL[name](model, x, y)
    frozen = copy.deepcopy(model).requires_grad_(False)
    torch.manual_seed(0)
    assert torch.equal(ALL[name](frozen, x, y), expected)
    with pytest.raises(RuntimeError, match="no autograd graph back to x"):
        ALL[name](lambda inputs: model(inputs.detach()), x, y)
    constant = nn.Parameter(torch.zeros(3))  # a leaf that requires grad, but not x
    with pytest.raises(RuntimeError, match="no autograd graph back to x"):
        ALL[name](lambda inputs: constant.expand(len(inputs), 3), x, y)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_result_has_the_shape_dtype_and_device_of_x(name, dtype):
    torch.manual_seed(0)
    model = small_net().to(dtype)
    x, y = make_data(5, seed=4)
    x_adv = ALL[name](model, x.to(dtype), y)
    assert x_adv.shape == x.shape and x_adv.dtype == dtype and x_adv.device == x.device


@pytest.mark.parametrize("name", sorted(ALL))
def test_eps_zero_returns_x_clamped(trained, name):
    model, x, y = trained
    assert torch.equal(ALL[name](model, x, y, eps=0.0), x)
    shifted = x * 1.4 - 0.2  # partly outside [0, 1]
    x_adv = ALL[name](model, shifted, y, eps=0.0)
    assert torch.equal(x_adv, shifted.clamp(0.0, 1.0))
    assert x_adv.data_ptr() != shifted.data_ptr()
    assert torch.equal(ALL[name](model, shifted, y, eps=0.0, clamp=None), shifted)


# --- bad input -------------------------------------------------------------------------------------------------------

BAD = [
    (dict(eps=-0.1), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps=float("inf")), ValueError, "eps"),
    (dict(eps=10**400), ValueError, "eps"),  # an int no float holds: a ValueError naming eps, not OverflowError
    (dict(eps="0.1"), TypeError, "eps"),
    (dict(alpha=0.0), ValueError, "alpha"),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.0), TypeError, "steps"),
    (dict(norm="1"), ValueError, "norm"),
    (dict(norm=2), ValueError, "norm"),
    (dict(clamp=(1.0, 0.0)), ValueError, "clamp"),
    (dict(clamp=(0.5, 0.5)), ValueError, "clamp"),
    (dict(clamp=(0.0,)), TypeError, "clamp"),
    (dict(clamp=1.0), TypeError, "clamp"),
    (dict(clamp=("a", 1.0)), TypeError, "clamp"),
    (dict(loss_fn="ce"), TypeError, "loss_fn"),
    (dict(loss_fn=functools.partial(F.cross_entropy, reduction="none")), ValueError, "loss_fn"),
    (dict(random_start=1), TypeError, "random_start"),
    (dict(generator=0), TypeError, "generator"),
]


@pytest.mark.parametrize("options,error,name", BAD)
def test_bad_options_raise_errors_naming_them(options, error, name):
    x, y = make_data(4, seed=5)
    arguments = {"eps": EPS, "alpha": EPS, "steps": 1, "norm": "inf", **options}
    with pytest.raises(error, match=name):
        attacks.pgd(small_net(), x, y, **arguments)


@pytest.mark.parametrize("name", sorted(ALL))
def test_bad_batches_raise_errors_naming_them(name):
    model = small_net()
    x, y = make_data(4, seed=5)
    with pytest.raises(ValueError, match="len\\(y\\) = 3"):
        ALL[name](model, x, y[:3])
    with pytest.raises(TypeError, match="y must"):
        ALL[name](model, x, y[0])
    with pytest.raises(TypeError, match="x must be a floating-point"):
        ALL[name](model, (x * 255).long(), y)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ALL[name](model, x.tolist(), y)


@pytest.mark.parametrize("attack,options,name", [
    (attacks.mim, dict(alpha=EPS, steps=1, decay=-0.5), "decay"),
    (attacks.mim, dict(alpha=EPS, steps=1, decay=float("inf")), "decay"),
    (attacks.bim, dict(alpha=EPS, steps=0), "steps"), (attacks.bim, dict(alpha=0, steps=1), "alpha"),
    (attacks.fgsm, dict(clamp=(1, 0)), "clamp"), (attacks.fgsm, dict(eps=-1.0), "eps")])
def test_bad_options_of_the_other_attacks(attack, options, name):
    x, y = make_data(4, seed=5)
    with pytest.raises(ValueError, match=name):
        attack(small_net(), x, y, **{"eps": EPS, **options})


# --- ADP (Active DropBlock, Eq. 7) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("clean,attacked,expected", [
    (0.9045, 0.677, 25.15), (0.9045, 0.272, 69.93),  # the paper's Table 1 (PCL: FGSM, PGD)
    (0.9312, 0.456, 51.03),  # Table 1 (PCL + Active DropBlock: PGD)
    (1.0, 0.0, 100.0), (0.5, 0.5, 0.0), (0.4, 0.5, -25.0), (0.8, 0.2, 75.0)])
def test_adp_values(clean, attacked, expected):
    assert attacks.adp(clean, attacked) == pytest.approx(expected, abs=0.005)


def test_adp_takes_one_element_tensors():
    value = attacks.adp(torch.tensor(0.8), torch.tensor([0.6]))
    assert isinstance(value, float) and value == pytest.approx(25.0)


@pytest.mark.parametrize("clean,attacked,error,name", [
    (0.0, 0.0, ValueError, "clean_acc must be > 0"), (90.45, 67.7, ValueError, "clean_acc"),
    (0.9, 67.7, ValueError, "attacked_acc"), (0.9, -0.1, ValueError, "attacked_acc"),
    (float("nan"), 0.5, ValueError, "clean_acc"), ("0.9", 0.5, TypeError, "clean_acc"),
    (True, 0.5, TypeError, "clean_acc"), (torch.tensor([0.9, 0.8]), 0.5, ValueError, "clean_acc")])
def test_adp_bad_input(clean, attacked, error, name):
    with pytest.raises(error, match=name):
        attacks.adp(clean, attacked)
