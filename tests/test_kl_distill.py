"""kl_distill (EWS's distillation loss) on every backend against its reference, the torch expression.

Tolerances. The kernels and the reference round differently (one fused pass
against F.log_softmax / F.kl_div), so they agree to float rounding, not to
the bit. With eps the machine epsilon of the maths type (float32, or float64
for float64 logits; float16/bfloat16 logits are widened to float32 exactly),
a = s / T, b = t / T and, per row, scale = max|a| + max|b|:

* KL_row: |KL - KL_ref| <= 16 eps (scale + log K + 1). The bound is absolute:
  a KL that is tiny next to the logits (a teacher close to the student) has a
  large relative error in every implementation, the reference included.
  Measured worst cases over 0.1*randn to 30*randn logits, T from 0.3 to 4,
  teachers near and far: 4 (CPU) and 15 (Triton) units of eps (scale + log K
  + 1) against the reference; against a float64 evaluation, 2 (CPU), 9
  (Triton) and 7 (the float32 reference itself). On this file's inputs
  (3*randn, T in {0.5, 1, 2.5}) at most 2. For 3*randn logits and T = 1 the
  batchmean loss agrees with the reference to about 1e-7 relative in float32
  (3e-7 at T = 4) and 2e-16 in float64.
* the reductions: the rows' bound, reduced as the loss is, plus 8 eps
  relative (the reference sums the N*K terms in another order).
* gradient d KL_row / d s: |g - g_ref| <= 2 eps (1 + scale) / T times
  |d loss / d KL_row| (measured worst case 0.7, on this file's inputs 0.2);
  a float16 or bfloat16 gradient may also differ by one rounding of the final
  cast. For 3*randn logits, K = 1000 and T = 1 the bound is about 5e-6 in
  float32 and the observed error about 1e-7 (2e-16 in float64), before the
  reduction's scale (1/N for batchmean).
"""
import math

import pytest
import torch

import robustdrop
from robustdrop.ews import kl_distill
from robustdrop.reference import kl_distill as reference
from robustdrop.reference.kl_distill import math_dtype
from conftest import COMPILED_DEVICES, DEVICE_BACKENDS, EMULATED_CUDA, KERNEL_BACKENDS, python_calls_in_autograd

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]

# (N, K): K not a multiple of any vector width, K = 1, one row, and K past one Triton chunk (4096).
SHAPES = [(6, 1000), (5, 7), (4, 1), (1, 33), (3, 130)]
WIDE = (2, 5000)
TEMPERATURES = [1.0, 2.5, 0.5]
ROW_TOLERANCE = 16.0
GRAD_TOLERANCE = 2.0


def forward_op(backend: str):
    return torch.ops.robustdrop.kl_distill_forward_triton if backend == "triton" else \
        torch.ops.robustdrop.kl_distill_forward


