"""Seeds for the shared RNG: user seeds are taken modulo 2**64, and ops receive
them as the signed int64 with the same bits (the schema type ``int``)."""
import torch

_TWO_64 = 1 << 64


def draw_seed() -> int:
    """A fresh seed from torch's default CPU generator, so ``torch.manual_seed`` makes runs repeatable.

    Drawn in [0, 2**63) so it needs no conversion, which keeps it usable as a
    traced scalar under torch.compile.
    """
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item()


def op_seed(seed) -> int:
    """The signed int64 an op receives for ``seed`` (None draws one)."""
    if seed is None:
        return draw_seed()
    if isinstance(seed, torch.SymInt):
        return seed
    seed = int(seed) % _TWO_64
    return seed - _TWO_64 if seed >= 1 << 63 else seed
