"""Builds robustdrop's C++ CPU kernels with Address- and UndefinedBehaviorSanitizer.

The emulated pass of scripts/test.sh runs the CUDA kernels under the
sanitizers; this build does the same for the CPU kernels of csrc/cpu, which
are vectorised (eight lanes at a time, with tails) and parallel: a read or
write outside a tensor, a misaligned access, an out-of-range shift or a signed
overflow stops the run with a report, where the op tests alone would pass
whenever the stray value is never used.

    python tests/sanitized_cpu/build.py OUT

compiles the sources setup.py builds for the CPU (none of csrc/cuda) into
``OUT/build`` (ninja rebuilds only what changed) and lays out ``OUT/python``:
a copy of python/robustdrop whose ``_C`` is the sanitized build. Tests then
run with ``PYTHONPATH=OUT/python`` and the sanitizer runtime preloaded, as
scripts/test.sh does. The build itself loads the library (torch's extension
loader always does), so it too needs the runtime preloaded.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def cpu_sources() -> list[str]:
    """What setup.py compiles when there are no CUDA kernels."""
    patterns = ("csrc/*.cpp", "csrc/autograd/*.cpp", "csrc/cpu/*.cpp")
    return sorted(str(path) for pattern in patterns for path in ROOT.glob(pattern))


def build(out: Path) -> Path:
    """Compiles the sanitized extension and returns the package root to put on PYTHONPATH."""
    from torch.utils import cpp_extension

    objects = out / "build"
    objects.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="_C",
        sources=cpu_sources(),
        # -O2, not setup.py's -O3: the loops are still vectorised as shipped, in half the compile time.
        extra_cflags=["-O2", "-fopenmp"] + SANITIZERS,
        extra_ldflags=["-fopenmp"] + SANITIZERS,
        build_directory=str(objects),
        is_python_module=False,
    )
    package = out / "python" / "robustdrop"
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(ROOT / "python" / "robustdrop", package,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copy2(objects / "_C.so", package / "_C.so")
    return package.parent


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/sanitized_cpu/build.py OUT")
    print(build(Path(sys.argv[1]).resolve()))
