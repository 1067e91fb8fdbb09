"""``python -m robustdrop robustness``: train a small CNN once per method, then attack it.

For each method (none, standard dropout, DropBlock, Active DropBlock, CamDrop,
FDD-1D, FDD-2D, Random Mask, EWS) the experiment trains
``robustdrop.models.SmallCNN`` from the same seed on the same split and batch
order, then reports on the test set, with the model in eval mode: the clean
accuracy, the accuracy under FGSM and under PGD (L-inf, ``robustdrop.attacks``,
inputs clamped to [0, 1]), the ADP of each attack (Active DropBlock's Eq. 7,
``robustdrop.attacks.adp(clean, attacked)``, in percent) and the mean training
time per epoch. A table goes to stdout; a CSV (with device, torch version, git
commit and date), a Markdown copy and a PNG of grouped bars go to ``--out``.

Data. By default scikit-learn's handwritten digits (no download): 1797 grey
8x8 images scaled to [0, 1], a fixed stratified split of 1437 training and 360
test images (``robustdrop.datasets.load_digits``). The network sees them
bilinearly upsampled to 16x16 by an ``nn.Upsample`` in front of the CNN, so
its stage-2 maps are 8x8 (4x4 would leave no room for blocks); the attacks
work on the 8x8 images themselves, so eps is a budget on the data's own
pixels. ``--data DIR`` trains on CIFAR-10 in its python pickle format instead
(3x32x32, no upsampling).

Model and training. SmallCNN (conv-bn-relu stages of 32, 64, 128, 256
channels), each method's layer after stage 2, behind a per-channel
standardisation by the training set's mean and standard deviation (inside the
model, so the attacks see [0, 1] pixels); Adam, learning rate 2e-3 with
cosine decay to 0 over the run, batch 64, cross-entropy. The seed
(``--seed``, 0) is set with ``torch.manual_seed`` before each method's model
is built, and the batch order comes from its own generator with that seed.

Per-method choices (the stage-2 maps are 8x8 for digits, 16x16 for CIFAR):

================== ==============================================================
none               no dropout
dropout            ``torch.nn.Dropout(p=0.2)`` (element-wise) after stage 2
dropblock          ``DropBlock2d(p=0.2, block_size=3)`` after stage 2
active_dropblock   ``ActiveDropBlock2d(block_size=3)`` with the paper's ten drop
                   rates 0..0.225; trained with ``training.active_dropblock_step``
                   (sequential: ten forwards per batch, the largest loss kept)
camdrop            ``CamDrop2d(p=0.2, block_size=3, classifier=fc)`` after stage 2,
                   plain DropBlock for the first fifth of the steps (warm-up),
                   targets given with ``nn.cam_targets``
fdd1d              ``FeatureDensityDropout1d()`` (25 bins) on the pooled (N, 256)
                   features before fc
fdd2d              ``FeatureDensityDropout2d(dims=2)`` (5x5 grid) after stage 2
random_mask        ``apply_random_mask(ratio=0.5)`` on the shallow convs (layer1,
                   layer2), kept at test time
ews                the plain CNN trained with ``ews.EWSTrainer`` (width 0.7,
                   controller every 10 steps over 8 candidates, distillation
                   weight 1, no adversarial training: the paper's Eq. 2)
================== ==============================================================

Threads. The run uses one CPU thread by default (``--threads``; 0 keeps
torch's default). The CNN is small, so a batch's ops are too short to gain
from intra-op parallelism, and on a busy machine its threads wait for each
other: on a 2-core machine shared with other jobs the default run took 2.4
minutes with one thread, and 17 with two (under a heavier load).

Attacks (white-box, against the eval-mode model): FGSM and PGD with eps 0.1
on digits, 8/255 on CIFAR-10 (``--eps``); PGD steps of alpha = eps / 4,
``--pgd-steps`` (10) iterations from a random start (a generator seeded with
``--seed``).
"""
import argparse
import dataclasses
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from robustdrop._checks import check_positive_int, is_integral, real_number

HELP = "train a small CNN once per dropout method on digits (or CIFAR-10); report clean, FGSM and PGD accuracy"

