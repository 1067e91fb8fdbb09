"""kl_distill (EWS's distillation loss), the naive way: the torch expression a
user writes, which is both the correctness oracle and the benchmark's naive
baseline.

Shapes: student logits s and teacher logits t (N, K). With T > 0 the
temperature, p = softmax(t / T) and q = softmax(s / T) over K:

    KL_row[n] = sum_k p[n, k] (log p[n, k] - log q[n, k])              (N,)
    d KL_row[n] / d s[n, k] = (q[n, k] - p[n, k]) / T                  (N, K)

reduced as F.kl_div reduces: "batchmean" sum / N, "sum", "mean" sum / (N*K),
"none" the rows. The maths runs in float32 (float64 for float64 logits); the
loss is float32 (float64), the student's gradient has the student's dtype.
No gradient reaches the teacher. Empty inputs: a sum over nothing is 0, and
"batchmean" / "mean" of an empty input are 0 too (F.kl_div would give NaN).
"""
import torch
import torch.nn.functional as F

__all__ = ["REDUCTIONS", "math_dtype", "kl_distill", "kl_distill_forward"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the row maths, the loss and the saved gradient for logits of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)), reduced: the torch expression.

    ``F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t.detach() / T, -1),
    log_target=True, reduction=...)`` in float32 (float64 for float64), with
    "none" summed over K to one value per row (N,) and "mean" spelled out as
    the "sum" over N*K. Arguments are not checked.
    """
    dtype = math_dtype(student_logits.dtype)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    if reduction == "none":
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    if reduction == "mean":  # F.kl_div's "mean", spelled out (torch plans to make it batchmean)
        return F.kl_div(log_q, log_p, log_target=True, reduction="sum") / max(student_logits.numel(), 1)
    if student_logits.numel() == 0:
        reduction = "sum"  # 0, where batchmean would divide by zero
    return F.kl_div(log_q, log_p, log_target=True, reduction=reduction)


def kl_distill_forward(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                       reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of robustdrop::kl_distill_forward: (loss, grad (N, K)).

    loss is ``kl_distill`` with ``reduction`` and grad the row gradients
    d KL_row / d s, (softmax(s / T) - softmax(t / T)) / T, both in float32
    (float64 for float64 logits); grad is taken by autograd through the torch
    expression of ``kl_distill``.
    """
    student = student_logits.detach().to(math_dtype(student_logits.dtype)).requires_grad_(True)
    with torch.enable_grad():
        rows = kl_distill(student, teacher_logits, temperature, "none")
        (grad,) = torch.autograd.grad(rows.sum(), student)
    loss = rows if reduction == "none" else kl_distill(student, teacher_logits, temperature, reduction)
    return loss.detach(), grad
