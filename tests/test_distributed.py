"""Distributed data-parallel training with robustdrop's layers, and how seeds behave across ranks.

One run of 2 processes (torch.distributed, gloo, CPU) does all the distributed
work for the tests of this file (a module-scoped fixture); each test then reads
its part of what the ranks recorded.

Training: the CIFAR ResNet-18 (``robustdrop.models.resnet18``, 16x16 inputs,
batch 4 per rank, each rank its own shard of data) with DropBlock, CamDrop or
FDD after stage 3, and the plain ResNet-18 trained by EWS (``EWSTrainer`` on the
DDP-wrapped model, also with FGSM examples: the paper's adversarial variant),
under ``DistributedDataParallel`` for 3 SGD steps; the
replicas' parameters must stay identical, bit for bit (DDP averages the
gradients with one all-reduce whose result every rank receives, and every rank
then takes the same optimizer step).

Seeds across ranks (``robustdrop._seed``): an op called with ``seed=None``
draws its seed from torch's default CPU generator; on rank r > 0 of an
initialised process group the drawn seed s becomes ``s XOR rank_key(r)``
(SplitMix64's r-th output, 63 bits; rank 0 keeps s). So by default ranks
seeded alike with ``torch.manual_seed`` (the usual way to start replicas from
the same weights) draw different masks; ``set_rank_seeding("shared")`` makes
them draw identical masks, and an explicit ``seed=`` is the same on every rank
whatever the mode. The same holds inside ``torch.compile(fullgraph=True)``.
Random Mask's seed is architecture, so it is drawn without the rank key: the
same mask on every rank seeded alike.
"""
import contextlib
import datetime
import functools
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import robustdrop
from robustdrop import _seed
from robustdrop._seed import rank_key, set_rank_seeding

WORLD_SIZE = 2
STEPS = 3
TRAINED_METHODS = ("dropblock", "camdrop", "fdd", "ews", "ews_fgsm")
TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


# ---------------------------------------------------------------- the ranks' work


def _flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([parameter.detach().reshape(-1) for parameter in model.parameters()])


def _train(method: str, rank: int) -> dict:
    """STEPS steps of DDP training of resnet18 with ``method``; what the replicas' parameters did."""
    from robustdrop import models
    from robustdrop.ews import EWSTrainer
    from robustdrop.nn import cam_targets

    torch.manual_seed(0)  # the same initial weights and the same drawn seeds before the rank key
    ews = method.startswith("ews")
    model = models.resnet18(method="none" if ews else method)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    attack = functools.partial(robustdrop.attacks.fgsm, eps=8 / 255) if method == "ews_fgsm" else None
    trainer = EWSTrainer(ddp, optimizer, interval=2, candidates=2, attack=attack) if ews else None
    shard = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    initial = _flat_parameters(model)
    losses = []
    for _ in range(STEPS):
        x = torch.randn(4, 3, 16, 16, generator=shard)
        y = torch.randint(0, 10, (4,), generator=shard)
        if trainer is not None:
            losses.append(trainer.step(x, y)["loss"])
            continue
        with cam_targets(ddp, y) if method == "camdrop" else contextlib.nullcontext():
            loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = _flat_parameters(model)
    replicas = [torch.empty_like(final) for _ in range(WORLD_SIZE)]
    dist.all_gather(replicas, final)
    return {
        "identical": all(torch.equal(replica, replicas[0]) for replica in replicas),
        "max_difference": max((replica - replicas[0]).abs().max().item() for replica in replicas),
        "moved": (final - initial).abs().max().item(),
        "losses": losses,
    }


BACKEND = "cpu" if robustdrop.backends()["cpu"].available else "reference"


def _drop(x: torch.Tensor, seed=None) -> torch.Tensor:
    return robustdrop.drop_block2d(x, 0.3, 3, seed=seed, backend=BACKEND)


