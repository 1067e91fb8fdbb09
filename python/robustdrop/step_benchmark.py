"""Time Active DropBlock's training step, sequential and batched, against a plain DropBlock step.

Each step is what a training loop runs per batch, without the optimizer
update: the forward(s), the loss and one backward. The model is robustdrop's
CIFAR ResNet-18 (``--quick``: the small CNN), with the drop layer after its
third stage, on random 32x32 images. ActDB evaluates the paper's ten drop-rate
policies; the ratio column divides each step's median time by the DropBlock
step's. A table on stdout, and a CSV and Markdown table in ``--out``.
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

from robustdrop.benchmark import markdown_table, model_bench_settings, run_metadata, write_row_outputs

HELP = "time Active DropBlock's training step (both modes) against a plain DropBlock step"

COLUMNS = ("model", "batch", "device", "step", "forwards", "median_ms", "x_dropblock")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default: 128 on cuda, 32 on cpu, 4 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per row (default: 20 on cuda, 3 on cpu, 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="the small CNN, a tiny batch, few repeats (tests)")
    parser.add_argument("--out", default="bench_out", metavar="DIR", help="where the CSV and Markdown go (default: bench_out/)")


def _steps(model_name: str):
    """(name, model builder, step function, forwards per step) for each row, DropBlock first."""
    from robustdrop import models
    from robustdrop.training import active_dropblock_step

    build = models.SmallCNN if model_name == "SmallCNN" else models.resnet18
    stage = 2 if model_name == "SmallCNN" else 3

    def plain_step(model, images, labels):
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()

    def active_step(mode):
        def step(model, images, labels):
            active_dropblock_step(model, nn.functional.cross_entropy, images, labels, mode=mode).loss.backward()
        return step

    return [
        ("DropBlock2d (p=0.1)", lambda: build(method="dropblock", stage=stage, p=0.1), plain_step, "1"),
        ("ActiveDropBlock2d sequential", lambda: build(method="active_dropblock", stage=stage),
         active_step("sequential"), "10 x N"),
        ("ActiveDropBlock2d batched", lambda: build(method="active_dropblock", stage=stage),
         active_step("batched"), "1 x 10N"),
    ]


def _median_ms(step, model, images, labels, device, repeats: int) -> float:
    def once():
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step(model, images, labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    once()  # warm-up: allocator, kernels, lazy buffers
    return statistics.median(once() for _ in range(repeats))


def main(args: argparse.Namespace) -> int:

    settings = model_bench_settings(args)
    if settings is None:
        return 2
    device, batch, repeats = settings
    device_type = device.type
    if batch < 1 or repeats < 1:
        print("error: --batch and --repeats must be >= 1", file=sys.stderr)
        return 2
    model_name = "SmallCNN" if args.quick else "resnet18 (CIFAR)"
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    meta = run_metadata(device)
    print(f"training-step bench on {meta['device_name']}, torch {meta['torch_version']}, commit {meta['git_commit']}, "
          f"{model_name}, batch {batch}, {repeats} repeats", flush=True)
    rows = []
    for name, build, step, forwards in _steps("SmallCNN" if args.quick else "resnet18"):
        torch.manual_seed(0)
        model = build().to(device).train()
        milliseconds = _median_ms(step, model, images, labels, device, repeats)
        rows.append({"model": model_name, "batch": batch, "device": device_type, "step": name, "forwards": forwards,
                     "median_ms": milliseconds})
    for row in rows:
        row["x_dropblock"] = row["median_ms"] / rows[0]["median_ms"]
    table = _format(rows)
    print()
    print(table)
    write_row_outputs(os.path.join(args.out, f"steps_{device_type}"), rows, COLUMNS, meta, table)
    return 0


def _format(rows) -> str:
    header = ["step", "model", "batch", "forwards", "median ms", "x DropBlock step"]
    cell_rows = []
    for row in rows:
        cells = [row["step"], row["model"], str(row["batch"]), row["forwards"], f"{row['median_ms']:.2f}",
                 f"{row['x_dropblock']:.2f}x"]
        cell_rows.append(cells)
    return markdown_table(header, cell_rows)
