"""The sanitized CPU pass of scripts/test.sh checks what it claims to check.

scripts/test.sh runs the op tests a third time on robustdrop._C built by
tests/sanitized_cpu/build.py, with AddressSanitizer preloaded, and sets
ROBUSTDROP_SANITIZED_CPU=1 for that pass only. These tests make that pass fail
when its extension is not the instrumented one or when the sanitizer would not
stop the run; elsewhere they skip.
"""
import subprocess
import sys
from pathlib import Path

import pytest

import robustdrop
from conftest import SANITIZED_CPU

pytestmark = pytest.mark.skipif(not SANITIZED_CPU, reason="ROBUSTDROP_SANITIZED_CPU=1 only: scripts/test.sh's sanitized CPU pass")


def test_the_cpu_kernels_are_the_instrumented_build():
    from robustdrop import _C

    assert robustdrop.backends()["cpu"].available
    symbols = Path(_C.__file__).read_bytes()
    # Instrumented loads call the sanitizers' runtimes, so the library imports their entry points.
    assert b"__asan_report_load" in symbols
    assert b"__ubsan_handle_" in symbols


def test_an_access_past_an_allocation_stops_the_process():
    # Outside robustdrop's kernels, so it checks the runtime's settings, not the build: a
    # 64-byte copy out of an 8-byte allocation is reported and aborts, as a kernel's would.
    code = ("import ctypes; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; "
            "source = libc.malloc(8); target = ctypes.create_string_buffer(64); "
            "ctypes.memmove(target, source, 64)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "heap-buffer-overflow" in result.stderr
