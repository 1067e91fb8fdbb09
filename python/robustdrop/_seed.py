"""Seeds for the shared RNG: user seeds are taken modulo 2**64, and ops receive
them as the signed int64 with the same bits (the schema type ``int``).

Seeds drawn for you (``seed=None``)
-----------------------------------
An op called with ``seed=None`` draws its seed from torch's default CPU
generator, so ``torch.manual_seed`` makes a run repeatable.

Distributed training: per-rank masks by default. When ``torch.distributed`` is
initialised, the drawn seed ``s`` of rank ``r`` becomes::

    s_r = s XOR key(r),   key(r) = SplitMix64(r) & (2**63 - 1)

where ``SplitMix64(r)`` is the r-th output of SplitMix64 started from state 0,
i.e. ``mix64(r * 0x9E3779B97F4A7C15 mod 2**64)`` with SplitMix64's finaliser
``mix64`` (``rank_key``). ``mix64(0) = 0``, so rank 0, and any process without
an initialised process group, keeps the plain drawn seed: single-process runs
are unchanged. Ranks seeded alike with ``torch.manual_seed`` (as data-parallel
scripts usually are, for identical initial weights) therefore draw different
masks, as independent dropout on each rank's shard of the batch should. The
keys of ranks below 2**20 are distinct (before the 63-bit mask they are
distinct for all ranks: ``mix64`` is a bijection), so ranks get distinct
Philox keys and independent streams. ``rank_key(1)`` is 0x6220A8397B1DCDAF
(SplitMix64's well-known first output 0xE220A8397B1DCDAF, top bit cleared).

``set_rank_seeding("shared")`` switches this off for the process: every rank
then uses the plain drawn seed, and ranks seeded alike draw identical masks
(``set_rank_seeding("per_rank")`` restores the default). An explicit
``seed=`` is never changed: the same seed gives the same mask on every rank.
Random Mask's seed (``RandomMask2d``, ``apply_random_mask`` with ``seed=None``)
is architecture, not dropout: it is drawn without the key, so every rank
seeded alike builds the same masks.

Under ``torch.compile`` the rank is read while tracing (Dynamo folds
``torch.distributed.get_rank()`` to a constant), the XOR is a traced integer
op on the drawn seed tensor, and that tensor goes to the op as it is
(``op_seed``), so a model stays one graph, with or without ``fullgraph=True``;
the mode is
a module global that Dynamo guards, so changing it recompiles. Compile after
``init_process_group``: a graph traced before it may keep rank 0's rule.
"""
import torch

from robustdrop import _checks

_TWO_64 = 1 << 64
_MASK_64 = _TWO_64 - 1
_MASK_63 = (1 << 63) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15

RANK_SEEDING_MODES = ("per_rank", "shared")
_rank_seeding = "per_rank"


def set_rank_seeding(mode: str) -> str:
    """Choose how seeds drawn for ``seed=None`` behave across distributed ranks; returns the previous mode.

    Args:
        mode: ``"per_rank"`` (the default): rank r uses the drawn seed XOR
            ``rank_key(r)``, so ranks draw different masks even when seeded
            alike; ``"shared"``: every rank uses the drawn seed as it is.
    """
    global _rank_seeding
    if mode not in RANK_SEEDING_MODES:
        raise ValueError(f"mode must be one of {RANK_SEEDING_MODES}, got {mode!r}")
    previous, _rank_seeding = _rank_seeding, mode
    return previous


def rank_seeding() -> str:
    """The current mode of ``set_rank_seeding``: "per_rank" or "shared"."""
    return _rank_seeding


