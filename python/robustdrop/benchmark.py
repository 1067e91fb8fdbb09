"""``python -m robustdrop bench``: every op against its naive baseline (DESIGN.md section 7).

For each benchmark case (an op, its parameters and an input shape) every
implementation is timed the same way:

* the **naive baseline**: what a user writes without robustdrop (the
  reference's algorithm with torch's own RNG); every speedup is relative to it;
* **robustdrop** on each backend that runs on the chosen device (``cpu`` on CPU;
  ``cuda`` and ``triton`` on CUDA; the Triton interpreter is never timed) and,
  with ``--with-reference``, the ``reference`` backend (the correctness oracle,
  slow by design: it emulates Philox in PyTorch; it is not a baseline);
* **anchors**, when they can run here: torchvision / timm implementations, a
  stronger plain-PyTorch version where one is easy to write (FDD's batched
  eigh) and ``torch.compile`` of the naive baseline. An anchor that cannot be imported is
  skipped with a note; one that fails gives a row ``failed: reason``;
* ``torch.mul(x, 2.0)`` of the same size: the memory speed of light (one read,
  one write; its backward is the same again).

Bandwidth: every row also reports the bandwidth it achieves over the bytes any
implementation must move, those of the speed of light (x read and y written in
the forward, 2 * x.nbytes; the gradient read and dx written as well in the
forward + backward, 4 * x.nbytes), and that bandwidth as a fraction of a large
device-to-device copy measured in the same run (bytes read plus bytes written).

Adding an op's cases means adding one module to ``robustdrop/benchmarks/``
(see that package's docstring); nothing here changes.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import glob
import importlib
import math
import os
import pkgutil
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Sequence

import torch

HELP = "time each op's backends against its naive baseline; writes a table, a CSV and a PNG"

Fn = Callable[[torch.Tensor], torch.Tensor]

ASSUMED_CACHE_BYTES = 64 * 1024 * 1024
MAX_INPUT_COPIES = 1024
# The copy that measures the memory bandwidth: at least this size and 4x the cache.
MIN_COPY_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}
# The bytes every implementation must move, in units of x.nbytes (see the module docstring).
FORWARD_TRAFFIC, FORWARD_BACKWARD_TRAFFIC = 2, 4


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What an op module's ``cases(config)`` may look at to choose its cases."""

    device: torch.device
    dtype: torch.dtype
    quick: bool

    def gpu_only(self, settings: list) -> list:
        """``settings`` on a GPU, none on a CPU: the cases sized to fill a GPU, too slow for a CPU run."""
        return list(settings) if self.device.type == "cuda" else []


class Skip(Exception):
    """Raised by an anchor's builder when the anchor cannot run here (not an error)."""


@dataclasses.dataclass(frozen=True)
class Anchor:
    """An outside implementation to compare with.

    ``build()`` returns the callable ``x -> y``. It raises ImportError (the
    library is not installed) or Skip(reason) when the anchor does not apply
    here; both skip it with a note. Any other exception, in ``build`` or while
    timing, gives a row ``failed: reason``.
    """

    name: str
    build: Callable[[], Fn]


@dataclasses.dataclass(frozen=True)
class Target:
    """A speed or memory target an issue sets for a case, checked on each robustdrop row of the case.

    ``metric`` is one of ``TARGET_METRICS``; a bound is ``at_least`` or ``at_most`` it. ``device`` is
    "cpu", "cuda", or None for both; targets are stated for float32 and only checked in float32 runs.
    """

    issue: int
    metric: str
    device: str | None = None
    at_least: float | None = None
    at_most: float | None = None
    anchor: str | None = None  # the anchor of "anchor_fwd_bwd"

    def __post_init__(self):
        if self.metric not in TARGET_METRICS or (self.metric == "anchor_fwd_bwd") != (self.anchor is not None):
            raise ValueError(f"Target: unknown metric {self.metric!r}, or an anchor without anchor_fwd_bwd")
        if self.metric != "no_full_size_saved" and (self.at_least is None) == (self.at_most is None):
            raise ValueError("Target: give exactly one of at_least and at_most")


