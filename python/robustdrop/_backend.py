"""Which backend runs an op (DESIGN.md section 2).

``auto`` picks ``cuda``, else ``triton``, for CUDA tensors and ``cpu`` for CPU
tensors, and falls back to ``reference`` when the compiled extension is
missing. ``ROBUSTDROP_BACKEND`` overrides ``auto``; an explicit backend that
cannot run here is an error that says why.
"""
import functools
import inspect
import os
import warnings
from typing import NamedTuple

import torch

from robustdrop import _checks, _func

BACKEND_NAMES = ("cuda", "triton", "cpu", "reference")
ENV_VARIABLE = "ROBUSTDROP_BACKEND"


class BackendStatus(NamedTuple):
    """Whether a backend can run here and, when it cannot, why."""

    available: bool
    reason: str


@functools.cache
def extension_error() -> str | None:
    """None when robustdrop._C imports, else the reason it does not."""
    try:
        from robustdrop import _C  # noqa: F401  (registers the C++ and CUDA kernels)
    except ImportError as error:
        return f"the compiled extension robustdrop._C is not built ({error}); run `pip install --no-build-isolation -e .`"
    return None


@functools.cache
def _extension_has_cuda_kernels() -> bool:
    """Whether robustdrop._C registered CUDA kernels; asked only once it has imported, so it cannot change."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("robustdrop::block_mask_forward", "CUDA")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_error() -> str | None:
    """None when the Triton kernels are importable, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    try:
        import robustdrop.triton.block_mask  # noqa: F401
        import robustdrop.triton.cam_mask  # noqa: F401
        import robustdrop.triton.feature_density  # noqa: F401
        import robustdrop.triton.fixed_mask  # noqa: F401
        import robustdrop.triton.kl_distill  # noqa: F401
    except Exception as error:  # a broken Triton install should not break robustdrop
        return f"the Triton kernels failed to import: {error!r}"
    return None


def backends() -> dict[str, BackendStatus]:
    """Each backend name -> BackendStatus(available, reason) for this machine."""
    gpu = torch.cuda.is_available()
    status = {}
    ext = extension_error()
    if ext is not None:
        status["cuda"] = BackendStatus(False, ext)
    elif not _extension_has_cuda_kernels():
        status["cuda"] = BackendStatus(False, "robustdrop._C was built without CUDA kernels (torch without CUDA or no nvcc; FORCE_CUDA=1 forces them)")
    elif not gpu:
        status["cuda"] = BackendStatus(False, "no CUDA GPU is visible to torch")
    else:
        status["cuda"] = BackendStatus(True, "")
    tri = triton_error()
    if tri is not None:
        status["triton"] = BackendStatus(False, tri)
    elif not gpu and not triton_interpreted():
        status["triton"] = BackendStatus(False, "no CUDA GPU is visible to torch (set TRITON_INTERPRET=1 to run on CPU tensors)")
    else:
        status["triton"] = BackendStatus(True, "interpreted on CPU tensors" if not gpu else "")
    status["cpu"] = BackendStatus(ext is None, ext or "")
    status["reference"] = BackendStatus(True, "")
    return status


_warned_fallback = False


def warn_fallback(reason: str) -> None:
    """Warns, once per process, that ops run on the reference."""
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"robustdrop falls back to the slow reference backend: {reason}", RuntimeWarning, stacklevel=3)


def _check_device(name: str, device_type: str) -> None:
    if device_type == "meta":  # shapes only: every op has a fake (meta) implementation, whatever its backend
        return
    if name == "cpu" and device_type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors, but x is on {device_type}")
    if name == "cuda" and device_type != "cuda":
        raise ValueError(f"backend='cuda' runs on CUDA tensors, but x is on {device_type}")
    if name == "triton" and device_type != "cuda" and not (device_type == "cpu" and triton_interpreted()):
        raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), but x is on {device_type}")


def eager_only(function, reason: str):
    """``function`` run as Python between two graphs under torch.compile (a graph break); under
    ``fullgraph=True`` calling it is Dynamo's error, which gives ``reason``."""
    try:
        return torch.compiler.disable(function, reason=reason)
    except TypeError:  # older torch takes no reason
        return torch.compiler.disable(function)


def in_checkpoint_recompute() -> bool:
    """Whether this forward runs while autograd executes a backward: activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not) recomputing a forward whose activations it
    dropped. A layer with state that its forward reads or changes (a step counter, targets set
    beside the forward) replays what the original forward used instead: checkpointing restores
    torch's random state for the recompute, not a module's attributes. False under torch.compile,
    whose checkpointed regions are recomputed inside the compiled backward, not by running
    Python again."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor copied to ``device`` without the host waiting for the GPU.

    A copy from pageable host memory to a GPU synchronises the stream (the host waits for every
    queued kernel), which stalls a training step that would otherwise run ahead. From pinned
    memory with ``non_blocking=True`` it is queued like a kernel; the caching host allocator keeps
    the pinned block until the copy has run. Under torch.compile, for other devices, and while a
    CUDA graph is captured (whose replays would read the pinned block long after it is reused), a
    plain ``.to(device)``.
    """
    if device.type == "cuda" and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def check_backend_name(backend) -> str:
    """A backend name: "auto" or one of BACKEND_NAMES, whether or not it is available here (a
    module built on a machine without a GPU may be moved to one later)."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    return backend


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The backend that runs an op on ``tensor`` when the caller asked for ``backend``."""
    return _resolve(backend, tensor.device.type)


