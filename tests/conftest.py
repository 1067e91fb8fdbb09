"""Test set-up: which backends run on which device here.

Without a GPU the Triton kernels run through the interpreter, which must be
switched on before Triton is first imported.
"""
import contextlib
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import robustdrop  # noqa: E402
from robustdrop._backend import triton_interpreted  # noqa: E402

# ROBUSTDROP_EMULATE_CUDA=1: the compiled cpu backend runs the CUDA kernels of csrc/cuda, built
# for the CPU against the CUDA execution model of tests/cuda_emulation, so the op tests check
# them where there is no GPU (scripts/test.sh runs the op tests so once more). The tests still
# name the backend "cpu"; a lookup of torch.ops.robustdrop.<op> answers with the emulated op
# where there is one (the Triton ops, registered from Python, stay as they are).
EMULATED_CUDA = os.environ.get("ROBUSTDROP_EMULATE_CUDA") == "1"
# (thread order, block order, shuffle seed, multiprocessors) of the emulated op tests: blocks and
# threads shuffled on 3 multiprocessors, so grid-stride loops take several steps and no kernel can
# lean on the order its threads happen to run in.
EMULATED_SCHEDULE = (2, 2, 1, 3)


# ROBUSTDROP_SANITIZED_CPU=1: the cpu backend is robustdrop._C built with Address- and
# UndefinedBehaviorSanitizer (tests/sanitized_cpu), whose pass in scripts/test.sh runs the op tests
# on that backend alone, as the emulated pass does: the others run none of the C++ kernels.
SANITIZED_CPU = os.environ.get("ROBUSTDROP_SANITIZED_CPU") == "1"


class _EmulatedOpsFirst:
    def __init__(self, emulated, real):
        self._emulated, self._real = emulated, real

    def __getattr__(self, name):
        try:
            return getattr(self._emulated, name)
        except AttributeError:
            return getattr(self._real, name)


if EMULATED_CUDA:
    from cuda_emulation import build as _emulation_build  # noqa: E402

    _emulated_ops = _emulation_build.load()
    _emulated_ops.emulator_configure(*EMULATED_SCHEDULE)
    torch.ops.robustdrop = _EmulatedOpsFirst(_emulated_ops, torch.ops.robustdrop)


# ROBUSTDROP_RECORD_TRITON_LAUNCHES=FILE, where the Triton kernels are interpreted: every launch's
# specialisation goes to FILE at the end of the session, for gpu_compile/compile_triton.py to
# compile those kernels for an H100 (scripts/test.sh does both).
TRITON_LAUNCH_RECORD = os.environ.get("ROBUSTDROP_RECORD_TRITON_LAUNCHES") if os.environ.get("TRITON_INTERPRET") == "1" else None
if TRITON_LAUNCH_RECORD:
    from gpu_compile import record as _launch_record  # noqa: E402

    _launch_record.install()


def pytest_sessionfinish(session, exitstatus):
    if TRITON_LAUNCH_RECORD:
        _launch_record.save(TRITON_LAUNCH_RECORD)


# ROBUSTDROP_TEST_OUTCOMES=FILE: "outcome nodeid seconds" appended to FILE as each test ends (by the
# xdist controller only, which sees every worker's reports), so that a run stopped at its time limit
# (benchmarks/gpu_check.sh on a GPU lease) still says what ran and what failed.
TEST_OUTCOMES = None if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.get("ROBUSTDROP_TEST_OUTCOMES")


def pytest_runtest_logreport(report):
    # The call phase of every test; setup and teardown only when they did not pass (a skip or an error).
    if TEST_OUTCOMES and (report.when == "call" or not report.passed):
        outcome = report.outcome if report.when == "call" or report.skipped else "error"
        with open(TEST_OUTCOMES, "a") as handle:
            handle.write(f"{outcome} {report.nodeid} {report.duration:.2f}s\n")


def available_backends(device: str) -> list[str]:
    """The backends that run on tensors of ``device`` here (in the emulated and the sanitized passes,
    the compiled cpu backend only).

    Triton takes CPU tensors only through its interpreter, which is off where there is a GPU."""
    status = robustdrop.backends()
    if device == "cuda":
        wanted = ("cuda", "triton", "reference")
    else:
        wanted = ("cpu", "triton", "reference") if triton_interpreted() else ("cpu", "reference")
    if EMULATED_CUDA or SANITIZED_CPU:
        wanted = ("cpu",)
    return [name for name in wanted if status[name].available]


# What checks the Python registrations rather than the kernels: the fake (meta) kernels and the
# compiled autograd exist for the robustdrop library only.
_REGISTRATION_TESTS = ("opcheck", "torch_compile", "autograd_runs_no_python")


