"""Records the Triton launches of the op benchmarks at their full sizes, without running them.

The launches the suite records (``record.py``) come from the tests' small shapes. The benchmark's
cases (``python -m robustdrop bench``, in float32 and bfloat16 as ``benchmarks/gpu_check.sh`` runs
them, the GPU-only cases included) and feature-density dropout on wide layers pick other block
sizes and warps: the Lanczos kernel's vector length is the next power of two of min(C, H*W), which
the tests keep at 64 or less. A GPU run would compile those for the first time. Here each case's
Triton forward and backward is called on CPU tensors with the interpreter's launch replaced by one
that records and does not run (the outputs are never read), and the launches are added to the file
that ``compile_triton.py`` compiles for sm_90.

Usage: ``python tests/gpu_compile/record_bench.py LAUNCHES.json`` (adds to the file, or creates it)
"""
from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the CPU tensors go to the interpreter
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import record  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)
# Feature-density shapes (N, C, H, W) beyond the benchmark's, one per vector length of the Lanczos
# kernel from 128 to 4096 (m = min(C, H*W)): VGG and ResNet stages on CIFAR and ImageNet.
WIDE_FEATURE_MAPS = ((2, 256, 16, 16), (2, 512, 28, 28), (1, 1024, 32, 32), (1, 2048, 56, 56), (1, 4096, 64, 64))


def benchmark_calls():
    """(description, x, fn) for each benchmark case's Triton forward in each dtype; fn(x) -> y."""
    from robustdrop.benchmark import BenchConfig, op_modules

    class EveryCase(BenchConfig):
        def gpu_only(self, settings: list) -> list:  # the cases a GPU run adds, built on the CPU
            return list(settings)

    for dtype in DTYPES:
        config = EveryCase(device=torch.device("cpu"), dtype=dtype, quick=False)
        for module in op_modules().values():
            for case in module.cases(config):
                x = torch.zeros(case.shape, dtype=case.dtype or dtype)
                yield (f"{case.op} {case.params} {tuple(case.shape)} {x.dtype}", x,
                       lambda x, case=case: case.robustdrop(x, "triton"))


def feature_density_calls():
    import robustdrop

    for shape in WIDE_FEATURE_MAPS:
        for dims in (1, 2, 3):
            x = torch.zeros(shape)
            yield (f"feature_density_dropout dims={dims} {shape}", x,
                   lambda x, dims=dims: robustdrop.feature_density_dropout(x, dims=dims, seed=0, backend="triton"))


def main(path: str) -> int:
    record.install(run_kernels=False)
    calls = 0
    for description, x, fn in [*benchmark_calls(), *feature_density_calls()]:
        x.requires_grad_(x.is_floating_point())
        try:
            y = fn(x)
            if x.requires_grad and y.requires_grad:
                y.backward(torch.zeros_like(y))
        except Exception as error:
            raise RuntimeError(f"record_bench: {description} failed") from error
        calls += 1
    if os.path.exists(path):
        with open(path) as file:
            for launch in json.load(file):
                record.add_spec(launch)
    record.save(path)
    print(f"record_bench: {calls} calls recorded (benchmark cases, wide feature maps); "
          f"{path} holds {len(record.launches())} distinct launches")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
