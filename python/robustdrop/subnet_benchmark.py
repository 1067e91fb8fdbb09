"""Time the evaluation of EWS candidate subnets: one batched forward against sequential forwards.

EWS's controller update (Algorithm 1, lines 5-6) measures the accuracy of C
candidate subnets on the batch. ``GatedNetwork.evaluate`` does it in one
forward of the batch repeated C times with per-sample gates; the baseline is
one forward per subnet (``evaluate`` with one subnet, C times). Both run under
no_grad on robustdrop's CIFAR ResNet-18 (``--quick``: the small CNN) at width
0.7, random 32x32 images, with batch norms in eval mode (running statistics)
and in train mode (each copy normalised by its own batch statistics). The two
are timed alternately; ``same accuracies`` says whether both gave the same C
accuracies. A table on stdout, and a CSV and Markdown table in ``--out``.

Issue 6's target, judged after the table for every BN mode when the run is
its case (the CIFAR ResNet-18 with 8 subnets): batched at least 1.5x faster
than sequential.

On a CPU shared with other work, ``OMP_NUM_THREADS=1`` gives steadier times:
a descheduled OpenMP thread stalls every op, which penalises the many small
ops of sequential forwards far more than the few large batched ones.
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch

from robustdrop.benchmark import TARGET_HEADER, markdown_table, model_bench_settings, run_metadata, write_row_outputs

HELP = "time C candidate EWS subnets evaluated in one batched forward against C sequential forwards"

COLUMNS = ("model", "batch", "subnets", "width", "device", "bn_mode", "sequential_ms", "batched_ms", "speedup",
           "same_accuracies")

RESNET18 = "resnet18 (CIFAR)"
# Issue 6: 8 candidate subnets of the CIFAR ResNet-18, batched against sequential, at least 1.5x.
TARGET_ISSUE, TARGET_SUBNETS, TARGET_SPEEDUP = 6, 8, 1.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per batch N (default: 128 on cuda, 32 on cpu, 4 with --quick)")
    parser.add_argument("--subnets", type=int, default=8, help="candidate subnets C (default: 8)")
    parser.add_argument("--width", type=float, default=0.7, help="subnet width in (0, 1] (default: 0.7)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed evaluations per row (default: 20 on cuda, 3 on cpu, 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="the small CNN, a tiny batch, few repeats (tests)")
    parser.add_argument("--out", default="bench_out", metavar="DIR", help="where the CSV and Markdown go (default: bench_out/)")


def _timer(device: torch.device):
    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3, result

    return timed


def _row(model_name: str, bn_mode: str, args, device: torch.device, batch: int, repeats: int) -> dict:
    from robustdrop import models
    from robustdrop.ews import GatedNetwork

    torch.manual_seed(0)
    model = (models.SmallCNN() if args.quick else models.resnet18()).to(device)
    model.train(bn_mode == "train")
    gn = GatedNetwork(model, width=args.width)
    generator = torch.Generator().manual_seed(1)
    subnets = [gn.random_subnet(generator) for _ in range(args.subnets)]
    images = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)

    def sequential():
        return torch.cat([gn.evaluate(images, labels, subnet) for subnet in subnets])

    def batched():
        return gn.evaluate(images, labels, subnets)

    timed = _timer(device)
    times = {"sequential": [], "batched": []}
    results = {}
    for index in range(repeats + 1):  # the first round warms up: allocator, kernels, lazy buffers
        for name, fn in (("sequential", sequential), ("batched", batched))[::1 if index % 2 == 0 else -1]:
            milliseconds, results[name] = timed(fn)
            if index:
                times[name].append(milliseconds)
    sequential_ms, batched_ms = statistics.median(times["sequential"]), statistics.median(times["batched"])
    return {"model": model_name, "batch": batch, "subnets": args.subnets, "width": args.width, "device": device.type,
            "bn_mode": bn_mode, "sequential_ms": sequential_ms, "batched_ms": batched_ms,
            "speedup": sequential_ms / batched_ms,
            "same_accuracies": bool(torch.equal(results["sequential"], results["batched"]))}


def main(args: argparse.Namespace) -> int:

    settings = model_bench_settings(args)
    if settings is None:
        return 2
    device, batch, repeats = settings
    device_type = device.type
    if batch < 1 or repeats < 1 or args.subnets < 1:
        print("error: --batch, --repeats and --subnets must be >= 1", file=sys.stderr)
        return 2
    if not 0.0 < args.width <= 1.0:
        print(f"error: --width must be in (0, 1], got {args.width}", file=sys.stderr)
        return 2
    model_name = "SmallCNN" if args.quick else RESNET18
    meta = run_metadata(device)
    print(f"subnet-evaluation bench on {meta['device_name']}, torch {meta['torch_version']}, commit "
          f"{meta['git_commit']}, {model_name}, batch {batch}, {args.subnets} subnets of width {args.width}, "
          f"{repeats} repeats", flush=True)
    rows = [_row(model_name, bn_mode, args, device, batch, repeats) for bn_mode in ("eval", "train")]
    table = _format(rows)
    targets = target_cells(rows)
    if targets:
        table += "\n\n## The issues' targets measured in this run\n\n" + markdown_table(TARGET_HEADER, targets)
    else:
        table += (f"\n\nNo target applies: issue {TARGET_ISSUE}'s is {TARGET_SUBNETS} subnets of the {RESNET18} "
                  "(no --quick, --subnets 8).")
    print()
    print(table)
    write_row_outputs(os.path.join(args.out, f"subnets_{device_type}"), rows, COLUMNS, meta, table)
    return 0


def target_cells(rows) -> list[list[str]]:
    """Issue 6's target for each row of its case (TARGET_HEADER cells); none for other models or subnet counts.

    The target holds on any device: batched speedup (sequential ms / batched ms) >= 1.5.
    """
    cells = []
    for row in rows:
        if row["model"] != RESNET18 or row["subnets"] != TARGET_SUBNETS:
            continue
        case = (f"{row['subnets']} subnets of the {row['model']}, batch {row['batch']}, width {row['width']}, "
                f"bn {row['bn_mode']}, {row['device']}")
        speedup = row["speedup"]
        met = "not measured" if not math.isfinite(speedup) else "yes" if speedup >= TARGET_SPEEDUP else "NO"
        cells.append([str(TARGET_ISSUE), case, "batched",
                      f"speedup over {row['subnets']} sequential forwards >= {TARGET_SPEEDUP:g}", f"{speedup:.2f}", met])
    return cells


def _format(rows) -> str:
    header = ["model", "batch", "subnets", "bn mode", "sequential ms", "batched ms", "speedup", "same accuracies"]
    cell_rows = []
    for row in rows:
        cells = [row["model"], str(row["batch"]), f"{row['subnets']} (width {row['width']})", row["bn_mode"],
                 f"{row['sequential_ms']:.2f}", f"{row['batched_ms']:.2f}", f"{row['speedup']:.2f}x",
                 "yes" if row["same_accuracies"] else "no"]
        cell_rows.append(cells)
    return markdown_table(header, cell_rows)
