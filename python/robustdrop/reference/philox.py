"""The shared RNG (DESIGN.md section 3) in plain, vectorised PyTorch.

``philox_uniform(index, seed)`` equals Triton's ``tl.rand4x``-style draw:
the Philox4x32-10 block with counter ``(lo32(i >> 2), hi32(i >> 2), 0, 0)``
and key ``(lo32(seed), hi32(seed))``, word ``i & 3``, mapped to ``[0, 1)``.
All arithmetic is int64; 32x32-bit products are split into 16-bit halves
because a plain int64 product would overflow.
"""
import torch

_MASK32 = 0xFFFFFFFF
_MUL0, _MUL1 = 0xD2511F53, 0xCD9E8D57
_WEYL0, _WEYL1 = 0x9E3779B9, 0xBB67AE85
_TO_UNIFORM = 4.6566127342e-10

__all__ = ["philox_words", "philox_uniform", "words_to_uniform", "split_seed"]


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key (lo32, hi32) of a seed taken modulo 2**64."""
    seed &= (1 << 64) - 1
    return seed & _MASK32, seed >> 32


def _mul_hi_lo(constant: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of constant * value for a uint32 constant and uint32 values held in int64."""
    value_hi, value_lo = value >> 16, value & 0xFFFF
    low_product = constant * value_lo  # < 2**48
    high_product = constant * value_hi  # < 2**48; the full product is high*2**16 + low
    hi = (high_product + (low_product >> 16)) >> 16
    lo = (((high_product & 0xFFFF) << 16) + low_product) & _MASK32
    return hi, lo


def _philox_block(counter_lo: torch.Tensor, counter_hi: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Philox4x32-10 on counters (counter_lo, counter_hi, 0, 0); returns the four words as int64 tensors."""
    key0, key1 = split_seed(seed)
    c0, c1 = counter_lo, counter_hi
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi1, lo1 = _mul_hi_lo(_MUL1, c2)
        hi0, lo0 = _mul_hi_lo(_MUL0, c0)
        c0, c1, c2, c3 = hi1 ^ c1 ^ key0, lo1, hi0 ^ c3 ^ key1, lo0
        key0 = (key0 + _WEYL0) & _MASK32
        key1 = (key1 + _WEYL1) & _MASK32
    return [c0, c1, c2, c3]


def philox_words(index: torch.Tensor, seed: int) -> torch.Tensor:
    """The uint32 Philox word of each element index, as int64 in [0, 2**32).

    index: int64 tensor of any shape, every value >= 0. Returns a tensor of index's shape.
    """
    if index.dtype != torch.int64:
        raise TypeError(f"index must be an int64 tensor, got {index.dtype}")
    group = index >> 2
    words = _philox_block(group & _MASK32, group >> 32, seed)
    lane = index & 3
    out = words[3]
    for k in (2, 1, 0):
        out = torch.where(lane == k, words[k], out)
    return out


def words_to_uniform(words: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> [0, 1) map: x = int32(word), x < 0 -> ~x, float32(x) * 4.6566127342e-10 (float32)."""
    folded = torch.where(words >= 2**31, _MASK32 - words, words)  # ~int32(w) == 2**32 - 1 - w for w >= 2**31
    return folded.to(torch.float32) * torch.tensor(_TO_UNIFORM, dtype=torch.float32, device=words.device)


def philox_uniform(index: torch.Tensor, seed: int) -> torch.Tensor:
    """uniform(seed, i) of DESIGN.md section 3 at each int64 index; float32 of index's shape."""
    return words_to_uniform(philox_words(index, seed))
