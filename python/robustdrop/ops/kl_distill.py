"""kl_distill (EWS): the distillation loss KL(softmax(teacher / T) || softmax(student / T));
the functional API, its autograd and fake implementations, and the dispatch to the
four backends.

The compiled op ``robustdrop::kl_distill_forward(student_logits, teacher_logits,
temperature) -> (rows, grad)`` (CPU and CUDA kernels) and its Triton twin
``robustdrop::kl_distill_forward_triton`` read the logits once and return, per row,
the KL and its gradient with respect to the student logits, both float32 (float64
for float64 logits). The reduction over rows is a torch op on the (N,) rows, and the
backward is one scale of the saved gradient by the upstream gradient of each row
(and a cast to the student's dtype): no second pass over the logits. The compiled
op's autograd is in C++ (csrc/autograd/kl_distill_autograd.cpp), the Triton op's
below, with the same formula.

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
        (float64) gradient for the backward.
    """
    check_logits(student_logits, teacher_logits)
    temperature = check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    name = _backend.resolve_backend(backend, student_logits)
    teacher = teacher_logits.detach()
    if name == "reference":
        return reference.kl_distill(student_logits, teacher, temperature, reduction)
    return _reduce(_FORWARD[name](student_logits, teacher, temperature)[0], reduction, student_logits.shape)


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


def check_temperature(temperature) -> float:
    """A finite temperature > 0, as a float."""
    if not _checks.is_real(temperature):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not 0.0 < float(temperature) < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def _reduction_count(reduction: str, shape) -> int:
    """What the reduction divides the sum of the rows by (1 for "sum"; at least 1, so an empty input gives 0)."""
    count = {"sum": 1, "batchmean": shape[0], "mean": shape[0] * shape[1]}[reduction]
    return max(count, 1)


def _student_gradient(grad: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The backward: the saved row gradients (N, K) times scale ((N, 1) or 0-d), cast to the student's dtype."""
    if torch.is_grad_enabled():  # create_graph=True: a second derivative would silently miss this op
        raise RuntimeError("kl_distill does not support double backward (create_graph=True through the loss); "
                           "use backend='reference' for second derivatives")
    return (grad * scale).to(dtype)


def _reduce(rows: torch.Tensor, reduction: str, shape) -> torch.Tensor:
    """The loss from the rows (N,) of logits of ``shape`` (N, K): F.kl_div's reductions, 0 when empty."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / _reduction_count(reduction, shape)


_FORWARD = _backend.forward_table("kl_distill_forward", reference.kl_distill_forward)


def _fake_forward(student_logits, teacher_logits, temperature):
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    dtype = reference.math_dtype(student_logits.dtype)
    rows = student_logits.new_empty(student_logits.shape[:1], dtype=dtype)
    return rows, student_logits.new_empty(student_logits.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # no (N, K) zeros for the gradient output's unused gradient
    ctx.student_dtype = inputs[0].dtype


def _backward(ctx, grad_rows, _grad_grad):
    """The op's backward: d/ds of sum_n grad_rows[n] KL_row[n] is grad_rows[n] * grad[n].

    The teacher gets no gradient (it is treated as detached), nor does the
    temperature. The saved gradient is a constant here: no double backward.
    """
    (grad,) = ctx.saved_tensors
    if grad_rows is None or not ctx.needs_input_grad[0]:
        return None, None, None
    return _student_gradient(grad, grad_rows.unsqueeze(-1), ctx.student_dtype), None, None


def register(forward_name: str, *, autograd: bool) -> None:
    """Fake implementation and, with ``autograd`` (False for the compiled op: csrc/autograd has
    it), autograd of one backend family's kl_distill forward op."""
    torch.library.register_fake(f"robustdrop::{forward_name}", _fake_forward)
    if not autograd:
        return
    torch.library.register_autograd(f"robustdrop::{forward_name}", _backward, setup_context=_setup_context)
