"""kl_distill (EWS): the distillation loss KL(softmax(teacher / T) || softmax(student / T));
the functional API, its autograd and fake implementations, and the dispatch to the
four backends.

The compiled op ``robustdrop::kl_distill_forward(student_logits, teacher_logits,
temperature, reduction) -> (loss, grad)`` (CPU and CUDA kernels) and its Triton twin
``robustdrop::kl_distill_forward_triton`` read the logits once and compute, per row,
the KL and its gradient with respect to the student logits, both float32 (float64
for float64 logits); they return the rows reduced as F.kl_div reduces them and the
row gradients. The backward is one scale of the saved row gradients by d loss /
d KL_row (and a cast to the student's dtype): no second pass over the logits, and
one autograd node for the whole loss. The compiled op's autograd is in C++
(csrc/autograd/kl_distill_autograd.cpp, reductions in csrc/kl_distill.h), the
Triton op's below, with the same formula.

On the compiled backends ``kl_distill`` calls ``robustdrop::kl_distill`` instead, the
same forward returning the loss alone: with the row gradients private to its
autograd node, the backward scales them in place when the graph is not kept for
another backward (and no saved-tensor hooks were active in the forward), so the
student's gradient needs no new (N, K) buffer.

Saving the gradient costs N*K*4 bytes (N*K*8 for float64) until the backward.
Recomputing it in a backward kernel instead would save that memory but repeat the
forward's work (two exponentials per element) where the scale is one multiply: on
the 2-core AVX-512 CPU this was built on, at 256 x 1000 float32 on one thread, the
forward takes about 250 us (writing the gradient is about 5% of it) and the scale
about 25 us, so the backward would cost about 10x more. No double backward: the saved
gradient is a constant (create_graph=True through the loss is an error).
"""
import math

import torch

from robustdrop import _backend, _checks
from robustdrop.reference import kl_distill as reference
from robustdrop.reference.kl_distill import REDUCTIONS

__all__ = ["kl_distill"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
               reduction: str = "batchmean", backend: str = "auto") -> torch.Tensor:
    """Knowledge-distillation loss: KL(softmax(t / T) || softmax(s / T)), teacher detached.

    Per row n, with p = softmax(t[n] / T) and log q = log_softmax(s[n] / T) over K:

        KL_row[n] = sum_k p_k (log p_k - log q_k)

    reduced as ``F.kl_div(log q, log p, log_target=True, reduction=...)`` does:
    "batchmean" sum / N (the true KL per sample; the default), "sum", "mean"
    sum / (N*K), "none" the rows (N,). Hinton's T**2 factor is not applied:
    multiply by ``temperature ** 2`` to keep gradient magnitudes comparable
    across temperatures. Only the student gets a gradient,
    d KL_row[n] / d s[n] = (softmax(s[n] / T) - p) / T; the teacher is detached.
    An empty batch or K = 0 gives 0 (for "batchmean" and "mean" too, where
    F.kl_div divides by zero).

    Args:
        student_logits: (N, K) float16/bfloat16/float32/float64 logits s, any strides.
        teacher_logits: (N, K) logits t of the same dtype, on the same device.
        temperature: T, a finite number > 0.
        reduction: "batchmean", "sum", "mean" or "none".
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        The loss, float32 (float64 for float64 logits): 0-d, or (N,) for "none".
        The row maths runs in float32 (float64); the student's gradient has the
        student's dtype. Backends agree to float rounding (tests/test_kl_distill.py
        states the tolerances per dtype). The kernels save the (N, K) float32
        (float64) gradient for the backward. Under a torch.func transform that
        differentiates (``grad``, ``vjp``, ``jacrev``, ``jvp``, ...) every
        backend computes the reference's torch expression, which torch.func
        differentiates to any order.
    """
    check_logits(student_logits, teacher_logits)
    temperature = check_temperature(temperature, student_logits.dtype)
    check_reduction(reduction)
    name = _backend.resolve_backend(backend, student_logits)
    teacher = teacher_logits.detach()
    # The kernels' saved gradient is a constant, and torch.func cannot run their autograd: under a torch.func
    # transform that differentiates, the torch expression, which it differentiates to any order.
    if name == "reference" or _checks.in_differentiating_transform():
        return reference.kl_distill(student_logits, teacher, temperature, reduction)
    if name == "triton":
        return torch.ops.robustdrop.kl_distill_forward_triton(student_logits, teacher, temperature, reduction)[0]
    return torch.ops.robustdrop.kl_distill(student_logits, teacher, temperature, reduction)


