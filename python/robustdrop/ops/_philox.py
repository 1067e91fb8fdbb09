"""Fake implementations of the compiled RNG ops (DESIGN.md section 3): internal ops, with
no functional API or benchmark of their own, hence the leading underscore.

``robustdrop::philox_uniform(index, seed)`` and ``philox_words(index, seed)``
(CPU and CUDA kernels in csrc) map an int64 index tensor of any shape to
uniform(seed, i) as float32 and to the Philox word as int64 in [0, 2**32), a
contiguous tensor of index's shape. Random Mask draws its keep mask with the
first; the fakes let ``torch.compile``, ``torch.export`` and FakeTensor
tracing see the ops' outputs without running them. No autograd: the outputs
are random numbers, not functions of a differentiable input.
"""
import torch

from robustdrop._checks import check_philox_index

__all__ = ["register"]


def _fake_uniform(index: torch.Tensor, seed: int) -> torch.Tensor:
    check_philox_index(index)  # as the kernels check, so a traced call fails as an eager one
    return index.new_empty(index.shape, dtype=torch.float32)


def _fake_words(index: torch.Tensor, seed: int) -> torch.Tensor:
    check_philox_index(index)
    return index.new_empty(index.shape, dtype=torch.int64)


def register(uniform_name: str, words_name: str) -> None:
    """Fake implementations of the compiled (uniform, words) pair."""
    torch.library.register_fake(f"robustdrop::{uniform_name}", _fake_uniform)
    torch.library.register_fake(f"robustdrop::{words_name}", _fake_words)
