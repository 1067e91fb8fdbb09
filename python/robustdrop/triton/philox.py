"""The shared counter-based RNG of DESIGN.md section 3, in Triton.

``uniform(seed, i)`` is bit-identical to ``csrc/philox.h`` and to the CPU ops
``robustdrop::philox_uniform`` / ``robustdrop::philox_words``::

    key     = (lo32(seed), hi32(seed))                  # seed taken mod 2**64
    counter = (lo32(i >> 2), hi32(i >> 2), 0, 0)
    word    = Philox4x32-10(counter, key)[i & 3]        # tl.randint4x
    x       = int32(word); x < 0 -> ~x
    u       = float32(x) * float32(4.6566127342e-10)    # in [0, 1)

The ``@triton.jit`` helpers (``to_uniform``, ``word``, ``uniform``) are meant to
be called from other kernels; the two ops expose them to Python for testing the
generator against the known answers and the other backends. ``launch`` and
``register_op`` are the launch/registration rules every Triton op here follows.

Seeds arrive as signed 64-bit Python ints (a seed >= 2**63 is passed as
``seed - 2**64``). Triton types an int argument as i32 when it fits and i64
otherwise; ``tl.randint4x`` casts either to uint64, which sign-extends, so the
key is always the two halves of the seed's 64-bit two's-complement pattern.
"""

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op, wrap_triton

from robustdrop._checks import check_philox_index

# Triton's own constant: float32(2**31 - 1) times it is 0.99999994 < 1.
_INT31_TO_UNIT = tl.constexpr(4.6566127342e-10)


@triton.jit
def to_uniform(word):
    """Maps uint32 words to float32 uniforms in [0, 1), as tl.rand does.

    Negatives fold with ``~x`` (never ``x & 0x7FFFFFFF``): that is the
    contract, and both halves of the uint32 range land on [0, 2**31).
    """
    x = word.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * _INT31_TO_UNIT


@triton.jit
def word(seed, index):
    """The uint32 Philox word behind element ``index`` (an int64 block, >= 0).

    One Philox4x32-10 call yields the words of indices 4g .. 4g+3 (g = i >> 2);
    element i takes word i & 3. The caller decides whether computing one call
    per element (simple) or one per group of four (see block_mask.py) fits.
    """
    w0, w1, w2, w3 = tl.randint4x(seed, index >> 2)
    lane = index & 3
    return tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))


@triton.jit
def uniform(seed, index):
    """float32 uniform(seed, index) of DESIGN.md section 3 for an int64 block."""
    return to_uniform(word(seed, index))