def _mix64(z: int) -> int:
    """SplitMix64's finaliser, a bijection of 64-bit integers with mix64(0) = 0."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return z ^ (z >> 31)


def rank_key(rank: int) -> int:
    """key(r) = mix64(r * 0x9E3779B97F4A7C15 mod 2**64) & (2**63 - 1), in [0, 2**63); key(0) = 0.

    XOR with a key below 2**63 keeps a drawn seed in [0, 2**63).
    """
    return _mix64((rank * _GOLDEN_GAMMA) & _MASK_64) & _MASK_63


def _distributed_rank() -> int:
    """This process's rank in the default process group, 0 without one."""
    distributed = torch.distributed
    if not distributed.is_available() or not distributed.is_initialized():
        return 0
    return distributed.get_rank()


def draw_seed_tensor(*, per_rank: bool = True) -> torch.Tensor:
    """A fresh seed from torch's default CPU generator, so ``torch.manual_seed`` makes runs repeatable,
    as a 0-d int64 CPU tensor.

    Drawn in [0, 2**63) so it needs no conversion. With ``per_rank`` (what ops
    use) and the mode "per_rank", a distributed rank r > 0 gets the drawn seed
    XOR ``rank_key(r)`` (module docstring); ``per_rank=False`` is for seeds that
    must agree across ranks, such as a Random Mask's, which is architecture.
    """
    seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
    if per_rank and _rank_seeding == "per_rank":
        rank = _distributed_rank()
        if rank != 0:
            # On the tensor: a traced op under torch.compile, no Python int ops on a traced scalar.
            seed = torch.bitwise_xor(seed, rank_key(rank))
    return seed


def draw_seed(*, per_rank: bool = True) -> int:
    """``draw_seed_tensor``'s seed as a Python int."""
    return draw_seed_tensor(per_rank=per_rank).item()


CAPTURE_ERROR = ("robustdrop draws its random numbers (a seed for seed=None, Active DropBlock's policy) on the host, "
                 "so while a CUDA graph is being captured it would draw them once and every replay would drop the "
                 "same positions. Capture with torch.compile(mode=\"reduce-overhead\"), which runs robustdrop's "
                 "seeded ops outside its CUDA graphs, or pass seed= to replay one seed on purpose")


TRACE_ERROR = ("robustdrop draws its random numbers (a seed for seed=None, Active DropBlock's policy) on the host, "
               "so torch.jit.trace would record them as constants and every call of the traced module would drop "
               "the same positions. Trace the model in eval mode (the dropout layers are then the identity), use "
               "torch.compile or torch.export, which keep the draws, or pass seed= to trace one seed on purpose")


def check_host_draw_allowed(device: torch.device | None) -> None:
    """Before a random draw on the host: ``TRACE_ERROR`` under ``torch.jit.trace`` (not under
    torch.onnx.export, which refuses seeded ops with its own error), and ``CAPTURE_ERROR`` when an op on
    ``device`` runs while a CUDA graph is being captured on the current stream. That stream is the
    current device's: ``torch.cuda.graph`` makes the capturing device current."""
    if torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
        raise RuntimeError(TRACE_ERROR)
    # Asked only for CUDA tensors: the query needs the CUDA context, which a CPU op must not create.
    if device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(CAPTURE_ERROR)


def op_seed(seed, device: torch.device | None = None) -> int | torch.Tensor:
    """The signed int64 an op on ``device`` receives for ``seed``; None draws one.

    Under torch.compile and torch.func transforms (``_checks.values_are_traced``) a
    drawn seed stays the 0-d tensor of ``draw_seed_tensor``. The ops take it
    through their ``_drawn_seed`` variants, which read it on the host when they
    run (``robustdrop._backend.forward_table``); under ``vmap`` torch runs such
    an op once per vmapped call, each with its own seed. Drawing while a CUDA
    graph is captured on the current stream, or under torch.jit.trace, is an
    error (``check_host_draw_allowed``).
    """
    if seed is None:
        if _checks.values_are_traced():
            return draw_seed_tensor()
        check_host_draw_allowed(device)
        return draw_seed()
    if isinstance(seed, torch.SymInt):
        return seed
    seed = int(seed) % _TWO_64
    return seed - _TWO_64 if seed >= 1 << 63 else seed
