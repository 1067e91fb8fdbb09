"""Inexact floating-point instructions in PTX, kernel by kernel.

A GPU compiler may contract ``a * b + c`` into one fused multiply-add (nvcc by
default, Triton with its default ``enable_fp_fusion``) and may lower a float32
division, square root or exponential to an approximation. Either rounds
differently from the CPU kernels and the reference, and the Triton interpreter
cannot show it: it computes with NumPy. DESIGN.md asks for bit-identical
results from every kernel except where it states a tolerance, so those
instructions may appear only in the kernels listed in ``TOLERANT``.

Usage: ``python tests/gpu_compile/ptx.py FILE.ptx ...`` checks PTX written by
nvcc (``.ci/nvcc_check.sh``); ``tests/gpu_compile/compile_triton.py`` checks
the PTX of the Triton kernels with the same functions.
"""
from __future__ import annotations

import collections
import re
import sys

# Kernels whose floating-point results DESIGN.md compares within a tolerance,
# by the name of the CUDA kernel or Triton kernel, with the contract that allows it.
_CAM = "the CAM: masks are compared only with a 1e-5 margin around the k-th value (DESIGN.md 4.2)"
_PCA = "PCA coordinates and their bins: cells may differ within 1e-4 of a bin edge (DESIGN.md 4.3)"
_KL = "kl_distill: values and gradients within a stated tolerance per dtype"
TOLERANT = {
    "cam_nchw_kernel": _CAM, "cam_channels_last_kernel": _CAM, "_cam_kernel": _CAM,
    "centre_kernel": _PCA, "_mean_kernel": _PCA,
    "gram_axes_kernel": _PCA, "_gram_kernel": _PCA,
    "covariance_coordinates_kernel": _PCA, "_project_kernel": _PCA,
    "lanczos_kernel": _PCA, "_lanczos_kernel": _PCA,
    "bin_channels_kernel": _PCA, "_bins_kernel": _PCA,
    "kl_distill_kernel": _KL, "_kl_distill_kernel": _KL,
}

_TYPES = r"(?:f16x2|bf16x2|f16|bf16|f32|f64)"
# Fused multiply-adds, and the approximate division and transcendental forms.
_INEXACT = re.compile(
    rf"\b(?:(?:fma|mad)\.r[nzmp](?:\.ftz)?(?:\.sat)?\.{_TYPES}"
    rf"|div\.(?:full|approx)(?:\.ftz)?\.f32"
    rf"|(?:sqrt|rcp|rsqrt|ex2|lg2|sin|cos|tanh)\.approx(?:\.ftz)?\.{_TYPES})\b")
_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$.]+)")


def kernel_name(entry: str) -> str:
    """The unqualified function name of a PTX entry: Triton's as is, nvcc's demangled.

    Itanium mangling spells ``ns::f`` as ``_ZN2ns1fE...`` and ``f`` as ``_Z1f...``:
    a run of length-prefixed identifiers, the last of which is the function.
    """
    if not entry.startswith("_Z"):
        return entry
    position = 3 if entry.startswith("_ZN") else 2
    name = entry
    while position < len(entry) and entry[position].isdigit():
        digits = re.match(r"\d+", entry[position:]).group(0)
        start = position + len(digits)
        name = entry[start:start + int(digits)]
        position = start + int(digits)
    return name


def inexact_instructions(ptx: str) -> dict[str, collections.Counter]:
    """{PTX entry: Counter of its inexact opcodes} for every entry that has any."""
    found: dict[str, collections.Counter] = {}
    entry = None
    for line in ptx.splitlines():
        match = _ENTRY.match(line)
        if match:
            entry = match.group(1)
            continue
        for opcode in _INEXACT.findall(line):
            found.setdefault(entry, collections.Counter())[opcode] += 1
    return found


def violations(ptx: str) -> list[str]:
    """One line per kernel outside ``TOLERANT`` that has inexact instructions."""
    return _violations(inexact_instructions(ptx))


def _violations(found: dict[str, collections.Counter]) -> list[str]:
    return [f"{kernel_name(entry)}: {dict(opcodes)} ({entry})"
            for entry, opcodes in found.items() if kernel_name(entry) not in TOLERANT]


def main(paths: list[str]) -> int:
    failures = []
    for path in paths:
        with open(path) as file:
            found = inexact_instructions(file.read())
        tolerant = sorted({kernel_name(entry) for entry in found} & TOLERANT.keys())
        problems = _violations(found)
        failures += [f"{path}: {line}" for line in problems]
        print(f"ptx: {path}: {'inexact float instructions only in ' + ', '.join(tolerant) if tolerant else 'no inexact float instructions'}"
              + (f"; {len(problems)} bit-exact kernels with some" if problems else ""))
    if failures:
        print("Fused or approximate float instructions in kernels that must match the reference bit for bit:")
        print("\n".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