@triton.jit(do_not_specialize=["seed"])
def _philox_kernel(index_ptr, out_ptr, numel, seed, WORDS: tl.constexpr, BLOCK: tl.constexpr):
    """out[k] = word(seed, index[k]) (as int64) if WORDS else uniform(seed, index[k]).

    index_ptr, out_ptr: flat (numel,) int64 / (int64 or float32) buffers.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    index = tl.load(index_ptr + offs, mask=inside, other=0)
    if WORDS:
        # uint32 -> int64 zero-extends, giving the word's value in [0, 2**32).
        tl.store(out_ptr + offs, word(seed, index).to(tl.int64), mask=inside)
    else:
        tl.store(out_ptr + offs, uniform(seed, index), mask=inside)


@triton.jit
def sample_and_tile(tiles):
    """(n, tile) of program_id(0) in a flat grid of N * tiles programs, n as int64.

    Kernels with many tiles per sample take one flat axis rather than a
    (N, tiles) grid: CUDA allows 2**31 - 1 programs on axis 0 but only 65535
    on axes 1 and 2, which a large map's tile count can pass.
    """
    program = tl.program_id(0)
    return (program // tiles).to(tl.int64), program % tiles


# CUDA's limits on a launch grid: programs along axis 0, and along axes 1 and 2.
_GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(kernel, grid) -> None:
    """A clear error for a grid CUDA would refuse (it reports only "invalid argument")."""
    for axis, (programs, limit) in enumerate(zip(grid, _GRID_LIMITS)):
        if isinstance(programs, int) and programs > limit:
            raise ValueError(f"the input is too large for {getattr(kernel, '__name__', 'a Triton kernel')}: its launch grid needs {programs} programs "
                             f"on axis {axis}, more than the {limit} CUDA allows")


def _interpreted(kernel) -> bool:
    """True under TRITON_INTERPRET=1, where @triton.jit builds no JITFunction."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launches ``kernel[grid](*args, **kwargs)`` through ``wrap_triton``.

    On a GPU, wrap_triton makes the launch visible to torch.compile and to
    fake-tensor tracing (where it is a no-op). Under the interpreter the ops
    are opaque (``register_op``), so the kernel is launched as it is (torch
    before 2.13's wrap_triton rejects an interpreted kernel), and a launch on
    fake tensors (shape propagation only) is skipped: the interpreter would
    read their memory. A grid past CUDA's limits is a ValueError everywhere.
    """
    check_grid(kernel, grid)
    if _interpreted(kernel):
        if not any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            kernel[grid](*args, **kwargs)
        return
    device = _other_cuda_device(args)
    if device is None:
        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    # Triton launches on the current CUDA device: tensors on another one (several GPUs in one process,
    # without set_device) would be refused, or read from the wrong device.
    with torch.cuda.device(device):
        wrap_triton(kernel)[grid](*args, **kwargs)


def _other_cuda_device(args) -> int | None:
    """The index of the CUDA device that holds the launch's first tensor when it is not the current device,
    else None. None while torch.compile traces: Inductor sets the device of every kernel it launches."""
    if torch.compiler.is_compiling():
        return None
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if tensor is None or tensor.device.type != "cuda" or is_fake(tensor):
        return None
    return None if tensor.device.index == torch.cuda.current_device() else tensor.device.index


def register_op(name: str, probe_kernel, mutates_args: tuple = ()):
    """Registers ``fn`` as the custom op ``name`` (schema from its annotations).

    Normally a ``triton_op``: torch.compile traces into ``fn`` and sees the
    kernels; ``fn`` doubles as the fake implementation. Under the interpreter
    wrap_triton cannot trace, so the op is an opaque ``custom_op`` whose fake
    implementation is ``fn`` with its launches skipped (see ``launch``).
    mutates_args names the arguments ``fn`` writes in place.
    """

    def register(fn):
        if not _interpreted(probe_kernel):
            return triton_op(name, fn, mutates_args=mutates_args)
        op = custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fn)
        return op

    return register


_BLOCK = 1024


def _run(index: torch.Tensor, seed: int, words: bool) -> torch.Tensor:
    check_philox_index(index)
    flat = index.contiguous()
    out = torch.empty(flat.shape, dtype=torch.int64 if words else torch.float32, device=flat.device)
    numel = flat.numel()
    if numel > 0:
        grid = (triton.cdiv(numel, _BLOCK),)
        launch(_philox_kernel, grid, flat, out, numel, seed, WORDS=words, BLOCK=_BLOCK)
    return out


@register_op("robustdrop::philox_uniform_triton", _philox_kernel)
def philox_uniform(index: torch.Tensor, seed: int) -> torch.Tensor:
    """uniform(seed, i) at every element of ``index``.

    index: int64 tensor of any shape, values >= 0. seed: a signed 64-bit int.
    Returns a float32 tensor of index's shape, values in [0, 1).
    """
    return _run(index, seed, words=False)


@register_op("robustdrop::philox_words_triton", _philox_kernel)
def philox_words(index: torch.Tensor, seed: int) -> torch.Tensor:
    """The uint32 Philox word behind each element of ``index``.

    index: int64 tensor of any shape, values >= 0. seed: a signed 64-bit int.
    Returns an int64 tensor of index's shape with values in [0, 2**32).
    """
    return _run(index, seed, words=True)