def logits(shape, dtype, device, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def row_scale(student, teacher, temperature):
    """max|s / T| + max|t / T| per row (N,), in float64 (0 for K = 0)."""
    if student.shape[1] == 0:
        return torch.zeros(student.shape[0], dtype=torch.float64, device=student.device)
    a = student.double() / temperature
    b = teacher.double() / temperature
    return a.abs().amax(1) + b.abs().amax(1)


def row_bound(student, teacher, temperature):
    """The tolerance of each KL_row (N,) (module docstring)."""
    eps = torch.finfo(math_dtype(student.dtype)).eps
    return ROW_TOLERANCE * eps * (row_scale(student, teacher, temperature) + math.log(max(student.shape[1], 1)) + 1)


def grad_bound(student, teacher, temperature):
    """The tolerance of each row's gradient d KL_row / d s (N, 1) (module docstring)."""
    eps = torch.finfo(math_dtype(student.dtype)).eps
    return (GRAD_TOLERANCE * eps * (1 + row_scale(student, teacher, temperature)) / temperature).unsqueeze(1)


def assert_within(actual, expected, bound, what):
    error = (actual.double() - expected.double()).abs()
    assert bool((error <= bound).all()), f"{what}: worst error {error.max().item():.3g}, bound {bound}"


def assert_grad_close(actual, expected, bound, what):
    """Within bound, plus one rounding of a float16/bfloat16 gradient."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype in (torch.float16, torch.bfloat16):
        bound = bound + torch.finfo(actual.dtype).eps * expected.double().abs()
    assert_within(actual, expected, bound, what)


def divisor(reduction, shape):
    """What the loss divides the sum of the rows of logits ``shape`` (N, K) by (1 for "none": no sum)."""
    return max({"none": 1, "sum": 1, "batchmean": shape[0], "mean": shape[0] * shape[1]}[reduction], 1)


def reduce_bound(rows_bound, reduction, shape):
    if reduction == "none":
        return rows_bound
    return rows_bound.sum() / divisor(reduction, shape)


# --------------------------------------------------------------------------- the op


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_op_matches_reference(device, backend, dtype):
    op = forward_op(backend)
    for index, shape in enumerate(SHAPES + [WIDE]):
        for temperature in TEMPERATURES:
            s = logits(shape, dtype, device, seed=2 * index)
            t = logits(shape, dtype, device, seed=2 * index + 1)
            rows, grad = op(s, t, temperature, "none")
            expected_rows, expected_grad = reference.kl_distill_forward(s, t, temperature, "none")
            assert rows.dtype == grad.dtype == math_dtype(dtype)
            assert rows.shape == shape[:1] and grad.shape == shape
            assert_within(rows, expected_rows, row_bound(s, t, temperature), f"{shape} T={temperature} rows")
            assert_within(grad, expected_grad, grad_bound(s, t, temperature), f"{shape} T={temperature} grad")


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_op_reduces_the_rows_and_returns_the_row_gradient(device, backend, dtype, reduction):
    shape, temperature = (6, 45), 1.5
    s = logits(shape, dtype, device, seed=27)
    t = logits(shape, dtype, device, seed=28)
    loss, grad = forward_op(backend)(s, t, temperature, reduction)
    rows, rows_grad = forward_op(backend)(s, t, temperature, "none")
    expected_loss, expected_grad = reference.kl_distill_forward(s, t, temperature, reduction)
    assert loss.dtype == math_dtype(dtype) and loss.shape == expected_loss.shape
    assert loss.shape == ((shape[0],) if reduction == "none" else ())
    bound = reduce_bound(row_bound(s, t, temperature), reduction, shape)
    assert_within(loss, expected_loss, bound + 8 * torch.finfo(loss.dtype).eps * expected_loss.double().abs(), "loss")
    assert torch.equal(grad, rows_grad)  # the reduction is applied in the backward, not to the saved gradient
    assert_within(grad, expected_grad, grad_bound(s, t, temperature), "grad")


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_op_autograd_scales_the_saved_gradient(device, backend, dtype, reduction):
    s = logits((3, 21), dtype, device, seed=25).requires_grad_(True)
    t = logits((3, 21), dtype, device, seed=26).requires_grad_(True)
    loss, saved = forward_op(backend)(s, t, 2.0, reduction)
    assert loss.requires_grad and not saved.requires_grad
    if reduction == "none":
        weight = torch.tensor([0.5, -2.0, 3.0], device=device)
        row_scale = weight.unsqueeze(-1)
    else:
        weight = torch.tensor(-2.5, device=device)
        row_scale = weight / divisor(reduction, (3, 21))
    grad_s, grad_t = torch.autograd.grad(loss, (s, t), weight, allow_unused=True)
    assert grad_t is None
    assert torch.equal(grad_s, (saved * row_scale).to(dtype))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_identical_logits_give_zero(device, backend):
    s = logits((3, 257), torch.float32, device, seed=0)
    rows, grad = forward_op(backend)(s, s.clone(), 1.7, "none")
    assert torch.equal(rows, torch.zeros_like(rows))  # exactly: the two normalisers are the same sums
    # The gradient's two terms may round differently (a fused multiply-add).
    assert_within(grad, torch.zeros_like(grad), grad_bound(s, s, 1.7), "grad")


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_large_logits_stay_finite(device, backend):
    s = logits((4, 100), torch.float32, device, seed=3, scale=1.0).sign() * 1e4
    t = logits((4, 100), torch.float32, device, seed=4, scale=1e4)
    for temperature in (1.0, 3.0):
        rows, grad = forward_op(backend)(s, t, temperature, "none")
        assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
        expected_rows, expected_grad = reference.kl_distill_forward(s, t, temperature, "none")
        assert_within(rows, expected_rows, row_bound(s, t, temperature), "rows")
        assert_within(grad, expected_grad, grad_bound(s, t, temperature), "grad")


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_logits_near_the_float32_limit_stay_finite(device, backend):
    """Logits of +-3e38 at T = 2: s / T - max(s / T) is finite, where s - max(s) overflows before the
    division; every backend scales first, as the reference does."""
    s = torch.tensor([[3e38, -3e38, 1.0], [-3e38, 3e38, 0.0]], device=device)
    t = torch.tensor([[-3e38, 3e38, 0.0], [3e38, -3e38, 1.0]], device=device)
    rows, grad = forward_op(backend)(s, t, 2.0, "none")
    expected_rows, expected_grad = reference.kl_distill_forward(s, t, 2.0, "none")
    assert torch.isfinite(expected_rows).all() and torch.isfinite(rows).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(rows, expected_rows, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_nan_reaches_its_row_only(device, backend):
    s = logits((4, 37), torch.float32, device, seed=23)
    t = logits((4, 37), torch.float32, device, seed=24)
    clean_rows, clean_grad = forward_op(backend)(s, t, 1.0, "none")
    s[1, 5] = float("nan")
    t[2, 36] = -float("nan")
    rows, grad = forward_op(backend)(s, t, 1.0, "none")
    assert torch.isnan(rows[1:3]).all() and torch.isnan(grad[1:3]).all()
    keep = torch.tensor([0, 3], device=device)
    assert torch.equal(rows[keep], clean_rows[keep]) and torch.equal(grad[keep], clean_grad[keep])


# --------------------------------------------------------------------------- the public API


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_public_api_loss_and_gradient_match_reference(device, backend, dtype, reduction):
    shape, temperature = (5, 37), 2.5
    s = logits(shape, dtype, device, seed=5).requires_grad_(True)
    t = logits(shape, dtype, device, seed=6)
    loss = kl_distill(s, t, temperature=temperature, reduction=reduction, backend=backend)
    expected = reference.kl_distill(s, t, temperature, reduction)
    assert loss.dtype == math_dtype(dtype) and loss.shape == expected.shape
    assert loss.shape == ((shape[0],) if reduction == "none" else ())
    bound = reduce_bound(row_bound(s, t, temperature), reduction, shape)
    assert_within(loss, expected, bound + 8 * torch.finfo(loss.dtype).eps * expected.double().abs(), "loss")
    weight = torch.linspace(-1, 2, loss.numel(), device=device, dtype=loss.dtype).view(loss.shape)
    (grad,) = torch.autograd.grad(loss, s, weight)
    (expected_grad,) = torch.autograd.grad(expected, s, weight)
    rows_weight = weight.double().abs() * (1.0 / divisor(reduction, shape))
    bound = grad_bound(s, t, temperature) * (rows_weight.unsqueeze(1) if reduction == "none" else rows_weight)
    assert_grad_close(grad, expected_grad, bound, "grad")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_default_is_batchmean_at_temperature_one(device, backend):
    s = logits((4, 10), torch.float32, device, seed=7)
    t = logits((4, 10), torch.float32, device, seed=8)
    loss = kl_distill(s, t, backend=backend)
    expected = reference.kl_distill(s, t, 1.0, "batchmean")
    assert_within(loss, expected, row_bound(s, t, 1.0).sum() / 4 + 1e-6 * expected.abs(), "loss")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_teacher_gets_no_gradient(device, backend):
    s = logits((3, 11), torch.float32, device, seed=9).requires_grad_(True)
    t = logits((3, 11), torch.float32, device, seed=10).requires_grad_(True)
    loss = kl_distill(s, t, temperature=2.0, backend=backend)
    assert loss.requires_grad
    loss.backward()
    assert t.grad is None and s.grad is not None and s.grad.shape == s.shape


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradcheck_float64(device, backend):
    s = logits((3, 6), torch.float64, device, seed=11).requires_grad_(True)
    t = logits((3, 6), torch.float64, device, seed=12)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda x: kl_distill(x, t, temperature=1.7, reduction=reduction, backend=backend), (s,))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_double_backward_is_a_clear_error(device, backend):
    s = logits((2, 5), torch.float64, device, seed=13).requires_grad_(True)
    t = logits((2, 5), torch.float64, device, seed=14)
    loss = kl_distill(s, t, backend=backend)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_opcheck(device, backend):
    s = logits((3, 10), torch.float32, device, seed=15).requires_grad_(True)
    t = logits((3, 10), torch.float32, device, seed=16)
    for reduction in REDUCTIONS:
        torch.library.opcheck(forward_op(backend), (s, t, 1.5, reduction))
    torch.library.opcheck(forward_op(backend), (s.detach().to(torch.float64), t.to(torch.float64), 0.5, "mean"))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(device, backend):
    torch._dynamo.reset()
    teacher = logits((4, 9), torch.float32, device, seed=17)

    def step(x, teacher):
        return kl_distill(x * 1.5, teacher, temperature=2.0, backend=backend) * 3.0

    compiled = torch.compile(step, fullgraph=True)
    x = logits((4, 9), torch.float32, device, seed=18).requires_grad_(True)
    loss = compiled(x, teacher)
    (grad,) = torch.autograd.grad(loss, x)
    loss_eager = step(x, teacher)
    (grad_eager,) = torch.autograd.grad(loss_eager, x)
    torch.testing.assert_close(loss, loss_eager)
    torch.testing.assert_close(grad, grad_eager)


@pytest.mark.skipif(EMULATED_CUDA, reason="the emulated CUDA ops have no meta kernels (the real ops' fake "
                                          "implementations answer in the plain pass)")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_compile_dynamic_sizes_make_one_graph(device, backend, reduction):
    """With dynamic=True one graph serves every batch and class count, the backward's reduction
    divisor included (a size read as an int would fix them): eager's loss and gradient at each."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def loss(student, teacher):
        return kl_distill(student, teacher, temperature=1.5, reduction=reduction, backend=backend)

    compiled = torch.compile(loss, dynamic=True, fullgraph=True, backend="aot_eager")
    for index, (rows, classes) in enumerate(((3, 7), (5, 7), (6, 11), (2, 13))):
        student = logits((rows, classes), torch.float32, device, seed=40 + index).requires_grad_(True)
        teacher = logits((rows, classes), torch.float32, device, seed=50 + index)
        grad_loss = torch.rand(rows if reduction == "none" else (), device=device)
        value = compiled(student, teacher)
        (grad,) = torch.autograd.grad(value, student, grad_loss)
        value_eager = loss(student, teacher)
        (grad_eager,) = torch.autograd.grad(value_eager, student, grad_loss)
        assert torch.equal(value, value_eager) and torch.equal(grad, grad_eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.skipif(EMULATED_CUDA, reason="the emulated CUDA ops have no meta kernels (the real ops' fake "
                                          "implementations answer in the plain pass)")
@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_export_with_a_dynamic_batch(device, backend):
    class Distill(torch.nn.Module):
        def forward(self, student, teacher):
            return kl_distill(student, teacher, backend=backend)

    batch = torch.export.Dim("batch", min=2, max=64)
    example = (logits((6, 10), torch.float32, device, seed=60), logits((6, 10), torch.float32, device, seed=61))
    program = torch.export.export(Distill(), example, dynamic_shapes={"student": {0: batch}, "teacher": {0: batch}})
    student, teacher = logits((9, 10), torch.float32, device, seed=62), logits((9, 10), torch.float32, device, seed=63)
    assert torch.equal(program.module()(student, teacher), kl_distill(student, teacher, backend=backend))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_inputs(device, backend):
    base_s = logits((6, 40), torch.float32, device, seed=19)
    base_t = logits((6, 40), torch.float32, device, seed=20)
    layouts = {
        "transposed": lambda x: x.t().contiguous().t(),
        "column slice": lambda x: torch.cat([x[:, :3], x], dim=1)[:, 3:],  # row stride 43, unaligned
        "strided": lambda x: torch.stack([x, -x], dim=-1)[..., 0],
    }
    expected = kl_distill(base_s, base_t, temperature=1.3, reduction="none", backend=backend)
    for name, layout in layouts.items():
        s, t = layout(base_s), layout(base_t)
        assert torch.equal(s, base_s) and not s.is_contiguous(), name
        s.requires_grad_(True)
        loss = kl_distill(s, t, temperature=1.3, reduction="none", backend=backend)
        assert_within(loss, expected, row_bound(base_s, base_t, 1.3), name)
        (grad,) = torch.autograd.grad(loss.sum(), s)
        assert grad.shape == s.shape


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 10), (4, 0), (0, 0)])
def test_empty_inputs_give_zero(device, backend, shape):
    for dtype in (torch.float32, torch.float64):
        for reduction in REDUCTIONS:
            s = torch.zeros(shape, device=device, dtype=dtype, requires_grad=True)
            t = torch.zeros(shape, device=device, dtype=dtype)
            loss = kl_distill(s, t, reduction=reduction, backend=backend)
            assert loss.dtype == dtype
            if reduction == "none":
                assert loss.shape == (shape[0],) and torch.equal(loss, torch.zeros_like(loss))
            else:
                assert loss.shape == () and loss.item() == 0.0
            (grad,) = torch.autograd.grad(loss.sum(), s)
            assert grad.shape == shape and grad.dtype == dtype


