"""tests/gpu_compile: the PTX check for fused and approximate float instructions, the
launch recorder, and the compile-only Triton build for sm_90 (scripts/test.sh runs the
last on every kernel the suite launched)."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from gpu_compile import ptx, record

HERE = os.path.dirname(os.path.abspath(__file__))

# Entries as nvcc 13 names them: namespaced, in an anonymous namespace, templated.
NVCC_ENTRIES = {
    "_ZN10robustdrop63_GLOBAL__N__5254cc57_25_feature_density_kernel_cu_cc5b21f7_223114lanczos_kernel"
    "ENS0_14LanczosProblemE": "lanczos_kernel",
    "_ZN10robustdrop56_GLOBAL__N__776c0eb1_18_cam_mask_kernel_cu_2ab31e29_220615cam_nchw_kernelIfLi4EEEvPKT_"
    "PKflllPKbPf": "cam_nchw_kernel",
    "_ZN10robustdrop56_GLOBAL__N__776c0eb1_18_cam_mask_kernel_cu_2ab31e29_220624select_candidates_kernel"
    "ENS0_8TopkRowsES1_lPKbl": "select_candidates_kernel",
    "_Z12scale_kernelPfif": "scale_kernel",
    "_apply_kernel": "_apply_kernel",
}

PTX = textwrap.dedent("""
    .visible .entry _apply_kernel(
    \t.param .u64 _apply_kernel_param_0
    )
    {
    \tmul.f32 \t%r1, %r2, %r3;
    \tfma.rn.f32 \t%r4, %r1, %r2, %r3;
    \tdiv.full.f32 \t%r5, %r4, %r1;
    \tret;
    }
    .visible .entry _cam_kernel()
    {
    \tfma.rn.f32 \t%r4, %r1, %r2, %r3;
    \tex2.approx.ftz.f32 \t%r6, %r4;
    }
    .visible .entry _drop_kernel()
    {
    \tdiv.rn.f32 \t%r5, %r4, %r1;
    \tsqrt.rn.f32 \t%r7, %r5;
    \tdiv.u32 \t%r8, %r9, %r10;
    \tfma.rn.f64 \t%fd1, %fd2, %fd3, %fd4;
    }