# What _resolve answered, by (backend, device type, ROBUSTDROP_BACKEND, TRITON_INTERPRET):
# everything else it reads is fixed for the process, and the probes cost microseconds
# that every op call would pay. Errors are not remembered: they are raised again.
_resolved: dict[tuple, str] = {}


# Evaluated once per (backend, device type) while torch.compile traces, so the
# environment and availability probes never enter a graph.
@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str) -> str:
    check_backend_name(backend)
    key = (backend, device_type, os.environ.get(ENV_VARIABLE), os.environ.get("TRITON_INTERPRET"))
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve_uncached(backend, device_type)
    return name


def _resolve_uncached(backend: str, device_type: str) -> str:
    if backend == "auto":
        backend = os.environ.get(ENV_VARIABLE, "auto") or "auto"
        if backend not in BACKEND_NAMES + ("auto",):
            raise ValueError(f"{ENV_VARIABLE} must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    status = backends()
    if backend == "auto":
        candidates = ("cuda", "triton") if device_type == "cuda" else ("cpu",)
        for name in candidates:
            if status[name].available:
                return name
        warn_fallback(status[candidates[0]].reason)
        return "reference"
    if not status[backend].available:
        raise RuntimeError(f"backend {backend!r} is not available: {status[backend].reason}")
    _check_device(backend, device_type)
    return backend


# The variant of a seeded op that takes its seed as a 0-d int64 CPU tensor (ops/block_mask.register_forward).
DRAWN_SEED_SUFFIX = "_drawn_seed"


# torch.export traces a drawn seed as a symbol, which the reference's Python-int RNG cannot take.
REFERENCE_EXPORT_ERROR = ("backend='reference' reads a drawn seed (seed=None) as a Python int, which torch.export "
                          "cannot trace: export a training forward on the 'cpu', 'cuda' or 'triton' backend, or "
                          "pass seed= to the op")


# ONNX has no generator of DESIGN.md section 3's RNG, and the methods that draw masks are the identity in eval.
ONNX_SEEDED_ERROR = ("robustdrop::{op} draws a random mask, which ONNX cannot express: export the model in eval "
                     "mode (model.eval()), where DropBlock, Active DropBlock, CamDrop and feature-density dropout "
                     "are the identity and Random Mask is exported as a select")


def forward_table(op_name: str, reference_forward, *, adjoint: str | None = None) -> dict:
    """Backend name -> forward of one op: ``robustdrop::<op_name>`` (CPU and CUDA kernels),
    ``robustdrop::<op_name>_triton`` and the reference. The ops are looked up at call
    time, so an install without them still imports.

    An op is seeded when its reference has an argument named ``seed``, as the op's schema
    does (at the same position: the reference takes the op's arguments). A seed given as a
    tensor (``_seed.op_seed`` under torch.compile or torch.vmap) goes to the ``_drawn_seed``
    variant of the compiled or Triton op; the reference reads it as an int.

    ``adjoint`` names the op that gives the gradient of x, the op's first input (robustdrop._func):
    ``op_name`` itself for a self-adjoint op, else an op taking (dy, *outputs[1:]). Under a
    torch.func transform that differentiates, the compiled and Triton ops then run with
    robustdrop._func's autograd (under ``vmap`` alone, with their own).
    """
    parameters = list(inspect.signature(reference_forward).parameters)
    seed_position = parameters.index("seed") if "seed" in parameters else None

    def drawn(args) -> bool:
        return seed_position is not None and isinstance(args[seed_position], torch.Tensor)

    def call(name: str, args):
        return getattr(torch.ops.robustdrop, name + DRAWN_SEED_SUFFIX if drawn(args) else name)(*args)

    def differentiable_call(suffix: str, args):
        if adjoint is None or not _checks.in_differentiating_transform():
            return call(op_name + suffix, args)
        return _func.linear_call(lambda *op_args: call(op_name + suffix, op_args),
                                 getattr(torch.ops.robustdrop, adjoint + suffix), adjoint != op_name, *args)

    def exportable_to_onnx(forward):
        # ONNX knows no robustdrop op: under torch.onnx.export every backend runs the reference, torch ops
        # that the exporter translates. ONNX has no generator of the RNG contract: a seeded op is an error.
        def run(*args):
            if not _checks.in_onnx_export():
                return forward(*args)
            if seed_position is not None:
                raise RuntimeError(ONNX_SEEDED_ERROR.format(op=op_name))
            return reference_forward(*args)
        return run

    def compiled(*args):
        return differentiable_call("", args)

    def triton(*args):
        return differentiable_call("_triton", args)

    def reference(*args):
        if drawn(args):
            if torch.compiler.is_exporting():
                raise RuntimeError(REFERENCE_EXPORT_ERROR)
            args = args[:seed_position] + (int(args[seed_position]),) + args[seed_position + 1:]
        return reference_forward(*args)

    compiled, triton, reference = (exportable_to_onnx(forward) for forward in (compiled, triton, reference))
    return {"cpu": compiled, "cuda": compiled, "triton": triton, "reference": reference}