def test_saved_for_backward_is_the_float32_gradient_only():
    if not robustdrop.backends()["cpu"].available:
        pytest.skip("the compiled extension is not built")
    s = logits((32, 100), torch.float16, "cpu", seed=21).requires_grad_(True)
    t = logits((32, 100), torch.float16, "cpu", seed=22)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        kl_distill(s, t, backend="cpu")
    assert [(tuple(x.shape), x.dtype) for x in saved] == [((32, 100), torch.float32)]


# --------------------------------------------------------------------------- bad input

BAD_CALLS = [
    (dict(student_logits=[[1.0]]), TypeError, "student_logits must be a torch.Tensor"),
    (dict(teacher_logits=None), TypeError, "teacher_logits must be a torch.Tensor"),
    (dict(student_logits=torch.ones(3, 8, dtype=torch.int64)), TypeError, "student_logits must be a floating-point"),
    (dict(teacher_logits=torch.ones(3, 8, dtype=torch.int32)), TypeError, "teacher_logits must be a floating-point"),
    (dict(student_logits=torch.randn(3, 8, 2), teacher_logits=torch.randn(3, 8, 2)), ValueError,
     r"student_logits must be 2-D \(N, K\)"),
    (dict(student_logits=torch.randn(8)), ValueError, r"student_logits must be 2-D \(N, K\)"),
    (dict(teacher_logits=torch.randn(3, 7)), ValueError, "teacher_logits must have student_logits' shape"),
    (dict(teacher_logits=torch.randn(3, 8, dtype=torch.float64)), TypeError,
     "teacher_logits must have student_logits' dtype"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=10**400), ValueError, "temperature must be a finite number > 0"),
    # 1 / T would overflow float32, the maths type of float32 logits.
    (dict(temperature=1e-39), ValueError, r"temperature must be at least 1 / 3.402823e\+38 for torch.float32 logits"),
    (dict(temperature="2"), TypeError, "temperature must be a real number"),
    (dict(temperature=True), TypeError, "temperature must be a real number"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bad,error,message", BAD_CALLS)
def test_bad_input_is_a_clear_error(device, backend, bad, error, message):
    args = dict(student_logits=torch.randn(3, 8), teacher_logits=torch.randn(3, 8), temperature=1.0,
                reduction="batchmean")
    args.update(bad)
    args = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    with pytest.raises(error, match=message):
        kl_distill(args.pop("student_logits"), args.pop("teacher_logits"), backend=backend, **args)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_ops_called_directly_reject_bad_input(device, backend):
    def op(student, teacher, temperature, reduction="batchmean"):
        return forward_op(backend)(student, teacher, temperature, reduction)

    s = torch.randn(3, 8, device=device)
    with pytest.raises(TypeError, match="student_logits must be a floating-point"):
        op(s.long(), s, 1.0)
    with pytest.raises(TypeError, match="teacher_logits must be a floating-point"):
        op(s, s.long(), 1.0)
    with pytest.raises(ValueError, match=r"student_logits must be 2-D \(N, K\)"):
        op(s[0], s[0], 1.0)
    with pytest.raises(ValueError, match="teacher_logits must have student_logits' shape"):
        op(s, s[:, :7], 1.0)
    with pytest.raises(TypeError, match="teacher_logits must have student_logits' dtype"):
        op(s, s.double(), 1.0)
    for temperature in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            op(s, s, temperature)
    for logits in (s, s.half(), s.bfloat16()):
        with pytest.raises(ValueError, match="temperature must be at least 1 / 3.40282"):
            op(logits, logits, 1e-39)
    rows, _ = op(s.double(), s.double(), 1e-39, "none")  # 1e39 is a float64
    assert torch.equal(rows, torch.zeros_like(rows))
    for reduction in ("avg", "", "Sum"):
        with pytest.raises(ValueError, match=r"reduction must be one of \('batchmean', 'sum', 'mean', 'none'\), "
                                             f"got '{reduction}'"):
            op(s, s, 1.0, reduction)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_compiled_op_autograd_runs_no_python(device):
    student = torch.randn(4, 7, device=device, requires_grad=True)
    teacher = torch.randn(4, 7, device=device)
    forward = torch.ops.robustdrop.kl_distill_forward
    loss_op = torch.ops.robustdrop.kl_distill
    for reduction in REDUCTIONS:
        assert python_calls_in_autograd(lambda s: forward(s, teacher, 2.0, reduction)[0], student) == []
        assert python_calls_in_autograd(lambda s: loss_op(s, teacher, 2.0, reduction), student) == []


# --------------------------------------------------------------------------- the loss op
# robustdrop::kl_distill, what the public API calls on the compiled backends: kl_distill_forward's
# loss, with the row gradient private to its autograd node, which scales it in place on its last use.


def backward_ops(loss, inputs, **kwargs):
    """The aten ops that ``torch.autograd.grad(loss, inputs, **kwargs)`` runs, and its result."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        grads = torch.autograd.grad(loss, inputs, **kwargs)
    return {event.name for event in profile.events()}, grads


@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_op_equals_the_forward_op_to_the_bit(device, dtype, reduction):
    s = logits((5, 33), dtype, device, seed=29).requires_grad_(True)
    t = logits((5, 33), dtype, device, seed=30)
    loss = torch.ops.robustdrop.kl_distill(s, t, 1.5, reduction)
    expected, _ = torch.ops.robustdrop.kl_distill_forward(s, t, 1.5, reduction)
    assert torch.equal(loss, expected)
    weight = torch.linspace(-1, 2, loss.numel(), device=device, dtype=loss.dtype).view(loss.shape)
    ops, (grad,) = backward_ops(loss, s, grad_outputs=weight)
    assert "aten::mul_" in ops and "aten::mul" not in ops  # the saved gradient's buffer, scaled in place
    (expected_grad,) = torch.autograd.grad(expected, s, weight)
    assert grad.dtype == dtype and torch.equal(grad, expected_grad)
    with torch.inference_mode():  # below autograd: the op's own kernel
        assert torch.equal(torch.ops.robustdrop.kl_distill(s, t, 1.5, reduction), expected)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_loss_op_scales_a_copy_while_the_graph_is_kept(device):
    s = logits((4, 50), torch.float32, device, seed=31).requires_grad_(True)
    t = logits((4, 50), torch.float32, device, seed=32)
    loss = kl_distill(s, t, backend="cpu" if device == "cpu" else "cuda")
    ops_kept, (first,) = backward_ops(loss, s, retain_graph=True)
    ops_again, (second,) = backward_ops(loss, s, retain_graph=True)
    ops_last, (last,) = backward_ops(loss, s)
    assert "aten::mul" in ops_kept and "aten::mul_" not in ops_kept
    assert "aten::mul" in ops_again and "aten::mul_" in ops_last
    assert torch.equal(first, second) and torch.equal(first, last)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, s)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_loss_op_leaves_a_tensor_kept_by_saved_tensor_hooks_alone(device):
    s = logits((4, 50), torch.float32, device, seed=33).requires_grad_(True)
    t = logits((4, 50), torch.float32, device, seed=34)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: kept.append((x, x.clone())) or x, lambda x: x):
        loss = torch.ops.robustdrop.kl_distill(s, t, 1.0, "batchmean")
    ops, (grad,) = backward_ops(loss, s)
    assert "aten::mul_" not in ops
    assert len(kept) == 1 and torch.equal(kept[0][0], kept[0][1])
    (expected,) = torch.autograd.grad(torch.ops.robustdrop.kl_distill(s, t, 1.0, "batchmean"), s)
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_loss_op_gradients_accumulate(device):
    s = logits((3, 20), torch.float32, device, seed=35).requires_grad_(True)
    t = logits((3, 20), torch.float32, device, seed=36)
    (single,) = torch.autograd.grad(torch.ops.robustdrop.kl_distill(s, t, 1.0, "sum"), s)
    torch.ops.robustdrop.kl_distill(s, t, 1.0, "sum").backward()
    torch.ops.robustdrop.kl_distill(s, t, 1.0, "sum").backward()
    assert torch.equal(s.grad, single * 2)
    s.grad = None
    loss = torch.ops.robustdrop.kl_distill(s, t, 1.0, "sum")
    (loss * 2 + torch.ops.robustdrop.kl_distill(s, t, 1.0, "sum")).backward()
    torch.testing.assert_close(s.grad, single * 3)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_loss_op_opcheck_and_bad_input(device):
    s = logits((3, 10), torch.float32, device, seed=37).requires_grad_(True)
    t = logits((3, 10), torch.float32, device, seed=38)
    for reduction in REDUCTIONS:
        torch.library.opcheck(torch.ops.robustdrop.kl_distill, (s, t, 1.5, reduction))
    with pytest.raises(ValueError, match="reduction must be one of"):
        torch.ops.robustdrop.kl_distill(s, t, 1.0, "avg")
    with pytest.raises(ValueError, match="teacher_logits must have student_logits' shape"):
        torch.ops.robustdrop.kl_distill(s, t[:, :9], 1.0, "sum")