def pytest_collection_modifyitems(config, items):
    if not EMULATED_CUDA:
        return
    skip = pytest.mark.skip(reason="registrations of the robustdrop library, not of its emulated twin")
    for item in items:
        if any(name in item.name for name in _REGISTRATION_TESTS):
            item.add_marker(skip)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# ROBUSTDROP_TEST_DEVICES=cuda keeps only the CUDA parametrisations (benchmarks/gpu_check.sh runs
# the op tests so under compute-sanitizer); tests written for one device are unaffected.
if os.environ.get("ROBUSTDROP_TEST_DEVICES"):
    DEVICES = [device for device in DEVICES if device in os.environ["ROBUSTDROP_TEST_DEVICES"].split(",")]
# The devices whose compiled kernels (the cpu and cuda backends) are built here.
COMPILED_DEVICES = [device for device in DEVICES if robustdrop.backends()[device].available]
DEVICE_BACKENDS = [(device, backend) for device in DEVICES for backend in available_backends(device)]
KERNEL_BACKENDS = [(device, backend) for device, backend in DEVICE_BACKENDS if backend != "reference"]


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor):
    """Equal to the last bit, NaN included, and of the same dtype and shape."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.is_floating_point():
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
        actual, expected = actual.view(width), expected.view(width)
    assert torch.equal(actual.cpu(), expected.cpu())


# NaNs of each dtype by their bits: signalling and quiet, either sign, with payloads. A multiply by 1.0
# would quiet the signalling ones, and a float32 round trip canonicalises bfloat16's.
NAN_BITS = {
    torch.float32: [0x7F800001, 0xFFC00001 - (1 << 32), 0x7FC12345, 0xFF812345 - (1 << 32)],
    torch.float64: [0x7FF0000000000001, 0xFFF8000000000123 - (1 << 64), 0x7FF8000012345678, 0x7FF4000000000000],
    torch.float16: [0x7C01, 0xFE01 - (1 << 16), 0x7E55, 0xFC02 - (1 << 16)],
    torch.bfloat16: [0x7F81, 0xFFC0 - (1 << 16), 0x7FC5, 0xFF82 - (1 << 16)],
}


def nan_payloads(shape, dtype, device) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` that cycles through NAN_BITS and two ordinary values."""
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]
    ordinary = torch.tensor([1.5, -0.0], dtype=dtype).view(width).tolist()
    bits = torch.tensor(NAN_BITS[dtype] + ordinary, dtype=width)
    count = 1
    for size in shape:
        count *= size
    return bits.repeat(count // len(bits) + 1)[:count].view(dtype).reshape(shape).to(device)


def assert_backend_matches_reference(call, x: torch.Tensor, backend: str):
    """call(x, backend_name) -> y gives the reference's y and gradient, to the bit, in x's dtype."""
    outputs = []
    for name in (backend, "reference"):
        y = call(x, name)
        g = torch.linspace(-2, 3, y.numel(), device=x.device).view(y.shape).to(x.dtype)
        outputs.append((y.detach(), torch.autograd.grad(y, x, g)[0]))
    assert outputs[0][0].dtype == x.dtype
    for actual, expected in zip(*outputs):
        assert_same_bits(actual, expected)


def assert_gradients_check(fn, x: torch.Tensor, *, backend: str):
    """torch.autograd.gradcheck and gradgradcheck of fn at the float64 x, fn running ``backend``.

    Where the Triton kernels run in the interpreter (the triton backend on the CPU) a forward takes
    0.1 to 1 s, and the full Jacobian needs one per element of x, and of x and the gradient for the
    second order: there both checks take one random direction (fast_mode), which still fails when
    the backward is not the forward's Jacobian. The full Jacobians are checked on the other backends,
    and each op's tests hold the interpreted kernels' gradients equal to the reference's bit for bit.
    """
    fast = backend == "triton" and x.device.type == "cpu"
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=fast)


def assert_drawn_seed_variant(op, args: tuple, seed_position: int):
    """The ``_drawn_seed`` variant of the seeded forward op ``op`` (what a drawn seed goes through under
    torch.compile) with ``args``' seed as a 0-d int64 CPU tensor: registered soundly (opcheck), and
    ``op``'s outputs and x's gradient (x, args[0], requiring grad), to the bit."""
    variant = getattr(torch.ops.robustdrop, op._qualified_op_name.split("::")[1] + "_drawn_seed")
    variant_args = args[:seed_position] + (torch.tensor(args[seed_position]),) + args[seed_position + 1:]
    torch.library.opcheck(variant, variant_args)
    results = []
    for call, call_args in ((variant, variant_args), (op, args)):
        outputs = call(*call_args)
        g = torch.linspace(-2, 3, outputs[0].numel(), device=outputs[0].device).view(outputs[0].shape)
        results.append(list(outputs) + list(torch.autograd.grad(outputs[0], args[0], g.to(outputs[0].dtype))))
    for actual, expected in zip(*results):
        assert_same_bits(actual, expected)


