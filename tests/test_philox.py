"""The shared RNG (DESIGN.md section 3) on every backend: known answers
produced by Triton itself, and agreement on millions of values."""
import importlib.util
import json
import os

import pytest
import torch

import robustdrop
from robustdrop.reference.philox import philox_uniform, philox_words
from conftest import DEVICES, available_backends

VECTORS = json.load(open(os.path.join(os.path.dirname(__file__), "data", "philox_vectors.json")))


def op_seed(seed: int) -> int:
    """The signed int64 with the bits of a seed in [0, 2**64)."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def rng_implementations(device: str):
    """(name, words(index, seed), uniform(index, seed)) for every RNG here on device."""
    status = robustdrop.backends()
    impls = [("reference", philox_words, philox_uniform)]
    compiled = "cuda" if device == "cuda" else "cpu"
    if status[compiled].available:
        impls.append((compiled, lambda i, s: torch.ops.robustdrop.philox_words(i, op_seed(s)),
                      lambda i, s: torch.ops.robustdrop.philox_uniform(i, op_seed(s))))
    if "triton" in available_backends(device):
        impls.append(("triton", lambda i, s: torch.ops.robustdrop.philox_words_triton(i, op_seed(s)),
                      lambda i, s: torch.ops.robustdrop.philox_uniform_triton(i, op_seed(s))))
    return impls


def test_vectors_cover_the_hard_cases():
    seeds = {case["seed"] for case in VECTORS["cases"]}
    firsts = {case["first_index"] for case in VECTORS["cases"]}
    assert max(seeds) >= 2**32 and max(firsts) >= 2**34  # both 32-bit halves of key and counter exercised


@pytest.mark.parametrize("device", DEVICES)
def test_known_answers(device):
    for name, words_fn, uniform_fn in rng_implementations(device):
        for case in VECTORS["cases"]:
            index = torch.arange(64, dtype=torch.int64, device=device) + case["first_index"]
            words = words_fn(index, case["seed"])
            uniform = uniform_fn(index, case["seed"])
            assert uniform.dtype == torch.float32
            assert words.cpu().tolist() == case["words"], (name, case["seed"], case["first_index"])
            assert uniform.cpu().view(torch.int32).tolist() == case["uniform_f32_bits"], (name, case["seed"])


def random_indices(count: int, generator: torch.Generator) -> torch.Tensor:
    """Indices spread over [0, 2**62), half of them near 2**32 boundaries of the counter."""
    wide = torch.randint(0, 2**62, (count // 2,), generator=generator)
    near = (torch.randint(1, 8, (count - count // 2,), generator=generator) << 34) + torch.randint(
        -16, 16, (count - count // 2,), generator=generator)
    return torch.cat([wide, near])


@pytest.mark.parametrize("device", DEVICES)
def test_backends_agree_on_millions_of_values(device):
    generator = torch.Generator().manual_seed(0)
    impls = rng_implementations(device)
    assert len(impls) >= 2, "nothing to compare the reference with"
    for seed in (0, 123456789, 2**63 + 12345, 2**64 - 1):
        count = 1 << 20
        index = random_indices(count, generator).to(device)
        expected_words = philox_words(index, seed)
        expected = philox_uniform(index, seed)
        for name, words_fn, uniform_fn in impls[1:]:
            if name == "triton" and device == "cpu" and seed not in (0, 2**64 - 1):
                continue  # the interpreter is slow: two seeds are enough there
            assert torch.equal(words_fn(index, seed), expected_words), (name, seed)
            assert torch.equal(uniform_fn(index, seed).view(torch.int32), expected.view(torch.int32)), (name, seed)


def test_uniform_range_and_moments():
    u = philox_uniform(torch.arange(1 << 20), 7)
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.double().mean().item() - 0.5) < 2e-3
    assert abs(u.double().var().item() - 1 / 12) < 2e-3


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """The compiled and Triton RNG ops are registered soundly (their fake implementations give the kernels'
    output shape and dtype, so torch.compile and torch.export trace them): an index of any shape,
    contiguous or not, and a seed past 2**63 (a negative op seed)."""
    status = robustdrop.backends()
    names = [name for name, backend in (("", "cuda" if device == "cuda" else "cpu"), ("_triton", "triton"))
             if status[backend].available and (backend != "triton" or "triton" in available_backends(device))]
    assert names, "no RNG op to check"
    index = (torch.arange(24, device=device) * 7 + 2**33).view(2, 3, 4)
    for suffix in names:
        for op in (getattr(torch.ops.robustdrop, "philox_uniform" + suffix),
                   getattr(torch.ops.robustdrop, "philox_words" + suffix)):
            torch.library.opcheck(op, (index, 12345))
            torch.library.opcheck(op, (index.transpose(0, 2), op_seed(2**64 - 3)))


def test_reference_rejects_non_int64_index():
    with pytest.raises(TypeError, match="index"):
        philox_words(torch.arange(4, dtype=torch.int32), 0)
    if robustdrop.backends()["cpu"].available:
        with pytest.raises(TypeError, match="index"):
            torch.ops.robustdrop.philox_words(torch.arange(4, dtype=torch.int32), 0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_a_launch_grid_cuda_would_refuse_is_a_clear_error():
    """Every Triton launch goes through launch(), which names the kernel when a grid passes CUDA's limits
    (2**31 - 1 programs on axis 0, 65535 on axes 1 and 2) instead of CUDA's bare "invalid argument"."""
    from robustdrop.triton import philox

    index, out = torch.zeros(4, dtype=torch.int64), torch.empty(4)
    for grid, axis in (((2**31,), 0), ((1, 65536), 1), ((1, 1, 65536), 2)):
        with pytest.raises(ValueError, match=rf"too large for _philox_kernel: .* on axis {axis}, more than"):
            philox.launch(philox._philox_kernel, grid, index, out, 4, 1, WORDS=False, BLOCK=4)
    philox.check_grid(philox._philox_kernel, (2**31 - 1, 65535, 65535))  # the largest grid CUDA takes
