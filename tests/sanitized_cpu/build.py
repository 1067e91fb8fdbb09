"""Builds robustdrop's C++ CPU kernels with Address- and UndefinedBehaviorSanitizer.

The emulated pass of scripts/test.sh runs the CUDA kernels under the
sanitizers; this build does the same for the CPU kernels of csrc/cpu, which
are vectorised (eight lanes at a time, with tails) and parallel: a read or
write outside a tensor, a misaligned access, an out-of-range shift or a signed
overflow stops the run with a report, where the op tests alone would pass
whenever the stray value is never used.

    python tests/sanitized_cpu/build.py OUT

compiles the sources setup.py builds for the CPU (none of csrc/cuda) into
``OUT/build`` and lays out ``OUT/python``, a copy of python/robustdrop whose
``_C`` is the sanitized build. Tests then
run with ``PYTHONPATH=OUT/python`` and the sanitizer runtime preloaded, as
scripts/test.sh does. The build itself loads the library (torch's extension
loader always does), so it too needs the runtime preloaded.

The sources compile as one translation unit that includes them all: torch's
headers are then parsed once, and the build takes two and a half minutes on
one core instead of seven. Each file keeps its name and line numbers in the
sanitizers' reports, and ninja rebuilds when any of them changes.
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
    unity = objects / "cpu_kernels.cpp"
    text = "".join(f'#include "{source}"\n' for source in cpu_sources())
    if not unity.exists() or unity.read_text() != text:
        unity.write_text(text)
    cpp_extension.load(
        name="_C",
        sources=[str(unity)],
        # -O2, not setup.py's -O3: the eight-lane loops are vectorised as shipped, in less compile time.
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
