"""Compiles the Triton kernels for an H100 (sm_90) without a GPU, and checks them.

Without a GPU the test suite runs the Triton kernels through the interpreter,
which shows their logic but never compiles them: an H100 could still refuse a
kernel (a construct the compiler rejects, too much shared memory, too many
registers), and the compiled code could round differently from the
interpreter. This script compiles, for sm_90, every specialisation of every
kernel that the suite launched (recorded by ``record.py``), with Triton's own
binder and compiler and Triton's own ptxas, and fails when

- a kernel does not compile;
- a kernel needs more shared memory than an H100 block may have (227 KiB), or
  more registers than a block may hold (64 Ki);
- a kernel that must match the reference bit for bit has a fused multiply-add
  or an approximate division or transcendental (``ptx.py``).

It prints, per kernel, the specialisations compiled, warps, shared memory,
registers, stack and spills (from Triton's cuobjdump). Skips (exit 0) when
Triton has no NVIDIA backend.

Usage: ``python tests/gpu_compile/compile_triton.py LAUNCHES.json``
"""
from __future__ import annotations

import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.pop("TRITON_INTERPRET", None)
# Triton's default today, spelled out (it warns that the default will change).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402

import ptx as ptx_check  # noqa: E402

ARCH = 90
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one sm_90 block may opt in to
REGISTER_LIMIT = 64 * 1024  # 32-bit registers one sm_90 block may hold


class CompileOnlyDriver:
    """Just enough of a Triton driver to compile for sm_90; nothing launches."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", ARCH, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def argument(spec: dict):
    """A stand-in with what Triton specialises on: a tensor's dtype and alignment, a value."""
    if "tensor" in spec:
        dtype = getattr(torch, spec["tensor"])
        return torch.empty(64, dtype=dtype) if spec["aligned"] else torch.empty(65, dtype=dtype)[1:]
    for kind in ("int", "float", "bool", "none"):
        if kind in spec:
            return spec[kind]
    raise ValueError(f"unknown argument record {spec}")


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack, shared and local (spill) bytes of a cubin, from cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([cuobjdump, "-res-usage", file.name], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{report}")
    return dict(zip(("registers", "stack", "static_shared", "local"), map(int, match.groups())))


def compile_launch(launch: dict):
    """The CompiledKernel of one recorded launch (from Triton's cache when already compiled)."""
    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    arguments = {name: argument(spec) for name, spec in launch["arguments"].items()}
    return kernel.warmup(grid=(1,), **arguments)


def check(kernel) -> tuple[dict, list[str]]:
    """(the kernel's figures, its problems)."""
    usage = resource_usage(kernel.asm["cubin"])
    warps = kernel.metadata.num_warps
    figures = {"warps": warps, "shared": kernel.metadata.shared, **usage}
    problems = [f"{kernel.name}: {line}" for line in ptx_check.violations(kernel.asm["ptx"])]
    if figures["shared"] > SHARED_LIMIT:
        problems.append(f"{kernel.name}: {figures['shared']} bytes of shared memory (sm_90 allows {SHARED_LIMIT})")
    if usage["registers"] * warps * 32 > REGISTER_LIMIT:
        problems.append(f"{kernel.name}: {usage['registers']} registers x {warps * 32} threads "
                        f"(sm_90 allows {REGISTER_LIMIT} per block)")
    return figures, problems


def summary(figures: dict[str, list[dict]]) -> str:
    """One row per kernel: its specialisations compiled, its warps, and the largest of each resource."""
    columns = [("shared", "shared B"), ("registers", "registers"), ("stack", "stack B"), ("local", "spill B")]
    rows = [f"{'kernel':22s} {'compiled':>8s} {'warps':>7s} " + " ".join(f"{title:>9s}" for _, title in columns)]
    for name, all_figures in sorted(figures.items()):
        warps = "/".join(str(w) for w in sorted({f["warps"] for f in all_figures}))
        largest = " ".join(f"{max(f[key] for f in all_figures):9d}" for key, _ in columns)
        rows.append(f"{name:22s} {len(all_figures):8d} {warps:>7s} {largest}")
    return "\n".join(rows)


def main(path: str) -> int:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401  (the backend that compiles for sm_90)
        from triton.runtime import driver
    except ImportError as error:
        print(f"compile_triton: Triton has no NVIDIA backend here ({error}); skipped")
        return 0
    driver.set_active(CompileOnlyDriver())
    with open(path) as file:
        launches = json.load(file)
    start = time.time()
    figures: dict[str, list[dict]] = collections.defaultdict(list)
    problems: list[str] = []
    compiled: set[str] = set()
    for launch in launches:
        try:
            kernel = compile_launch(launch)
        except Exception as error:  # any compiler error fails the check, reported with its launch
            problems.append(f"{launch['kernel']} does not compile for sm_90: {error!r}\n  launch: {launch}")
            continue
        if kernel.hash in compiled:
            continue
        compiled.add(kernel.hash)
        kernel_figures, kernel_problems = check(kernel)
        figures[kernel.name].append(kernel_figures)
        problems += kernel_problems
    print(summary(figures))
    print(f"compile_triton: {len(launches)} recorded launches, {len(compiled)} kernels compiled for sm_90 "
          f"with Triton {triton.__version__} in {time.time() - start:.0f} s")
    if problems:
        print("\n".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