# Target metric -> what it measures, of one robustdrop row (see Row and measure()).
TARGET_METRICS = {
    "speedup_fwd": "forward speedup over the naive baseline",
    "speedup_fwd_bwd": "fwd+bwd speedup over the naive baseline",
    "x_mul_fwd_bwd": "fwd+bwd time over torch.mul(x, 2.0)'s",
    "x_mul_fwd_bwd_device": "fwd+bwd device time (host time hidden) over torch.mul(x, 2.0)'s",
    "anchor_fwd_bwd": "fwd+bwd speedup over",
    "no_full_size_saved": "no full-size tensor saved for backward",
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case of one op.

    The callables take the input ``x`` only (the tensor that gets gradients)
    and return the op's output; close over any other input, created on
    ``config.device``.

    Attributes:
        op: the public op name, e.g. "drop_block2d".
        params: the op's parameters in words, e.g. "p=0.1 bs=7".
        shape: the shape of x.
        naive: the naive baseline.
        robustdrop: ``(x, backend) -> y``, robustdrop's op on one backend.
        anchors: outside implementations (see Anchor).
        dtype: x's dtype; None uses ``--dtype``.
        compile_naive: also time ``torch.compile(naive)`` when torch.compile works here.
        targets: the issues' targets for this case (see Target), reported after the run.
    """

    op: str
    params: str
    shape: tuple[int, ...]
    naive: Fn
    robustdrop: Callable[[torch.Tensor, str], torch.Tensor]
    anchors: tuple[Anchor, ...] = ()
    dtype: torch.dtype | None = None
    compile_naive: bool = True
    targets: tuple[Target, ...] = ()


def op_module_names() -> list[str]:
    """The modules in robustdrop.benchmarks (names starting with _ excluded), without importing them."""
    from robustdrop import benchmarks

    return sorted(info.name for info in pkgutil.iter_modules(benchmarks.__path__) if not info.name.startswith("_"))


def op_modules() -> dict[str, object]:
    """Module name -> module, for every module in robustdrop.benchmarks.

    Each module defines ``OP`` (the public op name, or a tuple of them) and
    ``cases(config: BenchConfig) -> list[Case]``.
    """
    return {name: importlib.import_module(f"robustdrop.benchmarks.{name}") for name in op_module_names()}


def _op_names(module) -> tuple[str, ...]:
    op = getattr(module, "OP", ())
    return (op,) if isinstance(op, str) else tuple(op)


def select_modules(wanted: Sequence[str] | None) -> dict[str, object]:
    """The op modules named in ``wanted`` (module names or op names); all when None."""
    modules = op_modules()
    if not wanted:
        return modules
    chosen = {}
    for name in wanted:
        matches = {key: mod for key, mod in modules.items() if name == key or name in _op_names(mod)}
        if not matches:
            known = sorted(set(modules) | {op for mod in modules.values() for op in _op_names(mod)})
            raise ValueError(f"unknown op {name!r}; known: {', '.join(known)}")
        chosen.update(matches)
    return chosen


# --------------------------------------------------------------------------- implementations


@dataclasses.dataclass(frozen=True)
class Impl:
    """One row of a case: ``build()`` gives the callable ``x -> y`` (it may raise, see Anchor)."""

    name: str
    kind: str  # "naive", "robustdrop", "anchor" or "speed-of-light"
    build: Callable[[], Fn]


NAIVE = "naive (torch RNG)"
SPEED_OF_LIGHT = "torch.mul(x, 2.0)"


def robustdrop_backends(device: torch.device, with_reference: bool) -> tuple[list[str], list[str]]:
    """(backends to time on ``device``, notes on those skipped)."""
    from robustdrop import _backend, backends

    status = backends()
    wanted = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    chosen, notes = [], []
    for name in wanted:
        if not status[name].available:
            notes.append(f"robustdrop[{name}] skipped: {status[name].reason}")
        elif name == "triton" and _backend.triton_interpreted():
            notes.append("robustdrop[triton] skipped: TRITON_INTERPRET=1 (the interpreter is not benchmarked)")
        else:
            chosen.append(name)
    if with_reference:
        chosen.append("reference")
    return chosen, notes


_compile_probe: dict[str, str | None] = {}


def compile_error(device: torch.device) -> str | None:
    """None when torch.compile compiles and runs a tiny function on ``device``, else why not."""
    if device.type not in _compile_probe:
        try:
            fn = torch.compile(lambda t: t * 2.0 + 1.0, dynamic=False)
            out = fn(torch.ones(8, device=device))
            if not torch.equal(out.cpu(), torch.full((8,), 3.0)):
                raise RuntimeError("wrong result")
            _compile_probe[device.type] = None
        except Exception as error:  # any failure just means: no compile anchor here
            _compile_probe[device.type] = _reason(error)
        finally:
            torch._dynamo.reset()
    return _compile_probe[device.type]


def _compiled(fn: Fn) -> Callable[[], Fn]:
    def build():
        torch._dynamo.reset()  # a fresh cache per case: no recompile limits across cases
        return torch.compile(fn, dynamic=False)

    return build


def implementations(case: Case, device: torch.device, backends: Sequence[str], use_compile: bool) -> tuple[list[Impl], list[str]]:
    """The rows of one case, in table order, and notes on the anchors skipped."""
    impls = [Impl(NAIVE, "naive", lambda: case.naive)]
    for name in backends:
        impls.append(Impl(f"robustdrop[{name}]", "robustdrop",
                          lambda name=name: (lambda x: case.robustdrop(x, name))))
    notes = []
    for anchor in case.anchors:
        try:
            fn = anchor.build()
        except ImportError as error:
            notes.append(f"{anchor.name} skipped: not importable ({error})")
            continue
        except Skip as skip:
            notes.append(f"{anchor.name} skipped: {skip}")
            continue
        except Exception as error:  # reported as a failed row
            impls.append(Impl(anchor.name, "anchor", _raiser(error)))
            continue
        impls.append(Impl(anchor.name, "anchor", lambda fn=fn: fn))
    if case.compile_naive and use_compile:
        reason = compile_error(device)
        if reason is None:
            impls.append(Impl("torch.compile(naive)", "anchor", _compiled(case.naive)))
        else:
            notes.append(f"torch.compile(naive) skipped: torch.compile does not work here ({reason})")
    impls.append(Impl(SPEED_OF_LIGHT, "speed-of-light", lambda: lambda x: torch.mul(x, 2.0)))
    return impls, notes


def _raiser(error: Exception) -> Callable[[], Fn]:
    def build():
        raise error

    return build


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."


# --------------------------------------------------------------------------- measuring


def cache_bytes(device: torch.device) -> int:
    """The cache that input rotation must defeat: L2 on CUDA, the largest CPU cache on CPU (64 MB if unknown)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or ASSUMED_CACHE_BYTES)
    largest = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as handle:
                text = handle.read().strip().upper()
            factor = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
            largest = max(largest, int(text.rstrip("KMG")) * factor)
        except (OSError, ValueError):
            continue
    return largest or ASSUMED_CACHE_BYTES


