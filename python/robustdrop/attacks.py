"""White-box adversarial attacks (FGSM, BIM, MIM, PGD) and the ADP robustness metric.

Every attack maximises ``loss_fn(model(x_adv), y)`` (cross-entropy, mean
over the batch, by default) over an eps-ball around the clean batch ``x``::

    x_adv = robustdrop.attacks.pgd(model, images, labels, eps=8 / 255, alpha=2 / 255, steps=10)
    attacked = (model(x_adv).argmax(1) == labels).float().mean().item()
    robustdrop.attacks.adp(clean, attacked)   # Active DropBlock's Eq. 7, in percent

Shapes: ``x`` is a batch (N, ...) of any floating dtype (images (N, C, H, W),
points (N, D), ...); ``y`` holds one target per sample (``len(y) == N``;
class indices (N,) int64 for the default loss); ``model(x)`` returns what
``loss_fn`` takes (logits (N, K) for the default). Norms and balls are per
sample: ``||v||_p`` of a sample is taken over all its elements.

What the attacks leave alone: the model's train/eval mode is the caller's
(no ``.eval()`` inside: attack an eval-mode model to evaluate it; in train
mode dropout draws new masks and BatchNorm uses batch statistics and updates
its running statistics at every attack forward, as any forward does); every
parameter's ``requires_grad`` (set to False during the attack, so no graph is
built through the parameters, and restored exactly, also on error); every
``.grad`` (gradients are taken with ``torch.autograd.grad`` with respect to
the input only); and ``x`` itself. The attacks run with gradients enabled
even inside ``torch.no_grad()``, but not inside ``torch.inference_mode()``,
which ``torch.enable_grad()`` cannot lift: there they raise a RuntimeError
(call them outside the block; wrap only the clean forwards in it). ``x`` and
``y`` may be inference tensors (made inside the mode): they are copied into
normal ones. A loss that has no autograd graph back to x (a model that
detaches its input, or runs its forward under ``no_grad``) is a RuntimeError
too, not a zero gradient. Each returns ``x_adv`` detached, with x's shape,
dtype and device.

``clamp=(low, high)`` keeps every element of x_adv in [low, high] (the valid
input range; (0, 1) for images scaled to [0, 1]); ``clamp=None`` disables it.
If x itself lies in [low, high], clamping keeps x_adv in the eps-ball.
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from robustdrop._checks import as_float, check_bool, check_choice, check_positive_int, is_real, real_number
from robustdrop.training import _scalar_loss

__all__ = ["fgsm", "bim", "mim", "pgd", "adp"]

NORMS = ("inf", "2")


def fgsm(model, x: torch.Tensor, y, *, eps: float, clamp=(0.0, 1.0), loss_fn=None) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al., 2015): one step of size eps.

    ``x_adv = clip(x + eps * sign(grad_x L(model(x), y)))``, where clip is the
    clamp to [low, high] (none when ``clamp=None``). Each element moves by
    exactly eps, or not at all where its gradient is 0, before clipping.

    Args:
        model: an nn.Module (or any callable) mapping x (N, ...) to what loss_fn takes.
        x: (N, ...) the clean batch, floating point.
        y: (N,) targets, one per sample.
        eps: L-inf radius, finite and >= 0.
        clamp: ``(low, high)`` valid input range, or None.
        loss_fn: ``loss_fn(outputs, y)`` -> scalar tensor; default ``F.cross_entropy``.

    Returns:
        x_adv (N, ...), detached.
    """
    clean, y, eps, clamp, loss_fn = _prepare(x, y, eps, clamp, loss_fn)
    if eps == 0.0:
        return _project(clean, clean, eps, "inf", clamp)
    with _frozen_parameters(model):
        grad = _input_grad(model, clean, y, loss_fn)
    return _clip(clean + eps * grad.sign(), clamp)