def memory_layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x (N, C, H, W) with the same values in the layouts the kernels must handle.

    Where x has a dimension of size 1, also contiguous and channels_last
    copies whose size-1 dimensions have strides no dense layout gives them:
    such a stride is arbitrary (``is_contiguous`` ignores it), so a kernel
    must derive its strides from the layout, never read them from x.
    """
    layouts = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": torch.stack([x, -x], dim=-1)[..., 0],
        "transposed": x.transpose(2, 3).contiguous().transpose(2, 3),
    }
    if 1 in x.shape:
        for name, dense in (("contiguous", x.contiguous()), ("channels_last", layouts["channels_last"])):
            strides = [1000 + dim if size == 1 else stride
                       for dim, (size, stride) in enumerate(zip(x.shape, dense.stride()))]
            layouts[f"{name}, odd size-1 strides"] = dense.as_strided(x.shape, strides)
    return layouts


def assert_compiled_matches_eager(step, x: torch.Tensor, *args, seeds=(3, 4)):
    """torch.compile(step, fullgraph=True)(x, *args, seed) gives eager's loss and gradient for each seed."""
    compiled = torch.compile(step, fullgraph=True)
    for seed in seeds:
        loss = compiled(x, *args, seed)
        (grad,) = torch.autograd.grad(loss, x)
        loss_eager = step(x, *args, seed)
        (grad_eager,) = torch.autograd.grad(loss_eager, x)
        assert torch.equal(grad, grad_eager)
        torch.testing.assert_close(loss, loss_eager)


def assert_compiled_follows_map_sizes(call, device):
    """``call(x)``, a block-dropping op on x (N, C, H, W) with a float drop rate and a fixed seed,
    compiled with fullgraph=True and given maps of new sizes, square and not: torch.compile makes H
    and W dynamic at the second size, and each call gives eager's output and gradient, bit for bit
    (a float drop rate turned symbolic must not reach the op as a float argument: its guard fails
    for 7x9 and 9x7)."""
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    for height, width in ((8, 8), (7, 9), (9, 7), (11, 6)):
        x = torch.randn(2, 4, height, width, device=device, requires_grad=True)
        grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(height)).to(device)
        y = compiled(x)
        (grad,) = torch.autograd.grad(y, x, grad_y)
        y_eager = call(x)
        (grad_eager,) = torch.autograd.grad(y_eager, x, grad_y)
        assert_same_bits(y, y_eager)
        assert_same_bits(grad, grad_eager)


def assert_in_place_rate_runs_one_graph(call, x: torch.Tensor):
    """``call(x, p)`` compiled with fullgraph=True and given one 0-d float64 CPU rate changed in place:
    no recompilation over a schedule of rates, 0 included, and each step gives eager's bits for the
    float rate under the same torch.manual_seed."""
    torch._dynamo.reset()
    rate = torch.zeros((), dtype=torch.float64)
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (0.05, 0.1, 0.2, 0.0, 0.3):
            rate.fill_(value)
            torch.manual_seed(4)
            y = compiled(x, rate)
            torch.manual_seed(4)
            assert_same_bits(y, call(x, value))


def python_calls_in_autograd(call, x: torch.Tensor) -> list[str]:
    """The Python functions of robustdrop and torch.library that run while ``call(x)`` (x requiring grad)
    computes its output and ``torch.autograd.grad`` its gradient.

    The compiled ops' autograd is C++ (csrc/autograd): calling one directly, forward and backward,
    should run none, which is what keeps their host time low on a GPU."""
    package = os.path.dirname(robustdrop.__file__)
    library = os.path.join(os.path.dirname(torch.__file__), "_library")
    seen = []

    def profile(frame, event, arg):
        filename = frame.f_code.co_filename
        if event == "call" and (filename.startswith(package) or filename.startswith(library)):
            seen.append(f"{filename}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        y = call(x)
        (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    finally:
        sys.setprofile(None)
    assert grad.shape == x.shape
    return seen


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a ROBUSTDROP_BACKEND in the shell must not leak in."""
    monkeypatch.delenv("ROBUSTDROP_BACKEND", raising=False)


@contextlib.contextmanager
def no_host_sync():
    """On a GPU: inside the block, any operation that makes the host wait for the GPU raises
    (``torch.cuda.set_sync_debug_mode("error")``), so a training forward that should run ahead of
    the GPU is checked to."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def run_cpu_command(args: list[str], cwd, timeout: int = 300) -> str:
    """Runs ``python -m robustdrop <args>`` in cwd on the CPU (no GPU, no backend override, no
    Triton interpreter), asserts it succeeds and returns its stdout."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", ROBUSTDROP_BACKEND="")
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "robustdrop", *args], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=str(cwd))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