""")


@pytest.mark.parametrize("entry", list(NVCC_ENTRIES))
def test_kernel_name_is_the_function_of_an_nvcc_or_triton_entry(entry):
    assert ptx.kernel_name(entry) == NVCC_ENTRIES[entry]


def test_inexact_instructions_are_counted_per_kernel_and_allowed_only_where_design_states_a_tolerance():
    found = ptx.inexact_instructions(PTX)
    assert found == {"_apply_kernel": {"fma.rn.f32": 1, "div.full.f32": 1},
                     "_cam_kernel": {"fma.rn.f32": 1, "ex2.approx.ftz.f32": 1},
                     "_drop_kernel": {"fma.rn.f64": 1}}
    problems = ptx.violations(PTX)
    assert len(problems) == 2
    assert problems[0].startswith("_apply_kernel: {'fma.rn.f32': 1, 'div.full.f32': 1}")
    assert problems[1].startswith("_drop_kernel: {'fma.rn.f64': 1}")


def test_every_tolerant_kernel_exists_in_the_sources():
    """A renamed kernel must not keep an exemption that no longer applies to anything."""
    root = os.path.dirname(HERE)
    sources = ""
    for folder in ("csrc/cuda", "python/robustdrop/triton"):
        for name in os.listdir(os.path.join(root, folder)):
            with open(os.path.join(root, folder, name)) as file:
                sources += file.read()
    for kernel in ptx.TOLERANT:
        assert f"{kernel}(" in sources or f"{kernel}<" in sources, kernel


def test_record_describes_what_a_compiled_kernel_specialises_on():
    aligned = torch.zeros(8, dtype=torch.float16)
    assert record.describe(aligned) == {"tensor": "float16", "aligned": True}
    assert record.describe(aligned[1:]) == {"tensor": "float16", "aligned": False}
    assert record.describe(17) == {"int": 17}
    assert record.describe(True) == {"bool": True}
    assert record.describe(0.25) == {"float": 0.5}
    assert record.describe(None) == {"none": None}
    with pytest.raises(TypeError, match="str"):
        record.describe("text")


KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def fused_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    tl.store(y_ptr + i, x * 3.0 + 1.0, mask=i < n)


@triton.jit
def divided_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    tl.store(y_ptr + i, x / 3.0, mask=i < n)  # an inexact division, whichever form Triton picks


@triton.jit
def exact_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    tl.store(y_ptr + i, tl.div_rn(x, 3.0) + 1.0, mask=i < n)
'''


def _launch(kernel, block):
    pointer = {"tensor": "float32", "aligned": True}
    return {"module": "gpu_compile_probe", "kernel": kernel,
            "arguments": {"x_ptr": pointer, "y_ptr": pointer, "n": {"int": 64}, "BLOCK": {"int": block},
                          "num_warps": {"int": 4}}}


def test_triton_kernels_compile_for_sm90_here_and_inexact_ones_fail_the_check(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    (tmp_path / "gpu_compile_probe.py").write_text(KERNELS)
    launches = tmp_path / "launches.json"

    def check(*launch_list):
        launches.write_text(json.dumps(list(launch_list)))
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
                       "TRITON_CACHE_DIR": str(tmp_path / "cache")}
        return subprocess.run([sys.executable, os.path.join(HERE, "gpu_compile", "compile_triton.py"), str(launches)],
                              capture_output=True, text=True, env=environment, timeout=600)

    passed = check(_launch("exact_kernel", 64))
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "1 kernels compiled for sm_90" in passed.stdout
    assert "exact_kernel" in passed.stdout

    failed = check(_launch("exact_kernel", 64), _launch("fused_kernel", 64), _launch("divided_kernel", 64),
                   _launch("exact_kernel", 48))  # a block of 48: tl.arange needs a power of two
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "fused_kernel: {'fma.rn.f32': 1}" in failed.stdout
    # Triton 3.9 divides by a reciprocal (div.approx.f32, then a multiply), Triton 3.6 by div.full.f32:
    # either is an inexact division.
    assert re.search(r"divided_kernel: \{'div\.(approx|full)\.f32': 1\}", failed.stdout), failed.stdout
    assert "exact_kernel does not compile for sm_90" in failed.stdout
    assert "exact_kernel: {" not in failed.stdout


RECORD_BENCH_PROBE = '''
import json, sys
import torch
import robustdrop
import record_bench

record_bench.benchmark_calls = lambda: [("drop_block2d", torch.zeros(2, 3, 9, 9),
                                         lambda x: robustdrop.drop_block2d(x, 0.2, 3, seed=1, backend="triton"))]
record_bench.WIDE_FEATURE_MAPS = ((1, 200, 16, 16),)
sys.exit(record_bench.main(sys.argv[1]))
'''


def test_record_bench_adds_launches_it_does_not_run_to_the_suites(tmp_path):
    """The benchmark's launches join those already in the file; the kernels do not run (FDD on a
    (1, 200, 16, 16) map would take minutes in the interpreter), and its Lanczos kernel is recorded
    with the vector length of m = min(C, H*W) = 200."""
    pytest.importorskip("triton")
    launches = tmp_path / "launches.json"
    earlier = {"module": "gpu_compile_probe", "kernel": "exact_kernel", "arguments": {"n": {"int": 64}}}
    launches.write_text(json.dumps([earlier]))
    (tmp_path / "probe.py").write_text(RECORD_BENCH_PROBE)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(HERE, "gpu_compile"),
                                                                 os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(launches)], capture_output=True, text=True,
                          env=environment, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 calls recorded" in done.stdout  # one drop_block2d, FDD with dims 1, 2 and 3
    recorded = json.loads(launches.read_text())
    assert earlier in recorded
    kernels = {(launch["module"], launch["kernel"]) for launch in recorded}
    assert ("robustdrop.triton.block_mask", "_apply_kernel") in kernels
    lanczos = [launch["arguments"] for launch in recorded if launch["kernel"] == "_lanczos_kernel"]
    assert sorted(arguments["DIMS"]["int"] for arguments in lanczos) == [1, 2, 3]
    assert {arguments["BLOCK_M"]["int"] for arguments in lanczos} == {256}