def input_copies(nbytes: int, cache: int) -> int:
    """How many copies of an input of ``nbytes`` to rotate through so that together they exceed three
    times ``cache``. Caches are not strictly LRU: copies just past the cache's size still leave hits for
    a fused kernel (x and y only), which a naive baseline's temporaries evict, flattering the ratio."""
    return max(2, min(MAX_INPUT_COPIES, 3 * cache // max(nbytes, 1) + 1))


class HostClock:
    """Times on the host (CPU runs): an event is a ``time.perf_counter`` reading.

    It cannot keep a device busy, so a Timer with it has no device-only time.
    """

    can_hide_host = False

    def record(self) -> float:
        return time.perf_counter()

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3

    def synchronize(self) -> None:
        pass

    def host_ms(self) -> float:
        return time.perf_counter() * 1e3


class CudaClock(HostClock):
    """Times on the current CUDA stream with CUDA events; ``sleep(ms)`` keeps the GPU busy.

    ``torch.cuda._sleep`` spins a kernel for a number of GPU clock cycles; the cycles
    per millisecond are measured once, on first use.
    """

    can_hide_host = True

    def __init__(self, device: torch.device):
        self.device = device
        self._cycles_per_ms: float | None = None

    def record(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def sleep(self, milliseconds: float) -> None:
        if self._cycles_per_ms is None:
            cycles = 1 << 22  # about 2 ms at the clocks of current GPUs
            torch.cuda._sleep(cycles)  # the first launch pays for loading the kernel
            start = self.record()
            torch.cuda._sleep(cycles)
            end = self.record()
            self.synchronize()
            self._cycles_per_ms = cycles / max(self.elapsed_ms(start, end), 1e-3)
        torch.cuda._sleep(max(1, int(milliseconds * self._cycles_per_ms)))


# Device-only timing (Timer.device_only): the host's time per call is probed with the GPU kept
# busy this long, and each timed call is covered by twice the slowest probe plus a margin.
HOST_PROBE_MS, HOST_PROBES, COVER_MARGIN_MS = 20.0, 3, 0.05


class Timer:
    """Median time in ms of ``step(i)`` for i = 0, 1, ... after warm-up.

    CPU: time.perf_counter around each call. CUDA: a pair of CUDA events around
    each call, read after one synchronize at the end; a call whose host work
    (Python, argument checks, launches) takes longer than its kernels is timed
    at its host's pace, as a user calling it in a loop on an idle GPU sees it.
    At most ``repeats`` timed calls, fewer (at least 3) once ``budget_s``
    seconds have passed. Warm-up: ``warmup`` calls, fewer (at least 1) once
    half the budget has passed, so that a call of seconds (a naive baseline at
    a size that fills a GPU) is not run many times untimed.

    ``device_only`` times the same calls with the host's time hidden (CUDA).
    ``clock`` replaces the device's clock (HostClock on CPU, CudaClock on CUDA).
    """

    def __init__(self, device: torch.device, repeats: int, warmup: int, budget_s: float, clock: HostClock | None = None):
        self.repeats, self.warmup, self.budget_s = repeats, warmup, budget_s
        self.clock = clock or (CudaClock(device) if device.type == "cuda" else HostClock())

    def __call__(self, step: Callable[[int], object]) -> float:
        start_warmup = time.perf_counter()
        for i in range(self.warmup):
            step(i)
            if time.perf_counter() - start_warmup > self.budget_s / 2:
                break
        return self._timed(step, cover_ms=0.0)

    def device_only(self, step: Callable[[int], object]) -> tuple[float, bool]:
        """(median device time of a warmed-up ``step(i)`` with its host's time hidden, whether the call
        waits for the GPU); (NaN, False) on a CPU.

        The host's time per call is probed first, the GPU kept busy meanwhile so
        that the host never waits for it. Each timed call then has the GPU sleep
        for longer than that before its start event, while the host enqueues the
        call, so its kernels run back to back and the events measure them and the
        gaps the GPU itself leaves, not the host. This is what a call costs in a
        training step whose other layers keep the GPU busy (the host runs ahead).
        A call that waits for the GPU (a synchronising check) cannot run ahead:
        it is timed as by ``__call__``, and the flag says so.
        """
        if not self.clock.can_hide_host:
            return math.nan, False
        probes = []
        for i in range(HOST_PROBES):
            self.clock.sleep(HOST_PROBE_MS)
            start = self.clock.host_ms()
            step(i)
            probes.append(self.clock.host_ms() - start)
            self.clock.synchronize()
        waits_for_gpu = max(probes) >= HOST_PROBE_MS / 2
        return self._timed(step, cover_ms=0.0 if waits_for_gpu else 2 * max(probes) + COVER_MARGIN_MS), waits_for_gpu

    def _timed(self, step: Callable[[int], object], cover_ms: float) -> float:
        """Median of the timed calls, each after ``cover_ms`` of GPU sleep when it is not 0."""
        self.clock.synchronize()
        start_all = time.perf_counter()
        intervals = []
        for i in range(self.warmup, self.warmup + self.repeats):
            if cover_ms:
                self.clock.sleep(cover_ms)
            start = self.clock.record()
            step(i)
            intervals.append((start, self.clock.record()))
            if len(intervals) >= 3 and time.perf_counter() - start_all > self.budget_s:
                break
        self.clock.synchronize()
        return statistics.median(self.clock.elapsed_ms(start, end) for start, end in intervals)


def saved_for_backward(fn: Fn, x: torch.Tensor) -> tuple[int, bool]:
    """(bytes, full_size) that ``fn(x)``'s autograd graph keeps for the backward.

    Measured with ``torch.autograd.graph.saved_tensors_hooks`` during one
    forward with x requiring grad. The rule:

    * bytes: the sum of ``untyped_storage().nbytes()`` over the distinct
      storages of all saved tensors, deduplicated by (device, storage
      data_ptr), so a tensor saved twice, or two views of one buffer, count
      once, and a view counts its whole storage (that is what stays alive).
      Everything saved counts, x itself included when an op saves it (x is
      kept alive by the caller anyway, but a baseline that saves x is what
      it is).
    * full_size: whether any saved tensor has at least x.numel() elements (a
      full-size mask or a copy of x, of any dtype). DESIGN 4.1 allows at most
      one bit per element for DropBlock, which this flags at a glance.
    """
    storages: dict[tuple[str, int], int] = {}
    full = False

    def pack(tensor):
        nonlocal full
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        full = full or tensor.numel() >= x.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = fn(x)
    del y
    return sum(storages.values()), full


def copy_bandwidth(device: torch.device, timer: "Timer") -> float:
    """GB/s of a device-to-device copy too large for the cache, counting bytes read plus bytes written."""
    nbytes = max(MIN_COPY_BYTES.get(device.type, MIN_COPY_BYTES["cpu"]), 4 * cache_bytes(device))
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    milliseconds = timer(lambda i: target.copy_(source))
    return 2 * nbytes / (milliseconds * 1e-3) / 1e9


@dataclasses.dataclass
class Row:
    op: str
    params: str
    shape: str
    dtype: str
    device: str
    impl: str
    kind: str
    fwd_ms: float = math.nan
    fwd_bwd_ms: float = math.nan
    fwd_bwd_device_ms: float = math.nan  # Timer.device_only, for the kinds in DEVICE_ONLY_KINDS on a GPU
    fwd_bwd_waits_for_gpu: bool | None = None  # the call synchronises: its device-only time is its plain time
    speedup_fwd: float = math.nan
    speedup_fwd_bwd: float = math.nan
    x_mul_fwd: float = math.nan
    x_mul_fwd_bwd: float = math.nan
    x_mul_fwd_bwd_device: float = math.nan
    saved_bytes: int | None = None
    saved_full_size: bool | None = None
    fwd_gbps: float = math.nan
    fwd_bwd_gbps: float = math.nan
    copy_fraction_fwd: float = math.nan
    copy_fraction_fwd_bwd: float = math.nan
    status: str = "ok"


# The rows whose forward + backward is also timed with the host's time hidden (Timer.device_only): what
# the speed-of-light ratios compare. The baselines and anchors are timed once, as a user calls them.
DEVICE_ONLY_KINDS = ("robustdrop", "speed-of-light")


def measure(impl: Impl, inputs: list[torch.Tensor], grads: list[torch.Tensor], timer: Timer, row: Row) -> Row:
    """Fill ``row`` with impl's times and saved bytes; a failure sets ``row.status`` instead of raising.

    Forward: under torch.no_grad (inference; no graph is kept). Forward +
    backward: x requires grad, ``torch.autograd.grad(y, x, grad)`` with a fixed
    random grad, so nothing accumulates into x.grad. Same for every impl; on a
    GPU, robustdrop's rows and torch.mul's also get the device-only forward +
    backward time.
    """
    count = len(inputs)
    try:
        fn = impl.build()

        def forward(i):
            with torch.no_grad():
                return fn(inputs[i % count])

        def forward_backward(i):
            x = inputs[i % count]
            return torch.autograd.grad(fn(x), x, grads[i % count])

        row.fwd_ms = timer(forward)
        row.fwd_bwd_ms = timer(forward_backward)
        if impl.kind in DEVICE_ONLY_KINDS:
            row.fwd_bwd_device_ms, row.fwd_bwd_waits_for_gpu = _device_only(timer, forward_backward, impl.name)
        row.saved_bytes, row.saved_full_size = saved_for_backward(fn, inputs[0])
    except Exception as error:  # one failing implementation must not end the run
        row.status = f"failed: {_reason(error)}"
        row.fwd_ms = row.fwd_bwd_ms = row.fwd_bwd_device_ms = math.nan
        row.fwd_bwd_waits_for_gpu = None
        row.saved_bytes = row.saved_full_size = None
    return row


def _device_only(timer: Timer, step: Callable[[int], object], name: str) -> tuple[float, bool | None]:
    """timer.device_only(step), (NaN, None) with a warning if it fails: the plain times already measured stand."""
    try:
        return timer.device_only(step)
    except Exception as error:
        warnings.warn(f"{name}: no device-only time ({_reason(error)})", RuntimeWarning, stacklevel=2)
        return math.nan, None


def run_case(case: Case, config: BenchConfig, backends: Sequence[str], use_compile: bool, repeats: int,
             budget_s: float, log=print, copy_gbps: float = math.nan) -> tuple[list[Row], list[str]]:
    """Every implementation of one case: its rows (ratios and bandwidths filled in) and notes.

    ``copy_gbps`` is the run's measured copy bandwidth (``copy_bandwidth``), which the
    rows' copy fractions divide by.
    """
    device, dtype = config.device, case.dtype or config.dtype
    impls, notes = implementations(case, device, backends, use_compile)
    generator = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(case.shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    grad = torch.randn(case.shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    copies = input_copies(base.numel() * base.element_size(), cache_bytes(device))
    inputs = [base.clone().requires_grad_(True) for _ in range(copies)]
    grads = [grad.clone() for _ in range(copies)]
    timer = Timer(device, repeats, warmup=max(2, repeats // 10), budget_s=budget_s)
    shape = "x".join(str(s) for s in case.shape)
    rows = []
    for impl in impls:
        log(f"  {case.op} {case.params} {shape}: {impl.name} ...", flush=True)
        row = Row(case.op, case.params, shape, str(dtype).replace("torch.", ""), device.type, impl.name, impl.kind)
        rows.append(measure(impl, inputs, grads, timer, row))
    del inputs, grads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    naive = rows[0]
    mul = next(row for row in rows if row.kind == "speed-of-light")
    nbytes = base.numel() * base.element_size()
    for row in rows:
        row.speedup_fwd = naive.fwd_ms / row.fwd_ms
        row.speedup_fwd_bwd = naive.fwd_bwd_ms / row.fwd_bwd_ms
        row.x_mul_fwd = row.fwd_ms / mul.fwd_ms
        row.x_mul_fwd_bwd = row.fwd_bwd_ms / mul.fwd_bwd_ms
        row.x_mul_fwd_bwd_device = row.fwd_bwd_device_ms / mul.fwd_bwd_device_ms
        row.fwd_gbps = FORWARD_TRAFFIC * nbytes / (row.fwd_ms * 1e-3) / 1e9
        row.fwd_bwd_gbps = FORWARD_BACKWARD_TRAFFIC * nbytes / (row.fwd_bwd_ms * 1e-3) / 1e9
        row.copy_fraction_fwd = row.fwd_gbps / copy_gbps
        row.copy_fraction_fwd_bwd = row.fwd_bwd_gbps / copy_gbps
    return rows, notes


# --------------------------------------------------------------------------- reporting


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of robustdrop's checkout, else 'unknown'.

    ``ROBUSTDROP_GIT_COMMIT`` overrides it, for a copy of a checkout without its .git
    (a GPU machine that receives only the working tree).
    """
    if os.environ.get("ROBUSTDROP_GIT_COMMIT"):
        return os.environ["ROBUSTDROP_GIT_COMMIT"]
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


TABLE_COLUMNS = ("op", "shape", "dtype", "device", "impl", "fwd ms", "fwd+bwd ms", "fwd+bwd device ms",
                 "speedup vs naive (fwd)", "speedup vs naive (fwd+bwd)", "x mul (fwd+bwd)", "x mul device (fwd+bwd)",
                 "GB/s (fwd+bwd)", "of copy (fwd+bwd)", "saved bytes for backward")

CSV_COLUMNS = ("op", "params", "shape", "dtype", "device", "impl", "kind", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_device_ms",
               "fwd_bwd_waits_for_gpu", "speedup_fwd", "speedup_fwd_bwd", "x_mul_fwd", "x_mul_fwd_bwd",
               "x_mul_fwd_bwd_device", "fwd_gbps", "fwd_bwd_gbps", "copy_fraction_fwd", "copy_fraction_fwd_bwd",
               "saved_bytes", "saved_full_size", "status", "device_name", "torch_version", "git_commit", "date",
               "copy_gbps")


def _number(value: float, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _saved(row: Row) -> str:
    if row.saved_bytes is None:
        return "-"
    return f"{row.saved_bytes:,}" + (" (full-size)" if row.saved_full_size else "")


def table_cells(row: Row) -> list[str]:
    """The stdout table's cells of one row; a failed row carries its reason in the last column."""
    cells = [f"{row.op} {row.params}", row.shape, row.dtype, row.device, row.impl]
    if row.status != "ok":
        return cells + ["-"] * (len(TABLE_COLUMNS) - len(cells) - 1) + [row.status]
    return cells + [_number(row.fwd_ms), _number(row.fwd_bwd_ms), _device_ms(row),
                    _number(row.speedup_fwd, 2) + "x", _number(row.speedup_fwd_bwd, 2) + "x",
                    _number(row.x_mul_fwd_bwd, 2), _number(row.x_mul_fwd_bwd_device, 2), _number(row.fwd_bwd_gbps, 1),
                    _percent(row.copy_fraction_fwd_bwd), _saved(row)]


# Marks a device-only time that is the plain time: the call waits for the GPU, so its host cannot run ahead.
SYNCS_MARK = " (syncs)"


def _device_ms(row: Row) -> str:
    return _number(row.fwd_bwd_device_ms) + (SYNCS_MARK if row.fwd_bwd_waits_for_gpu else "")


DEVICE_ONLY_COLUMNS = ("fwd+bwd device ms", "x mul device (fwd+bwd)")


def table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the main table; the device-only columns only when a row has a device-only time."""
    keep = [i for i, name in enumerate(TABLE_COLUMNS)
            if name not in DEVICE_ONLY_COLUMNS or any(math.isfinite(row.fwd_bwd_device_ms) for row in rows)]
    cells = [table_cells(row) for row in rows]
    return [TABLE_COLUMNS[i] for i in keep], [[line[i] for i in keep] for line in cells]


def _percent(fraction: float) -> str:
    return "-" if not math.isfinite(fraction) else f"{100 * fraction:.0f}%"


def format_table(rows: Sequence[Row]) -> str:
    header, body = table(rows)
    widths = [max(len(col), *(len(cells[i]) for cells in body)) if body else len(col) for i, col in enumerate(header)]
    numeric = set(range(5, len(header) - 1))

    def line(cells):
        return "  ".join(cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    previous = None
    for row, cells in zip(rows, body):
        key = (row.op, row.params, row.shape)
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(line(cells))
    return "\n".join(out)


def model_bench_settings(args: argparse.Namespace) -> tuple[torch.device, int, int] | None:
    """(device, batch, repeats) of the model-level benchmarks (bench-steps, bench-subnets) from their
    shared --device, --batch, --repeats and --quick flags: cuda when available, batch 128 on a GPU,
    32 on a CPU, 4 with --quick, and 20, 3 or 2 repeats. None, after an error on stderr, when
    --device cuda has no GPU."""
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return None
    # `is None`, not `or`: an explicit 0 is refused by the caller's check, not replaced by the default.
    batch = args.batch if args.batch is not None else (4 if args.quick else 128 if device_type == "cuda" else 32)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 20 if device_type == "cuda" else 3)
    return torch.device(device_type), batch, repeats


def run_metadata(device: torch.device) -> dict:
    """Where and when a benchmark ran: device name, torch version, git commit, UTC date."""
    return {"device_name": device_name(device), "torch_version": torch.__version__, "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown_table(header: Sequence[str], cell_rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of string cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in cell_rows]
    return "\n".join(lines)


def write_row_outputs(stem: str, rows: Sequence[dict], columns: Sequence[str], meta: dict, table: str) -> None:
    """``stem``.csv (each row with the run's metadata) and ``stem``.md (the table under its provenance)."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=tuple(columns) + tuple(meta))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **meta})
    with open(stem + ".md", "w") as handle:
        handle.write(f"Device: {meta['device_name']}; torch {meta['torch_version']}; commit {meta['git_commit']}; "
                     f"{meta['date']}\n\n{table}\n")
    print(f"wrote {stem}.csv, {stem}.md")


def anchor_ratios(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the table that compares each robustdrop row with every other implementation of its case.

    One row per case and robustdrop backend: its fwd+bwd time, then for the naive
    baseline and each anchor ``their time / ours`` (above 1 means robustdrop is
    faster), forward and forward + backward, and ``ours / torch.mul`` (the speed of
    light; 1 is the floor).
    """
    cases: dict[tuple, list[Row]] = {}
    for row in rows:
        cases.setdefault((row.op, row.params, row.shape, row.dtype), []).append(row)
    others = list(dict.fromkeys(row.impl for row in rows if row.kind in ("naive", "anchor")))
    header = ["op", "shape", "dtype", "robustdrop", "fwd+bwd ms"]
    header += [f"vs {name} (fwd / fwd+bwd)" for name in others] + ["x mul (fwd / fwd+bwd)"]
    cells = []
    for (op, params, shape, dtype), case_rows in cases.items():
        by_impl = {row.impl: row for row in case_rows if row.status == "ok"}
        mul = by_impl.get(SPEED_OF_LIGHT)
        for ours in (row for row in case_rows if row.kind == "robustdrop" and row.status == "ok"):
            line = [f"{op} {params}", shape, dtype, ours.impl, _number(ours.fwd_bwd_ms)]
            for name in others:
                other = by_impl.get(name)
                line.append("-" if other is None else f"{_number(other.fwd_ms / ours.fwd_ms, 2)}x / "
                                                      f"{_number(other.fwd_bwd_ms / ours.fwd_bwd_ms, 2)}x")
            line.append("-" if mul is None else f"{_number(ours.x_mul_fwd, 2)} / {_number(ours.x_mul_fwd_bwd, 2)}")
            cells.append(line)
    return header, cells


TARGET_HEADER = ("issue", "case", "robustdrop", "target", "measured", "met")


def target_cells(case: Case, rows: Sequence[Row]) -> list[list[str]]:
    """One line per target of ``case`` that applies to this run and robustdrop kernel row of it
    (TARGET_HEADER); the reference backend's row is not judged."""
    if not rows or rows[0].dtype != "float32":
        return []
    device = rows[0].device
    by_impl = {row.impl: row for row in rows}
    cells = []
    for target in case.targets:
        if target.device not in (None, device):
            continue
        # The reference backend (--with-reference) is the correctness oracle, not a contender.
        for ours in (row for row in rows if row.kind == "robustdrop" and row.impl != "robustdrop[reference]"):
            cells.append([str(target.issue), f"{case.op} {case.params} {ours.shape}", ours.impl,
                          *_target_outcome(target, ours, by_impl.get(target.anchor))])
    return cells


def _target_outcome(target: Target, ours: Row, anchor: Row | None) -> tuple[str, str, str]:
    """(the target in words, the measured value, whether it is met: yes, NO or "not measured")."""
    words = TARGET_METRICS[target.metric] + (f" {target.anchor}" if target.anchor else "")
    if target.metric == "no_full_size_saved":
        if ours.status != "ok":
            return words, ours.status, "not measured"
        measured = f"{ours.saved_bytes:,} bytes" + (" (full-size)" if ours.saved_full_size else "")
        return words, measured, "NO" if ours.saved_full_size else "yes"
    words += f" >= {target.at_least:g}" if target.at_least is not None else f" <= {target.at_most:g}"
    if target.metric == "anchor_fwd_bwd":
        if anchor is None or anchor.status != "ok":
            return words, f"{target.anchor}: {'not run here' if anchor is None else anchor.status}", "not measured"
        value = anchor.fwd_bwd_ms / ours.fwd_bwd_ms
    else:
        value = getattr(ours, target.metric)
    if ours.status != "ok" or not math.isfinite(value):
        return words, ours.status if ours.status != "ok" else "-", "not measured"
    met = value >= target.at_least if target.at_least is not None else value <= target.at_most
    syncs = target.metric == "x_mul_fwd_bwd_device" and ours.fwd_bwd_waits_for_gpu
    return words, f"{value:.2f}" + (SYNCS_MARK if syncs else ""), "yes" if met else "NO"


def format_markdown(rows: Sequence[Row], meta: dict, targets: Sequence[Sequence[str]] = ()) -> str:
    """The tables as Markdown with their provenance: what benchmarks/results/<device>.md records."""
    copy = meta.get("copy_gbps")
    out = [f"# robustdrop bench: {meta['device_name']}", "",
           f"- commit `{meta['git_commit']}`, {meta['date']}, torch {meta['torch_version']}",
           f"- device-to-device copy: {_number(copy, 1)} GB/s (bytes read plus written); GB/s below counts the "
           f"bytes of torch.mul(x, 2.0), 2 * x.nbytes forward and 4 * x.nbytes forward + backward", "",
           markdown_table(*table(rows))]
    header, cells = anchor_ratios(rows)
    if cells:
        out += ["", "## robustdrop against the naive baseline and each anchor", "",
                "Their time over ours (above 1: robustdrop is faster); the last column is ours over torch.mul.", "",
                markdown_table(header, cells)]
    if targets:
        out += ["", "## The issues' targets measured in this run", "", markdown_table(TARGET_HEADER, targets)]
    return "\n".join(out) + "\n"


def write_csv(path: str, rows: Sequence[Row], meta: dict) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            record = dataclasses.asdict(row)
            record.update(meta)
            for key, value in record.items():
                if isinstance(value, float):
                    record[key] = f"{value:.6g}" if math.isfinite(value) else ""
                elif value is None:
                    record[key] = ""
            writer.writerow({key: record[key] for key in CSV_COLUMNS})


def write_tables(stem: str, rows: Sequence[Row], meta: dict, targets: Sequence[Sequence[str]]) -> None:
    """``stem``.csv and ``stem``.md of the rows and target lines so far."""
    write_csv(stem + ".csv", rows, meta)
    with open(stem + ".md", "w") as handle:
        handle.write(format_markdown(rows, meta, targets))


def write_plot(path: str, rows: Sequence[Row], meta: dict) -> str | None:
    """A bar plot of each implementation's fwd+bwd speedup over the naive baseline per case; None, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG written"
    cases = list(dict.fromkeys((row.op, row.params, row.shape) for row in rows))
    names = list(dict.fromkeys(row.impl for row in rows if row.kind not in ("naive", "speed-of-light")))
    values = {(row.op, row.params, row.shape, row.impl): row.speedup_fwd_bwd for row in rows}
    width = 0.8 / max(len(names), 1)
    # Wide enough per case for its longest label line (an op name) at 8 points.
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(cases) * (0.8 + 0.35 * len(names))) + 2.5, 4.8))
    finite = []
    for k, name in enumerate(names):
        heights = [values.get((*case, name), math.nan) for case in cases]
        positions = [i - 0.4 + width * (k + 0.5) for i in range(len(cases))]
        shown = [(pos, h) for pos, h in zip(positions, heights) if math.isfinite(h) and h > 0]
        finite += [h for _, h in shown]
        bars = ax.bar([pos for pos, _ in shown], [h for _, h in shown], width=width, label=name)
        ax.bar_label(bars, labels=[f"{h:.2g}" for _, h in shown], fontsize=7)
    # The speed of light is a ceiling, not a competitor: a marker across each group.
    light = [(i, values.get((*case, SPEED_OF_LIGHT), math.nan)) for i, case in enumerate(cases)]
    light = [(i, h) for i, h in light if math.isfinite(h) and h > 0]
    finite += [h for _, h in light]
    if light:
        ax.hlines([h for _, h in light], [i - 0.42 for i, _ in light], [i + 0.42 for i, _ in light], colors="red",
                  linewidth=1.5, label=f"{SPEED_OF_LIGHT} (speed of light)")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label=NAIVE)
    if finite and max(finite) / min(finite) > 30:
        ax.set_yscale("log")
    ax.set_xticks(range(len(cases)))
    # One parameter per line: "p=0.1 bs=3 K=100 C'=256" on one line ran into the next case's label.
    ax.set_xticklabels(["\n".join([op, *params.split(), shape]) for op, params, shape in cases], fontsize=8)
    ax.set_ylabel("fwd+bwd speedup over naive (x)")
    ax.set_title(f"robustdrop bench: {meta['device_name']}, {rows[0].dtype if rows else ''} ({meta['git_commit']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- command line

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", nargs="+", metavar="OP",
                        help=f"op benchmarks to run, by module or op name (default: all of {', '.join(op_module_names())})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement (default: 100 on cuda, 20 on cpu, 3 with --quick)")
    parser.add_argument("--budget", type=float, default=10.0, metavar="SECONDS",
                        help="stop repeating a measurement after this long, once 3 calls are timed (default: 10)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (tests, CI smoke test)")
    parser.add_argument("--with-reference", action="store_true",
                        help="also time the reference backend (the correctness oracle: emulated Philox, slow)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile of the naive baseline when it works here (default: on, off with --quick)")
    parser.add_argument("--out", default="bench_out", metavar="DIR", help="where the CSV, PNG and Markdown go (default: bench_out/)")


def main(args: argparse.Namespace) -> int:
    import robustdrop

    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 100 if device_type == "cuda" else 20)
    if repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    try:
        modules = select_modules(args.ops)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = BenchConfig(device, _DTYPES[args.dtype], args.quick)
    use_compile = (not args.quick) if args.compile is None else args.compile
    backends, notes = robustdrop_backends(device, args.with_reference)
    meta = run_metadata(device)
    print(f"robustdrop {robustdrop.__version__} bench on {meta['device_name']}, torch {meta['torch_version']}, "
          f"commit {meta['git_commit']}, {repeats} repeats", flush=True)
    meta["copy_gbps"] = copy_gbps = copy_bandwidth(device, Timer(device, repeats, warmup=2, budget_s=args.budget))
    print(f"device-to-device copy: {copy_gbps:.1f} GB/s (bytes read plus written)", flush=True)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_{device_type}")
    rows, targets = [], []
    for module in modules.values():
        for case in module.cases(config):
            case_rows, case_notes = run_case(case, config, backends, use_compile, repeats, args.budget,
                                             log=lambda *a, **k: print(*a, file=sys.stderr, **k), copy_gbps=copy_gbps)
            rows += case_rows
            targets += target_cells(case, case_rows)
            notes += [note for note in case_notes if note not in notes]
            # Rewritten after every case, so a run stopped at a time limit keeps the cases it finished.
            write_tables(stem, rows, meta, targets)

    print()
    print(format_table(rows))
    header, cells = anchor_ratios(rows)
    if cells:
        print()
        print("robustdrop against the naive baseline and each anchor (their time / ours; last column ours / mul):")
        print(markdown_table(header, cells))
    if targets:
        print()
        print("The issues' targets measured in this run:")
        print(markdown_table(TARGET_HEADER, targets))
    for note in notes:
        print(f"note: {note}")
    write_tables(stem, rows, meta, targets)
    written = [stem + ".csv", stem + ".md"]
    if rows:
        problem = write_plot(stem + ".png", rows, meta)
        if problem:
            print(f"note: {problem}")
        else:
            written.append(stem + ".png")
    print("wrote " + ", ".join(written))
    return 0