METHODS = ("none", "dropout", "dropblock", "active_dropblock", "camdrop", "fdd1d", "fdd2d", "random_mask", "ews")

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 64
LEARNING_RATE = 2e-3
STAGE = 2
BLOCK_SIZE = 3
EVAL_BATCH_SIZE = 512
CAMDROP_WARMUP_FRACTION = 0.2
DEFAULT_EPS = {"digits": 0.1, "cifar10": 8 / 255}
SEED_RANGE = (-2**63, 2**64)  # what torch.manual_seed accepts


def valid_eps(eps: float) -> bool:
    """Finite and > 0: eps = 0 would make PGD's step eps / 4 zero, and attacks that move nothing
    measure nothing."""
    return 0.0 < eps < math.inf


# SmallCNN(method=..., **options) per method; "ews" builds the plain CNN.
MODEL_OPTIONS = {
    "none": ("none", {}),
    "dropout": ("dropout", {"p": 0.2}),
    "dropblock": ("dropblock", {"p": 0.2, "block_size": BLOCK_SIZE}),
    "active_dropblock": ("active_dropblock", {"block_size": BLOCK_SIZE}),
    "camdrop": ("camdrop", {"p": 0.2, "block_size": BLOCK_SIZE}),
    "fdd1d": ("fdd1d", {}),
    "fdd2d": ("fdd2d", {"dims": 2}),
    "random_mask": ("random_mask", {"ratio": 0.5}),
    "ews": ("ews", {}),
}

CSV_COLUMNS = ("method", "dataset", "device", "epochs", "batch_size", "seed", "clean_acc", "fgsm_acc", "pgd_acc",
               "adp_fgsm_pct", "adp_pgd_pct", "train_s_per_epoch", "eps", "pgd_alpha", "pgd_steps", "n_train",
               "n_test")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one run of the experiment uses (see the module docstring for the defaults' reasons).

    Attributes:
        epochs: passes over the training set per method, >= 1.
        batch_size: training batch, >= 1.
        seed: ``torch.manual_seed`` per method, the batch order and PGD's random start.
        eps: the L-inf budget of FGSM and PGD on inputs in [0, 1], > 0.
        pgd_steps: PGD iterations (step alpha = eps / 4).
        device: "cpu" or "cuda".
    """

    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    eps: float = 0.1
    pgd_steps: int = 10
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "pgd_steps"):
            check_positive_int(getattr(self, name), name)
        if not is_integral(self.seed) or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError(f"seed must be an int in [-2**63, 2**64) (torch.manual_seed's range), got {self.seed!r}")
        if not valid_eps(real_number(self.eps, "eps")):
            raise ValueError(f"eps must be finite and > 0, got {self.eps}")

    @property
    def pgd_alpha(self) -> float:
        return self.eps / 4


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on ``stream`` (stderr by default).

    On a terminal the line is redrawn in place after every batch; otherwise
    (a log file, a pipe, CI) only one line per finished epoch is written.
    """

    WIDTH = 24

    def __init__(self, stream=None) -> None:
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())

    def update(self, label: str, done: int, total: int, loss: float) -> None:
        """Batch ``done`` of ``total`` of the epoch ``label`` has finished with this loss."""
        if not self.live:
            return
        filled = self.WIDTH * done // max(total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\r\033[K{label} [{bar}] {done}/{total} loss {loss:.3f}")
        self.stream.flush()

    def epoch_done(self, label: str, loss: float, seconds: float) -> None:
        """The epoch ``label`` has finished: mean loss, wall time."""
        prefix = "\r\033[K" if self.live else ""
        self.stream.write(f"{prefix}{label} loss {loss:.3f} ({seconds:.1f} s)\n")
        self.stream.flush()


# --------------------------------------------------------------------------- model and training