def bim(model, x: torch.Tensor, y, *, eps: float, alpha: float, steps: int, clamp=(0.0, 1.0),
        loss_fn=None) -> torch.Tensor:
    """Basic Iterative Method (Kurakin et al., 2017): iterated FGSM in the L-inf ball.

    From ``x_0 = x``, for t = 0 .. steps-1::

        x_{t+1} = clip(Proj_{||x' - x||_inf <= eps}(x_t + alpha * sign(grad_x L(model(x_t), y))))

    (PGD with ``norm="inf"`` and no random start.) With ``alpha = eps`` and
    ``steps = 1`` it is FGSM, up to float rounding in the projection.

    Args:
        model, x, y, eps, clamp, loss_fn: as in :func:`fgsm`.
        alpha: step size (per element), finite and > 0.
        steps: number of iterations, an int >= 1.

    Returns:
        x_adv (N, ...), detached, with ``||x_adv - x||_inf <= eps`` per sample.
    """
    return _attack(model, x, y, eps=eps, alpha=alpha, steps=steps, norm="inf", clamp=clamp, loss_fn=loss_fn,
                   direction=torch.sign)


def mim(model, x: torch.Tensor, y, *, eps: float, alpha: float, steps: int, decay: float = 1.0,
        clamp=(0.0, 1.0), loss_fn=None) -> torch.Tensor:
    """Momentum Iterative Method (Dong et al., 2018): BIM with an accumulated, normalised gradient.

    From ``x_0 = x`` and ``g_0 = 0``, for t = 0 .. steps-1, per sample::

        g_{t+1} = decay * g_t + grad_x L(model(x_t), y) / ||grad_x L(model(x_t), y)||_1
        x_{t+1} = clip(Proj_{||x' - x||_inf <= eps}(x_t + alpha * sign(g_{t+1})))

    The L1 norm is per sample, over all its elements (a zero gradient stays zero).

    Args:
        model, x, y, eps, alpha, steps, clamp, loss_fn: as in :func:`bim`.
        decay: momentum factor mu, finite and >= 0 (0 gives BIM).

    Returns:
        x_adv (N, ...), detached, with ``||x_adv - x||_inf <= eps`` per sample.
    """
    decay = _check_real(decay, "decay", minimum=0.0)
    momentum = None

    def direction(grad: torch.Tensor) -> torch.Tensor:
        nonlocal momentum
        step = _normalize(grad, 1)
        momentum = step if momentum is None else decay * momentum + step
        return momentum.sign()

    return _attack(model, x, y, eps=eps, alpha=alpha, steps=steps, norm="inf", clamp=clamp, loss_fn=loss_fn,
                   direction=direction)


def pgd(model, x: torch.Tensor, y, *, eps: float, alpha: float, steps: int, norm: str = "inf",
        random_start: bool = True, clamp=(0.0, 1.0), loss_fn=None, generator: torch.Generator = None) -> torch.Tensor:
    """Projected Gradient Descent (Madry et al., 2018) in the L-inf or L2 ball.

    From ``x_0 = clip(x + delta_0)`` (``delta_0`` uniform in the eps-ball when
    ``random_start``, else 0), for t = 0 .. steps-1::

        g_t     = grad_x L(model(x_t), y)
        x_{t+1} = clip(Proj_{||x' - x||_p <= eps}(x_t + alpha * d(g_t)))

    norm "inf": ``d(g) = sign(g)``, and Proj clamps each element of x' - x to
    [-eps, eps]; delta_0 ~ U[-eps, eps] per element. norm "2": ``d(g) = g /
    ||g||_2`` per sample (a zero gradient gives no step), and Proj scales x' - x
    by ``min(1, eps / ||x' - x||_2)`` per sample; delta_0 is uniform in the
    L2 ball of the sample's D elements: a Gaussian direction of radius
    ``eps * u ** (1 / D)``, u ~ U[0, 1]. (Active DropBlock's Eq. 8-9 are the
    L-inf case; its Eq. 9 clips around x_m where the projection is around the
    clean x = x_0, as here.)

    Args:
        model, x, y, eps, clamp, loss_fn: as in :func:`fgsm`; eps is the radius in ``norm``.
        alpha: step size (per element for "inf", the step's L2 length for "2"), finite and > 0.
        steps: number of iterations, an int >= 1.
        norm: ``"inf"`` or ``"2"``.
        random_start: start from a uniform random point of the ball (else from x).
        generator: a torch.Generator on x's device for the random start, or None for the global one.

    Returns:
        x_adv (N, ...), detached, with ``||x_adv - x||_norm <= eps`` per sample.
    """
    check_choice(norm, "norm", NORMS)
    check_bool(random_start, "random_start")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    direction = torch.sign if norm == "inf" else (lambda grad: _normalize(grad, 2))
    start = (lambda clean, radius: _random_in_ball(clean, radius, norm, generator)) if random_start else None
    return _attack(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, clamp=clamp, loss_fn=loss_fn,
                   direction=direction, start=start)