def _seeds(rank: int) -> dict:
    """Masks drawn on this rank under each seeding rule, with the seeds the rule says they come from."""
    x = torch.ones(2, 4, 8, 8)
    torch.manual_seed(7)
    plain = torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item()  # what draw_seed draws first after it
    out = {"rank": rank, "plain": plain}
    torch.manual_seed(7)
    out["default"] = _drop(x)
    out["default_expected"] = _drop(x, seed=plain ^ rank_key(rank))
    torch.manual_seed(7)
    out["explicit"] = _drop(x, seed=123)
    torch.manual_seed(7)
    features = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    out["fdd_default"] = robustdrop.nn.FeatureDensityDropout2d()(features)
    previous = set_rank_seeding("shared")
    try:
        torch.manual_seed(7)
        out["shared"] = _drop(x)
        out["shared_expected"] = _drop(x, seed=plain)
    finally:
        set_rank_seeding(previous)
    torch.manual_seed(7)
    out["random_mask"] = robustdrop.nn.RandomMask2d(0.5, shape=(4, 8, 8)).mask

    # Inside torch.compile(fullgraph=True): the rank is folded in while tracing; fallback_random makes the
    # compiled graph draw with eager's generator, so the drawn seed is eager's.
    compiled = torch.compile(_drop, fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(7)
        out["compiled_default"] = compiled(x)
        previous = set_rank_seeding("shared")
        try:
            torch.manual_seed(7)
            out["compiled_shared"] = compiled(x)  # the mode is guarded: this call recompiles
        finally:
            set_rank_seeding(previous)
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=120))
    try:
        started = time.perf_counter()
        results = {"seeds": _seeds(rank)}
        results["seeds_seconds"] = time.perf_counter() - started
        for method in TRAINED_METHODS:
            started = time.perf_counter()
            results[method] = _train(method, rank)
            results[method]["seconds"] = time.perf_counter() - started
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the WORLD_SIZE ranks recorded (one spawn of the processes for the whole file)."""
    directory = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(_worker, args=(str(directory / "init"), str(directory)), nprocs=WORLD_SIZE,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("method", TRAINED_METHODS)
def test_ddp_training_keeps_replicas_identical(ranks, method):
    results = [rank[method] for rank in ranks]
    assert results[0]["identical"], f"replicas differ by up to {results[0]['max_difference']}"
    assert results[0]["max_difference"] == 0.0
    for result in results:
        assert result["moved"] > 0.0  # the steps did train
        assert all(torch.isfinite(torch.tensor(result["losses"])))
    # Each rank trained on its own shard: identical parameters come from the synchronised gradients.
    assert results[0]["losses"] != results[1]["losses"]


# ---------------------------------------------------------------- seeds across ranks


def test_default_seeds_differ_across_ranks(ranks):
    seeds = [rank["seeds"] for rank in ranks]
    assert seeds[0]["plain"] == seeds[1]["plain"]  # ranks seeded alike draw the same plain seed...
    assert not torch.equal(seeds[0]["default"], seeds[1]["default"])  # ...but use different masks
    for rank in seeds:
        # rank r uses plain XOR rank_key(r); rank 0 keeps the plain seed
        assert torch.equal(rank["default"], rank["default_expected"])
    assert torch.equal(seeds[0]["default"], seeds[0]["shared_expected"])
    assert not torch.equal(seeds[0]["fdd_default"], seeds[1]["fdd_default"])


def test_shared_mode_and_explicit_seeds_agree_across_ranks(ranks):
    seeds = [rank["seeds"] for rank in ranks]
    assert torch.equal(seeds[0]["shared"], seeds[1]["shared"])
    assert torch.equal(seeds[1]["shared"], seeds[1]["shared_expected"])
    assert torch.equal(seeds[0]["explicit"], seeds[1]["explicit"])
    assert not torch.equal(seeds[0]["explicit"], seeds[0]["default"])


def test_random_mask_is_the_same_on_every_rank(ranks):
    masks = [rank["seeds"]["random_mask"] for rank in ranks]
    assert torch.equal(masks[0], masks[1])


def test_seeds_under_torch_compile_follow_the_rank(ranks):
    for rank in ranks:
        seeds = rank["seeds"]
        assert torch.equal(seeds["compiled_default"], seeds["default"])
        assert torch.equal(seeds["compiled_shared"], seeds["shared"])


# ---------------------------------------------------------------- the rank key, in one process


def test_rank_key():
    assert rank_key(0) == 0
    # SplitMix64's first output from state 0 is 0xE220A8397B1DCDAF; the key keeps its low 63 bits.
    assert rank_key(1) == 0x6220A8397B1DCDAF
    keys = {rank_key(rank) for rank in range(1 << 16)}
    assert len(keys) == 1 << 16 and all(0 <= key < 1 << 63 for key in keys)


def test_set_rank_seeding():
    assert _seed.rank_seeding() == "per_rank"
    with pytest.raises(ValueError, match="mode must be one of"):
        set_rank_seeding("per-rank")
    assert set_rank_seeding("shared") == "per_rank"
    try:
        assert _seed.rank_seeding() == "shared"
    finally:
        assert set_rank_seeding("per_rank") == "shared"


def test_single_process_draws_are_unchanged():
    """Without a process group the drawn seed is the generator's plain draw (rank 0's rule)."""
    assert not (dist.is_available() and dist.is_initialized())
    torch.manual_seed(11)
    expected = torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item()
    torch.manual_seed(11)
    assert _seed.draw_seed() == expected