def check_logits(student_logits, teacher_logits) -> None:
    """Student and teacher logits (N, K) of one floating dtype on one device (csrc/checks.h's messages)."""
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if logits.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                            f"got {logits.dtype}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be 2-D (N, K), got {student_logits.dim()} dimensions")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have student_logits' shape {list(student_logits.shape)}, "
                         f"got {list(teacher_logits.shape)}")
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(f"teacher_logits must have student_logits' dtype {student_logits.dtype}, "
                        f"got {teacher_logits.dtype}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits must be on student_logits' device {student_logits.device}, "
                         f"got {teacher_logits.device}")


def check_temperature(temperature, logits_dtype: torch.dtype) -> float:
    """A finite temperature > 0 whose reciprocal is finite in the maths type of logits of
    ``logits_dtype`` (float32, float64 for float64 logits): the kernels scale the logits by 1 / T,
    which for T below 1 / FLT_MAX (about 2.9e-39) would be inf in float32. As a float."""
    value = _checks.real_number(temperature, "temperature")
    if not 0.0 < value < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    maths = reference.math_dtype(logits_dtype)
    if not 1.0 / value <= torch.finfo(maths).max:
        raise ValueError(f"temperature must be at least 1 / {torch.finfo(maths).max:.7g} for {logits_dtype} logits "
                         f"(the logits are scaled by 1 / temperature in {maths}), got {temperature}")
    return value


def check_reduction(reduction) -> None:
    """One of F.kl_div's reductions (csrc/kl_distill.h's message)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduction_divisor(reduction: str, shape) -> int:
    """What the reduction divides the sum of the rows of logits ``shape`` (N, K) by: at least 1,
    so an empty input gives 0; 0 for "none" (no sum). As csrc/kl_distill.h."""
    if reduction == "none":
        return 0
    return max({"sum": 1, "batchmean": shape[0], "mean": shape[0] * shape[1]}[reduction], 1)


def reduce_rows(rows: torch.Tensor, reduction: str, shape) -> torch.Tensor:
    """The loss from the rows (N,) of logits ``shape`` (N, K): (N,) for "none", else 0-d."""
    divisor = reduction_divisor(reduction, shape)
    if divisor == 0:
        return rows
    total = rows.sum()
    return total if divisor == 1 else total / divisor


def _fake_forward(student_logits, teacher_logits, temperature, reduction):
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature, student_logits.dtype)
    check_reduction(reduction)
    dtype = reference.math_dtype(student_logits.dtype)
    loss_shape = student_logits.shape[:1] if reduction == "none" else ()
    return student_logits.new_empty(loss_shape, dtype=dtype), student_logits.new_empty(student_logits.shape,
                                                                                      dtype=dtype)


def _setup_context(ctx, inputs, output):
    student, _, _, reduction = inputs
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # no (N, K) zeros for the gradient output's unused gradient
    ctx.student_dtype = student.dtype
    ctx.divisor = reduction_divisor(reduction, student.shape)


def _backward(ctx, grad_loss, _grad_grad):
    """The op's backward: d/ds of the loss is d loss / d KL_row[n] times grad[n].

    d loss / d KL_row is the upstream gradient of each row for "none", else the
    upstream gradient (0-d) / the reduction's divisor. The teacher gets no
    gradient (it is treated as detached), nor do the temperature and the
    reduction. The saved gradient is a constant here: no double backward.
    """
    (grad,) = ctx.saved_tensors
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: a second derivative would silently miss this op
        raise RuntimeError("kl_distill does not support double backward (create_graph=True through the loss); "
                           "use backend='reference' for second derivatives")
    if ctx.divisor == 0:
        row_scale = grad_loss.unsqueeze(-1)
    else:
        row_scale = grad_loss if ctx.divisor == 1 else grad_loss / ctx.divisor
    return (grad * row_scale).to(ctx.student_dtype), None, None, None


def register(forward_name: str, *, autograd: bool) -> None:
    """Fake implementation and, with ``autograd`` (False for the compiled op: csrc/autograd has
    it), autograd of one backend family's kl_distill forward op."""
    torch.library.register_fake(f"robustdrop::{forward_name}", _fake_forward)
    if not autograd:
        return
    torch.library.register_autograd(f"robustdrop::{forward_name}", _backward, setup_context=_setup_context)