def adp(clean_acc, attacked_acc) -> float:
    """Accuracy degeneration percentage, Active DropBlock's Eq. 7.

    ``ADP = (clean_acc - attacked_acc) / clean_acc * 100``

    Units: both accuracies are fractions in [0, 1] (divide percentages by 100);
    the result is in percent, as the paper reports it (its Table 1:
    ``adp(0.9045, 0.677) == 25.15...``, i.e. 25.15%). Larger means the attack
    degrades the model more (weaker robustness); 0 means no loss of accuracy,
    100 no correct prediction left under attack, and it is negative when the
    attacked accuracy is higher than the clean one.

    Args:
        clean_acc: accuracy without attack ("vanilla accuracy"), in (0, 1]: a real number or a one-element tensor.
        attacked_acc: accuracy under attack, in [0, 1].

    Returns:
        ADP in percent, a float.
    """
    clean = _check_accuracy(clean_acc, "clean_acc")
    attacked = _check_accuracy(attacked_acc, "attacked_acc")
    if clean == 0.0:
        raise ValueError("clean_acc must be > 0 (ADP divides by it), got 0")
    return (clean - attacked) / clean * 100.0


# --- the shared loop ------------------------------------------------------------------------------------------------


def _attack(model, x, y, *, eps, alpha, steps, norm, clamp, loss_fn, direction, start=None) -> torch.Tensor:
    """``steps`` iterations of ``x_adv <- project(x_adv + alpha * direction(grad))`` from ``start``."""
    clean, y, eps, clamp, loss_fn = _prepare(x, y, eps, clamp, loss_fn)
    alpha = _check_real(alpha, "alpha", minimum=0.0, strict=True)
    steps = check_positive_int(steps, "steps")
    x_adv = clean if start is None else clean + start(clean, eps)
    x_adv = _project(x_adv, clean, eps, norm, clamp)
    if eps == 0.0:
        return x_adv
    with _frozen_parameters(model):
        for _ in range(steps):
            grad = _input_grad(model, x_adv, y, loss_fn)
            x_adv = _project(x_adv + alpha * direction(grad), clean, eps, norm, clamp)
    return x_adv


def _prepare(x, y, eps, clamp, loss_fn):
    """Check the arguments every attack takes; -> (x detached, y, eps, clamp, loss_fn), no inference tensor."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("the attacks need autograd, which torch.inference_mode() disables (torch.enable_grad() "
                           "cannot lift it): call the attack outside the torch.inference_mode() block "
                           "(torch.no_grad() is fine)")
    _check_batch(x, y)
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, y) -> scalar tensor, got {type(loss_fn).__name__}")
    return (_normal(x.detach()), _normal(y), _check_real(eps, "eps", minimum=0.0), _check_clamp(clamp), loss_fn)


def _normal(t):
    """t, or a normal copy of an inference tensor t (autograd can neither track nor save those)."""
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


def _input_grad(model, x_adv: torch.Tensor, y, loss_fn) -> torch.Tensor:
    """grad_x L(model(x), y) at x = x_adv (N, ...), without touching any ``.grad``."""
    with torch.enable_grad():
        inputs = x_adv.detach().requires_grad_(True)
        loss = _scalar_loss(loss_fn, model(inputs), y)
        # The parameters are frozen: a loss with a graph depends on the input (or on some other leaf: grad None).
        (grad,) = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else (None,)
    if grad is None:
        raise RuntimeError("the attack's loss has no autograd graph back to x (a zero gradient would leave x_adv = x "
                           "and report clean accuracy as robust accuracy): does the model detach its input, go through "
                           "NumPy, or run its forward under torch.no_grad() or torch.inference_mode()?")
    return grad


def _project(x_adv: torch.Tensor, clean: torch.Tensor, eps: float, norm: str, clamp) -> torch.Tensor:
    """Project x_adv (N, ...) onto the per-sample eps-ball around clean (N, ...), then clamp to [low, high]."""
    delta = x_adv - clean
    if norm == "inf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = (delta * (eps / _sample_norm(delta, 2)).clamp(max=1.0)).to(delta.dtype)
    return _clip(clean + delta, clamp)


def _clip(x: torch.Tensor, clamp) -> torch.Tensor:
    """x (N, ...) clamped to [low, high], or as it is for clamp=None."""
    return x if clamp is None else x.clamp(*clamp)


def _sample_norm(t: torch.Tensor, p: int) -> torch.Tensor:
    """(N, 1, ..., 1) L_p norm of each sample of t (N, ...), at least in float32, never below the dtype's tiny."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    rows = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    norm = torch.linalg.vector_norm(rows, ord=p, dim=1, dtype=dtype)
    return norm.clamp_min(torch.finfo(dtype).tiny).reshape((-1,) + (1,) * (t.dim() - 1))


