"""Test set-up: which backends run on which device here.

Without a GPU the Triton kernels run through the interpreter, which must be
switched on before Triton is first imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import robustdrop  # noqa: E402


def available_backends(device: str) -> list[str]:
    """The backends that run on tensors of ``device`` here."""
    status = robustdrop.backends()
    wanted = ("cuda", "triton", "reference") if device == "cuda" else ("cpu", "triton", "reference")
    return [name for name in wanted if status[name].available]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_BACKENDS = [(device, backend) for device in DEVICES for backend in available_backends(device)]
KERNEL_BACKENDS = [(device, backend) for device, backend in DEVICE_BACKENDS if backend != "reference"]


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor):
    """Equal to the last bit, NaN included, and of the same dtype and shape."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.is_floating_point():
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
        actual, expected = actual.view(width), expected.view(width)
    assert torch.equal(actual.cpu(), expected.cpu())


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a ROBUSTDROP_BACKEND in the shell must not leak in."""
    monkeypatch.delenv("ROBUSTDROP_BACKEND", raising=False)
