"""Builds csrc/cuda/*.cu for the CPU against the CUDA emulation of emulator.h.

The kernels run as they are written: each .cu file is copied with three
mechanical rewrites, and nothing else of it changes.

- ``kernel<<<grid, block, shared, stream>>>(args)`` becomes
  ``emu::launch(emu::LaunchConfig{grid, block, shared, stream}, <a call of kernel>, args)``,
  a plain C++ call that the emulator runs;
- ``extern __shared__ T name[];`` becomes a pointer to the launch's dynamic shared memory;
- ``TORCH_LIBRARY_IMPL(robustdrop, CUDA, m)`` registers into the library
  ``robustdrop_emulated`` under the CPU key, whose schemas are those of
  csrc/robustdrop.cpp (copied, not rewritten by hand), so the emulated kernels
  take CPU tensors and never clash with the real CPU kernels.

The C++ autograd of csrc/autograd is built along, with its op names moved to
``robustdrop_emulated``, so the emulated ops differentiate as the real ones do.

The ``include/`` folder stands in for ``cuda_runtime.h`` and the four c10/cuda
headers the launchers use. ``selftest_kernels.cu`` adds kernels that check the emulator itself.
``load()`` compiles once per source change (ninja
keeps the objects under build/cuda_emulation) and returns
``torch.ops.robustdrop_emulated``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
LIBRARY = "robustdrop_emulated"

_LAUNCH = re.compile(r"<<<(?P<config>.*?)>>>\s*\((?P<empty>\s*\))?", re.S)
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w:]*)\s+(\w+)\s*\[\s*\]\s*;")
_CUDA_REGISTRATION = "TORCH_LIBRARY_IMPL(robustdrop, CUDA, m)"
_SCHEMAS = "TORCH_LIBRARY(robustdrop, m)"


def _kernel_start(text: str, end: int) -> int:
    """Where the kernel expression that ends just before ``end`` begins: a
    (qualified) name, with template arguments or not."""
    i = end - 1
    while text[i].isspace():
        i -= 1
    if text[i] == ">":
        depth = 0
        while True:
            depth += {">": 1, "<": -1}.get(text[i], 0)
            if depth == 0:
                break
            i -= 1
        i -= 1
        while text[i].isspace():
            i -= 1
    while text[i].isalnum() or text[i] in "_:":
        i -= 1
    return i + 1


def _rewrite_launches(text: str) -> str:
    """kernel<<<config>>>(args) as ::emu::launch(::emu::LaunchConfig{config},
    [&](auto&&... a) { kernel(a...); }, args): the lambda lets the kernel's
    template arguments be deduced from the arguments, as nvcc does. Lines keep
    their numbers."""
    out, done = [], 0
    for launch in _LAUNCH.finditer(text):
        start = _kernel_start(text, launch.start())
        kernel = text[start : launch.start()]
        call = " ".join(kernel.split())
        separator = ")" if launch.group("empty") else ", "
        out.append(text[done:start])
        out.append("::emu::launch(" + "\n" * kernel.count("\n"))
        out.append(f"::emu::LaunchConfig{{{launch.group('config')}}}, ")
        out.append(f"[&](auto&&... emu_args) {{ {call}(emu_args...); }}{separator}")
        done = launch.end()
    out.append(text[done:])
    return "".join(out)


def rewrite_kernel_source(text: str, origin: str) -> str:
    """One .cu file as C++ for the emulator; ``origin`` names it in diagnostics."""
    if text.count("<<<") != len(_LAUNCH.findall(text)):
        raise ValueError(f"{origin}: a '<<<' that is not a kernel launch the rewrite can follow")
    if _CUDA_REGISTRATION not in text and "TORCH_LIBRARY_IMPL" in text:
        raise ValueError(f"{origin}: a registration other than {_CUDA_REGISTRATION}")
    text = _rewrite_launches(text)
    text = _DYNAMIC_SHARED.sub(r"\1* \2 = ::emu::dynamic_shared<\1>();", text)
    text = text.replace(_CUDA_REGISTRATION, f"TORCH_LIBRARY_IMPL({LIBRARY}, CPU, m)")
    return f'#line 1 "{origin}"\n{text}'


def rewrite_autograd_source(text: str, origin: str) -> str:
    """One csrc/autograd file with its ops and registrations in the emulated library."""
    text = text.replace('"robustdrop::', f'"{LIBRARY}::')
    text = text.replace("TORCH_LIBRARY_IMPL(robustdrop, ", f"TORCH_LIBRARY_IMPL({LIBRARY}, ")
    return f'#line 1 "{origin}"\n{text}'


def schema_source() -> str:
    """The TORCH_LIBRARY block of csrc/robustdrop.cpp, for the emulated library,
    plus the emulator's own controls."""
    text = (CSRC / "robustdrop.cpp").read_text()
    start = text.index(_SCHEMAS)
    block = text[start:].replace(_SCHEMAS, f"TORCH_LIBRARY({LIBRARY}, m)", 1)
    return (HERE / "controls.cpp").read_text() + f'\n#line {text[:start].count(chr(10)) + 1} "csrc/robustdrop.cpp"\n' + block


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def address_sanitizer_requested() -> bool:
    """ROBUSTDROP_EMULATE_ASAN=1: build with AddressSanitizer (and
    UndefinedBehaviorSanitizer), which then must be preloaded (LD_PRELOAD, as
    scripts/test.sh does): every read or write outside a tensor, a shared array
    or a thread's stack, and every misaligned access, out-of-range shift or
    signed overflow, stops the run with a report."""
    return os.environ.get("ROBUSTDROP_EMULATE_ASAN") == "1"


