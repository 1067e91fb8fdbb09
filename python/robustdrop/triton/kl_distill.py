"""kl_distill's fused forward in Triton, against python/robustdrop/reference/kl_distill.py.

For student and teacher logits (N, K), one program per row n, with a = s / T,
b = t / T and p = softmax(b), q = softmax(a):

    KL_row = sum_k p_k (log p_k - log q_k) = W / Z_t + (M_s - M_t) + log Z_s - log Z_t
    grad_k = (q_k - p_k) / T = (e^(a_k - M_s) / Z_s - e^(b_k - M_t) / Z_t) / T

M = max, Z = sum e^(x - M), W = sum_k e^(b_k - M_t) (b_k - a_k). Loop 1 walks K
in BLOCK chunks keeping, per lane, an online max and the sums Z_s, Z_t and W
relative to it (multiplied by e^(m_old - m_new) when the max grows), then
merges the lanes; loop 2 re-reads the row (from cache) and writes the
gradient. The rows are then reduced as the compiled op reduces them
(``reduce_rows``, a torch sum). Rows and gradient are float32 (float64 for float64
logits), the maths in the same type; 1 / T is rounded once on the host, as on
the CPU and CUDA, and passed in a one-element tensor so that float64 keeps it
exactly.
"""
import torch
import triton
import triton.language as tl

from robustdrop.ops.kl_distill import check_logits, check_reduction, check_temperature, reduce_rows
from robustdrop.reference.kl_distill import math_dtype

from .philox import launch, register_op

# Largest chunk of K one program holds at a time, by DOUBLE: the five per-lane
# accumulators stay in registers (float64 at 4096 spilled on sm_90: 255
# registers and 616 bytes of stack per thread; at 2048, 244 and none).
_MAX_BLOCK = {False: 4096, True: 2048}


@triton.jit
def _kl_distill_kernel(s_ptr, t_ptr, inv_t_ptr, rows_ptr, grad_ptr, K, s_stride, t_stride,
                       DOUBLE: tl.constexpr, BLOCK: tl.constexpr):
    """rows[n] = KL_row and grad[n, :] = its gradient for row n = program_id(0).

    s_ptr, t_ptr: logits with unit stride along K and row strides s_stride,
    t_stride; inv_t_ptr: 1 / T (one element of the maths type); rows_ptr (N,)
    and grad_ptr (N, K) contiguous. Lane maxima start at the lowest finite
    value, and lanes past K read that value, so no inf - inf arises unless
    the logits hold an infinity (which gives NaN, as in the reference).
    """
    dtype: tl.constexpr = tl.float64 if DOUBLE else tl.float32
    lowest: tl.constexpr = -1.7976931348623157e308 if DOUBLE else -3.4028234663852886e38
    n = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + n * s_stride
    t_row = t_ptr + n * t_stride
    g_row = grad_ptr + n * K
    inv_t = tl.load(inv_t_ptr)
    offs = tl.arange(0, BLOCK)
    floor = tl.full([BLOCK], lowest, dtype)  # typed once: a bare float64 constant must not become fp32 -inf
    m_s = floor
    m_t = floor
    z_s = tl.zeros([BLOCK], dtype)
    z_t = tl.zeros([BLOCK], dtype)
    w = tl.zeros([BLOCK], dtype)
    for start in range(0, K, BLOCK):
        cols = start + offs
        inside = cols < K
        a = tl.where(inside, tl.load(s_row + cols, mask=inside, other=0.0).to(dtype) * inv_t, floor)
        b = tl.where(inside, tl.load(t_row + cols, mask=inside, other=0.0).to(dtype) * inv_t, floor)
        new_s = tl.maximum(m_s, a)
        new_t = tl.maximum(m_t, b)
        e_b = tl.where(inside, tl.exp(b - new_t), 0.0)
        scale_t = tl.exp(m_t - new_t)
        z_s = z_s * tl.exp(m_s - new_s) + tl.where(inside, tl.exp(a - new_s), 0.0)
        z_t = z_t * scale_t + e_b
        w = w * scale_t + e_b * (b - a)
        m_s = new_s
        m_t = new_t
    max_s = tl.max(m_s, axis=0)
    max_t = tl.max(m_t, axis=0)
    scale_t = tl.exp(m_t - max_t)
    sum_s = tl.sum(z_s * tl.exp(m_s - max_s), axis=0)
    sum_t = tl.sum(z_t * scale_t, axis=0)
    sum_w = tl.sum(w * scale_t, axis=0)
    tl.store(rows_ptr + n, sum_w / sum_t + (max_s - max_t) + (tl.log(sum_s) - tl.log(sum_t)))
    coef_s = inv_t / sum_s
    coef_t = inv_t / sum_t
    for start in range(0, K, BLOCK):
        cols = start + offs
        inside = cols < K
        a = tl.where(inside, tl.load(s_row + cols, mask=inside, other=0.0).to(dtype) * inv_t, max_s)
        b = tl.where(inside, tl.load(t_row + cols, mask=inside, other=0.0).to(dtype) * inv_t, max_t)
        grad = tl.exp(a - max_s) * coef_s - tl.exp(b - max_t) * coef_t
        tl.store(g_row + cols, grad, mask=inside)


def _unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """x when its rows have unit stride along K, else a contiguous copy."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


@register_op("robustdrop::kl_distill_forward_triton", _kl_distill_kernel)
def kl_distill_forward(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                       reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and the row gradients: ``(loss, grad)`` as ``robustdrop::kl_distill_forward``.

    student_logits, teacher_logits: (N, K) of one dtype (float16/bfloat16/
    float32/float64) on one device, any strides. temperature: finite, > 0.
    reduction: "batchmean", "sum", "mean" or "none". Returns the loss (0-d, or
    the rows (N,) for "none") and grad (N, K) = d KL_row / d s, float32
    (float64 for float64 logits).
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature, student_logits.dtype)
    check_reduction(reduction)
    student = _unit_stride_rows(student_logits)
    teacher = _unit_stride_rows(teacher_logits)
    n, k = student.shape
    dtype = math_dtype(student.dtype)
    grad = torch.empty((n, k), dtype=dtype, device=student.device)
    if n == 0 or k == 0:  # a sum over no classes is 0
        return reduce_rows(torch.zeros((n,), dtype=dtype, device=student.device), reduction, (n, k)), grad
    rows = torch.empty((n,), dtype=dtype, device=student.device)
    inv_t = torch.full((1,), 1.0 / temperature, dtype=dtype, device=student.device)
    double = dtype == torch.float64
    block = min(triton.next_power_of_2(k), _MAX_BLOCK[double])
    launch(_kl_distill_kernel, (n,), student, teacher, inv_t, rows, grad, k, student.stride(0), teacher.stride(0),
           DOUBLE=double, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return reduce_rows(rows, reduction, (n, k)), grad