class Standardize(nn.Module):
    """``(x - mean[c]) / std[c]`` per channel of x (N, C, H, W); mean and std (C,) are buffers.

    Put in front of the CNN so that the attacks still work on [0, 1] pixels,
    while the first convolution sees unit-scale inputs: raw digits have a
    variance near 0.14, and their conv1 outputs then start far below the
    running variance of 1 that batch norm starts from, so eval-mode accuracy
    would lag for the first few epochs.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_model(method: str, *, in_channels: int, num_classes: int, upsample: int, mean: torch.Tensor | None = None,
                std: torch.Tensor | None = None) -> nn.Sequential:
    """``nn.Sequential(Standardize(mean, std), [nn.Upsample], SmallCNN)`` with ``method``'s layer
    in the CNN (see the module docstring); the Upsample (bilinear, by ``upsample``) only when
    ``upsample`` > 1. mean and std (in_channels,) default to 0 and 1.
    Input (N, in_channels, H, W) in [0, 1] -> logits (N, num_classes)."""
    from robustdrop.models import SmallCNN

    model_method, options = MODEL_OPTIONS[method]
    cnn = SmallCNN(num_classes, in_channels=in_channels, method=model_method, stage=STAGE, **options)
    mean = torch.zeros(in_channels) if mean is None else mean
    std = torch.ones(in_channels) if std is None else std
    layers = [Standardize(mean, std)]
    if upsample > 1:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers, cnn)


def _set_camdrop_warmup(model: nn.Module, steps: int) -> None:
    from robustdrop.nn import CamDrop2d

    for module in model.modules():
        if isinstance(module, CamDrop2d):
            module.warmup_steps = steps


def _batches(count: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled split of range(count) into batches of batch_size (the last may be smaller)."""
    return list(torch.randperm(count, generator=generator).split(batch_size))