def _normalize(t: torch.Tensor, p: int) -> torch.Tensor:
    """t / ||t||_p per sample, in t's dtype; a zero sample stays zero."""
    return (t / _sample_norm(t, p)).to(t.dtype)


def _random_in_ball(clean: torch.Tensor, eps: float, norm: str, generator) -> torch.Tensor:
    """A random offset (N, ...) uniform in the per-sample eps-ball of ``norm``."""
    dtype = torch.promote_types(clean.dtype, torch.float32)
    options = dict(generator=generator, device=clean.device, dtype=dtype)
    if norm == "inf":
        offset = (torch.rand(clean.shape, **options) * 2.0 - 1.0) * eps
    else:
        gaussian = torch.randn(clean.shape, **options)
        radius = torch.rand((clean.shape[0],) + (1,) * (clean.dim() - 1), **options)
        offset = gaussian / _sample_norm(gaussian, 2) * (eps * radius ** (1.0 / math.prod(clean.shape[1:])))
    return offset.to(clean.dtype)


@contextlib.contextmanager
def _frozen_parameters(model):
    """Set requires_grad=False on an nn.Module's parameters for the block; restore every flag exactly."""
    parameters = list(model.parameters()) if isinstance(model, nn.Module) else []
    flags = [parameter.requires_grad for parameter in parameters]
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


# --- argument checks -------------------------------------------------------------------------------------------------


def _check_batch(x, y) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor batch (N, ...), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must be a batch (N, ...) with at least one dimension, got a 0-d tensor")
    try:
        targets = len(y)
    except TypeError:
        raise TypeError(f"y must hold one target per sample of x (len(y) == N), got {type(y).__name__}") from None
    if targets != x.shape[0]:
        raise ValueError(f"y must hold one target per sample of x: len(y) = {targets}, but x has N = {x.shape[0]} "
                         f"samples (shape {tuple(x.shape)})")


def _check_real(value, name: str, *, minimum: float, strict: bool = False) -> float:
    """A finite real number >= minimum (> minimum when strict)."""
    value = real_number(value, name)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be finite and {'>' if strict else '>='} {minimum}, got {value}")
    return value


def _check_clamp(clamp):
    """None, or a (low, high) pair of real numbers with low < high."""
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2 or not all(
            is_real(bound) for bound in clamp):
        raise TypeError(f"clamp must be None or a (low, high) pair of real numbers, got {clamp!r}")
    low, high = as_float(clamp[0]), as_float(clamp[1])
    if not low < high:
        raise ValueError(f"clamp must be a (low, high) pair with low < high, got {clamp!r}")
    return low, high


def _check_accuracy(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be one accuracy (a number or a one-element tensor), "
                             f"got shape {tuple(value.shape)}")
        value = value.item()
    value = real_number(value, name)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be an accuracy fraction in [0, 1] (divide a percentage by 100), got {value}")
    return value