def load(verbose: bool = False):
    """Compiles (when a source changed) and loads the emulated kernels;
    returns ``torch.ops.robustdrop_emulated``."""
    if hasattr(torch.ops, LIBRARY) and hasattr(getattr(torch.ops, LIBRARY), "emulator_configure"):
        return getattr(torch.ops, LIBRARY)
    from torch.utils import cpp_extension

    sanitize = address_sanitizer_requested()
    build = ROOT / "build" / ("cuda_emulation_asan" if sanitize else "cuda_emulation")
    sources = build / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    paths = []
    kernels = sorted((CSRC / "cuda").glob("*.cu")) + [HERE / "selftest_kernels.cu"]
    for kernel in kernels:
        path = sources / (kernel.stem + ".cpp")
        _write_if_changed(path, rewrite_kernel_source(kernel.read_text(), str(kernel.relative_to(ROOT))))
        paths.append(str(path))
    for autograd in sorted((CSRC / "autograd").iterdir()):
        # The headers are copied too: "mask_autograd.h" resolves next to its includer first.
        path = sources / autograd.name
        _write_if_changed(path, rewrite_autograd_source(autograd.read_text(), f"csrc/autograd/{autograd.name}"))
        if autograd.suffix == ".cpp":
            paths.append(str(path))
    registry = sources / "registry.cpp"
    _write_if_changed(registry, schema_source())
    paths.append(str(registry))
    # UndefinedBehaviorSanitizer along: a misaligned vector load (a fault on a
    # GPU), an out-of-range shift or a signed overflow stops the run as well.
    asan = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"] if sanitize else []
    cpp_extension.load(
        name="robustdrop_cuda_emulated_asan" if sanitize else "robustdrop_cuda_emulated",
        sources=paths,
        extra_include_paths=[str(HERE / "include"), str(HERE), str(CSRC / "cuda"), str(CSRC)],
        # -ffp-contract=off: plain rounding for every operation, as the kernels'
        # explicit *_rn intrinsics ask of the device. Hidden symbols: nothing of
        # this library can bind to robustdrop._C's.
        extra_cflags=["-O1", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-unused-function"] + asan,
        extra_ldflags=asan,
        build_directory=str(build),
        is_python_module=False,
        verbose=verbose,
    )
    return getattr(torch.ops, LIBRARY)