class _Trainer:
    """One training step per batch for one method: the plain step, or the method's own."""

    def __init__(self, method: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.method = method
        self.model = model
        self.optimizer = optimizer
        self.ews = None
        if method == "ews":
            from robustdrop.ews import EWSTrainer

            self.ews = EWSTrainer(model, optimizer)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Train on the batch x (N, C, H, W), y (N,); returns the loss that was minimised."""
        if self.ews is not None:
            return self.ews.step(x, y)["loss"]
        if self.method == "active_dropblock":
            from robustdrop.training import active_dropblock_step

            loss = active_dropblock_step(self.model, F.cross_entropy, x, y).loss
        elif self.method == "camdrop":
            from robustdrop.nn import cam_targets

            with cam_targets(self.model, y):
                loss = F.cross_entropy(self.model(x), y)
        else:
            loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: Settings,
          progress: Progress | None = None) -> list[float]:
    """Train ``model`` with ``method`` on x (N, C, H, W), y (N,) (on the model's device).

    Returns:
        The wall time of each epoch in seconds.
    """
    device = x.device
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(x) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    _set_camdrop_warmup(model, int(total_steps * CAMDROP_WARMUP_FRACTION))
    trainer = _Trainer(method, model, optimizer)
    model.train()
    seconds = []
    for epoch in range(settings.epochs):
        label = f"{method:<16} epoch {epoch + 1}/{settings.epochs}"
        batches = _batches(len(x), settings.batch_size, generator)
        _synchronize(device)
        start = time.perf_counter()
        losses = []
        for done, index in enumerate(batches, 1):
            index = index.to(device)
            losses.append(trainer.step(x[index], y[index]))
            schedule.step()
            if progress is not None:
                progress.update(label, done, len(batches), losses[-1])
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
        if progress is not None:
            progress.epoch_done(label, sum(losses) / len(losses), seconds[-1])
    return seconds


# --------------------------------------------------------------------------- evaluation


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: Settings) -> dict:
    """Clean, FGSM and PGD accuracy of the eval-mode model on x (N, C, H, W) in [0, 1], y (N,).

    Returns:
        dict of floats: clean_acc, fgsm_acc, pgd_acc (fractions in [0, 1]) and
        adp_fgsm_pct, adp_pgd_pct (percent; NaN when the clean accuracy is 0).
    """
    from robustdrop import attacks

    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(settings.seed)
    correct = {"clean": 0, "fgsm": 0, "pgd": 0}
    for images, labels in zip(x.split(EVAL_BATCH_SIZE), y.split(EVAL_BATCH_SIZE)):
        fgsm = attacks.fgsm(model, images, labels, eps=settings.eps, clamp=(0.0, 1.0))
        pgd = attacks.pgd(model, images, labels, eps=settings.eps, alpha=settings.pgd_alpha, steps=settings.pgd_steps,
                          clamp=(0.0, 1.0), generator=generator)
        with torch.no_grad():
            for name, inputs in (("clean", images), ("fgsm", fgsm), ("pgd", pgd)):
                correct[name] += int((model(inputs).argmax(1) == labels).sum())
    result = {f"{name}_acc": count / max(len(x), 1) for name, count in correct.items()}
    for name in ("fgsm", "pgd"):
        clean, attacked = result["clean_acc"], result[f"{name}_acc"]
        result[f"adp_{name}_pct"] = attacks.adp(clean, attacked) if clean > 0 else math.nan
    return result


def run_experiment(dataset, *, methods=METHODS, settings: Settings = Settings(), upsample: int = 1,
                   progress: Progress | None = None) -> list[dict]:
    """Train and evaluate each method on ``dataset`` (a ``robustdrop.datasets.Dataset``).

    Args:
        dataset: the images (N, C, H, W) in [0, 1] and labels.
        methods: names from ``METHODS``, run in the given order.
        settings: epochs, batch size, seed, attack budgets, device.
        upsample: the model's input upsampling factor (2 for the 8x8 digits).
        progress: where the progress bar goes, or None for none.

    Returns:
        One dict per method with ``CSV_COLUMNS``' keys (numbers as numbers).
    """
    methods = list(methods)
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be one or more of {', '.join(METHODS)}, got {methods}")
    device = torch.device(settings.device)
    train_x, train_y = dataset.train_x.to(device), dataset.train_y.to(device)
    test_x, test_y = dataset.test_x.to(device), dataset.test_y.to(device)
    mean, std = train_x.mean((0, 2, 3)), train_x.std((0, 2, 3)).clamp_min(1e-6)
    rows = []
    for method in methods:
        torch.manual_seed(settings.seed)
        model = build_model(method, in_channels=train_x.shape[1], num_classes=dataset.num_classes,
                            upsample=upsample, mean=mean, std=std).to(device)
        seconds = train(method, model, train_x, train_y, settings, progress)
        scores = evaluate(model, test_x, test_y, settings)
        rows.append({"method": method, "dataset": dataset.name, "device": device.type, "epochs": settings.epochs,
                     "batch_size": settings.batch_size, "seed": settings.seed, **scores,
                     "train_s_per_epoch": sum(seconds) / len(seconds), "eps": settings.eps,
                     "pgd_alpha": settings.pgd_alpha, "pgd_steps": settings.pgd_steps, "n_train": len(train_x),
                     "n_test": len(test_x)})
    return rows


# --------------------------------------------------------------------------- reporting


def _number(value: float, digits: int) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def table_header(settings: Settings) -> list[str]:
    budget = f"eps={settings.eps:.4g}"
    return ["method", "clean acc", f"FGSM acc ({budget})",
            f"PGD acc ({budget}, alpha={settings.pgd_alpha:.4g}, {settings.pgd_steps} steps)", "ADP FGSM %",
            "ADP PGD %", "train s/epoch"]


def format_table(rows: list[dict], settings: Settings) -> str:
    """The results as a Markdown table, budgets in the header."""
    from robustdrop.benchmark import markdown_table

    cells = [[row["method"], _number(row["clean_acc"], 3), _number(row["fgsm_acc"], 3), _number(row["pgd_acc"], 3),
              _number(row["adp_fgsm_pct"], 1), _number(row["adp_pgd_pct"], 1), _number(row["train_s_per_epoch"], 2)]
             for row in rows]
    return markdown_table(table_header(settings), cells)


def _csv_row(row: dict) -> dict:
    """Floats written with 6 significant digits (NaN as empty)."""
    return {key: (("" if not math.isfinite(value) else f"{value:.6g}") if isinstance(value, float) else value)
            for key, value in row.items()}


def write_plot(path: str, rows: list[dict], settings: Settings, meta: dict) -> str | None:
    """Grouped bars of clean / FGSM / PGD accuracy per method; None, or why no PNG was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG written"
    series = [("clean", "clean_acc"), (f"FGSM eps={settings.eps:.4g}", "fgsm_acc"),
              (f"PGD eps={settings.eps:.4g}, {settings.pgd_steps} steps", "pgd_acc")]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.9 * len(rows)), 4.2))
    for k, (label, key) in enumerate(series):
        positions = [i - 0.4 + width * (k + 0.5) for i in range(len(rows))]
        heights = [row[key] for row in rows]
        bars = ax.bar(positions, heights, width=width, label=label)
        ax.bar_label(bars, labels=[f"{h:.2f}" for h in heights], fontsize=6)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([row["method"] for row in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0.0, 1.08)
    ax.set_ylabel("test accuracy")
    dataset = rows[0]["dataset"] if rows else ""
    ax.set_title(f"robustdrop robustness: {dataset}, {rows[0]['epochs'] if rows else 0} epochs, "
                 f"{meta['device_name']} ({meta['git_commit']})", fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                        help=f"methods to train, in order (default: all of {', '.join(METHODS)})")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"training epochs per method (default: {DEFAULT_EPOCHS})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"training batch size (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="a CIFAR-10 python-format folder (data_batch_1..5, test_batch) to use instead of "
                             "scikit-learn's digits")
    parser.add_argument("--eps", type=float, default=None,
                        help="L-inf budget of FGSM and PGD on [0, 1] inputs "
                             "(default: 0.1 on digits, 8/255 on CIFAR-10)")
    parser.add_argument("--pgd-steps", type=int, default=10, help="PGD iterations, step eps/4 (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every method's run (default: 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads torch may use (default: 1: the small CNN gains nothing from intra-op "
                             "threads, which stall each other on a busy machine; 0: torch's default)")
    parser.add_argument("--out", default="robustness_out", metavar="DIR",
                        help="where the CSV, Markdown and PNG go (default: robustness_out/)")
    # Hidden: the first N images of each split only (quick runs, tests).
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    from robustdrop import datasets

    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda, but torch sees no CUDA GPU")
    for name in ("epochs", "batch_size", "pgd_steps", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return _error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.threads < 0:
        return _error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if not SEED_RANGE[0] <= args.seed < SEED_RANGE[1]:
        return _error(f"--seed must be in [-2**63, 2**64) (torch.manual_seed's range), got {args.seed}")
    if args.eps is not None and not valid_eps(args.eps):
        return _error(f"--eps must be finite and > 0, got {args.eps}")
    try:
        if args.data is None:
            dataset, key, upsample = datasets.load_digits(), "digits", 2
        else:
            dataset, key, upsample = datasets.load_cifar10(args.data), "cifar10", 1
    except (ValueError, ImportError) as error:
        return _error(str(error))
    dataset = dataset.limited(args.limit)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, dataset, key, upsample)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, dataset, key: str, upsample: int) -> int:
    """The experiment, the table, the CSV, Markdown and PNG, once the arguments are checked."""
    from robustdrop.benchmark import run_metadata, write_row_outputs

    settings = Settings(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                        eps=DEFAULT_EPS[key] if args.eps is None else args.eps, pgd_steps=args.pgd_steps,
                        device=args.device)
    device = torch.device(args.device)
    meta = run_metadata(device)
    print(f"robustness on {dataset.name}: {len(dataset.train_x)} train / {len(dataset.test_x)} test images, "
          f"{settings.epochs} epochs, {meta['device_name']}, torch {meta['torch_version']}, "
          f"commit {meta['git_commit']}", flush=True)
    rows = run_experiment(dataset, methods=args.method, settings=settings, upsample=upsample, progress=Progress())
    table = format_table(rows, settings)
    print()
    print(table)
    stem = os.path.join(args.out, f"robustness_{key}_{device.type}")
    write_row_outputs(stem, [_csv_row(row) for row in rows], CSV_COLUMNS, meta, table)
    problem = write_plot(stem + ".png", rows, settings, meta)
    print(f"note: {problem}" if problem else f"wrote {stem}.png")
    return 0
