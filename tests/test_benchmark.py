"""Smoke test of ``python -m robustdrop bench --quick`` on CPU: it runs, and its CSV
and PNG are what the harness promises. Timing is never asserted (DESIGN.md 7)."""
import csv
import dataclasses
import importlib.util
import math
import os
import pkgutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import robustdrop
from conftest import run_cpu_command
from robustdrop import benchmark
from robustdrop.__main__ import main as cli
from robustdrop.benchmark import BenchConfig, CSV_COLUMNS, NAIVE, SPEED_OF_LIGHT


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, run_cpu_command(["bench", "--quick", "--device", "cpu", "--out", str(out)], out, timeout=120)


def _rows(out):
    with open(out / "bench_cpu.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_csv_columns_and_rows(bench_run):
    out, stdout = bench_run
    fieldnames, rows = _rows(out)
    assert tuple(fieldnames) == CSV_COLUMNS
    config = BenchConfig(torch.device("cpu"), torch.float32, quick=True)
    cases = [case for module in benchmark.op_modules().values() for case in module.cases(config)]
    assert cases, "no benchmark cases registered"
    expected = [NAIVE] + [f"robustdrop[{name}]" for name in benchmark.robustdrop_backends(config.device, False)[0]]
    assert "robustdrop[cpu]" in expected or not robustdrop.backends()["cpu"].available
    for case in cases:
        shape = "x".join(map(str, case.shape))
        case_rows = {row["impl"]: row for row in rows
                     if (row["op"], row["params"], row["shape"]) == (case.op, case.params, shape)}
        for impl in expected + [SPEED_OF_LIGHT]:
            assert impl in case_rows, f"{case.op} {case.params} {shape}: no row for {impl}"
        assert "robustdrop[reference]" not in case_rows  # the oracle only with --with-reference
        for impl, row in case_rows.items():
            if row["kind"] == "anchor" and row["status"].startswith("failed: "):
                continue  # an optional anchor may fail; the run must go on
            assert row["status"] == "ok", (impl, row["status"])
            for column in ("fwd_ms", "fwd_bwd_ms", "speedup_fwd_bwd", "x_mul_fwd_bwd", "fwd_gbps", "fwd_bwd_gbps",
                           "copy_fraction_fwd", "copy_fraction_fwd_bwd", "copy_gbps"):
                value = float(row[column])
                assert math.isfinite(value) and value > 0, (impl, column, row[column])
            # The bandwidths count the speed of light's bytes: 2 * x.nbytes forward, 4 * x.nbytes forward + backward.
            nbytes = math.prod(case.shape) * 4
            assert float(row["fwd_gbps"]) * float(row["fwd_ms"]) * 1e6 == pytest.approx(2 * nbytes, rel=1e-4)
            assert float(row["fwd_bwd_gbps"]) * float(row["fwd_bwd_ms"]) * 1e6 == pytest.approx(4 * nbytes, rel=1e-4)
            assert float(row["copy_fraction_fwd_bwd"]) * float(row["copy_gbps"]) == pytest.approx(
                float(row["fwd_bwd_gbps"]), rel=1e-4)
            assert int(row["saved_bytes"]) >= 0
            assert row["saved_full_size"] in ("True", "False")
            assert row["device"] == "cpu" and row["dtype"] == "float32" and row["device_name"] and row["date"]
        assert float(case_rows[NAIVE]["speedup_fwd_bwd"]) == 1.0
        assert float(case_rows[SPEED_OF_LIGHT]["x_mul_fwd_bwd"]) == 1.0
    assert "speedup vs naive" in stdout and "robustdrop[cpu]" in stdout
    assert "device-to-device copy" in stdout and "against the naive baseline and each anchor" in stdout


def test_anchor_ratios_divide_their_time_by_ours():
    def row(impl, kind, fwd_ms, fwd_bwd_ms, status="ok"):
        return benchmark.Row("op", "p=1", "2x3", "float32", "cpu", impl, kind, fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms,
                             x_mul_fwd=fwd_ms / 0.5, x_mul_fwd_bwd=fwd_bwd_ms / 1.0, status=status)

    rows = [row(NAIVE, "naive", 4.0, 8.0), row("robustdrop[cpu]", "robustdrop", 1.0, 2.0),
            row("timm", "anchor", 3.0, 3.0), row("broken", "anchor", math.nan, math.nan, status="failed: x"),
            row(SPEED_OF_LIGHT, "speed-of-light", 0.5, 1.0)]
    header, cells = benchmark.anchor_ratios(rows)
    assert header == ["op", "shape", "dtype", "robustdrop", "fwd+bwd ms", f"vs {NAIVE} (fwd / fwd+bwd)",
                      "vs timm (fwd / fwd+bwd)", "vs broken (fwd / fwd+bwd)", "x mul (fwd / fwd+bwd)"]
    assert cells == [["op p=1", "2x3", "float32", "robustdrop[cpu]", "2.000", "4.00x / 4.00x", "3.00x / 1.50x", "-",
                      "2.00 / 2.00"]]


def test_plot_written_when_matplotlib_is_there(bench_run):
    out, stdout = bench_run
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in stdout
        assert not (out / "bench_cpu.png").exists()
    else:
        png = out / "bench_cpu.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_op_has_benchmark_cases():
    """One benchmark module per op module (DESIGN.md 5), so ``bench`` covers every op."""
    from robustdrop import ops

    op_modules = sorted(info.name for info in pkgutil.iter_modules(ops.__path__) if not info.name.startswith("_"))
    assert benchmark.op_module_names() == op_modules


def test_saved_bytes_rule():
    x = torch.randn(4, 8, requires_grad=True)
    # x * x saves x twice: one storage, full size.
    assert benchmark.saved_for_backward(lambda t: t * t, x) == (x.numel() * 4, True)
    # A scalar multiply saves nothing.
    assert benchmark.saved_for_backward(lambda t: t * 2.0, x) == (0, False)


def test_a_failing_implementation_becomes_a_row():

    def broken(x):
        raise RuntimeError("no kernel\nsecond line")

    impl = benchmark.Impl("broken", "anchor", lambda: broken)
    timer = benchmark.Timer(torch.device("cpu"), repeats=1, warmup=0, budget_s=1.0)
    row = benchmark.Row("op", "", "2", "float32", "cpu", "broken", "anchor")
    x = torch.randn(2, requires_grad=True)
    row = benchmark.measure(impl, [x], [torch.ones(2)], timer, row)
    assert row.status == "failed: RuntimeError: no kernel"
    assert math.isnan(row.fwd_ms)


def test_timer_cuts_warm_up_and_repeats_of_slow_calls_to_its_budget():
    """A call slower than half the budget is warmed up once and timed 3 times (the least); a fast one
    gets every warm-up and every repeat."""
    calls = []

    def step(seconds):
        return lambda i: (calls.append(i), time.sleep(seconds))

    timer = benchmark.Timer(torch.device("cpu"), repeats=20, warmup=10, budget_s=0.05)
    assert timer(step(0.03)) >= 30.0
    assert calls == [0, 10, 11, 12]
    calls.clear()
    timer = benchmark.Timer(torch.device("cpu"), repeats=20, warmup=10, budget_s=10.0)
    timer(step(0.0))
    assert calls == list(range(30))


class FakeGpuClock:
    """A GPU's timeline in virtual milliseconds: the host enqueues work that the GPU runs in order, each
    item once the one before it is done and never before the host has enqueued it."""

    can_hide_host = True

    def __init__(self):
        self.host = self.gpu = 0.0

    def _enqueue(self, gpu_ms):
        self.gpu = max(self.gpu, self.host) + gpu_ms

    def launch(self, host_ms, gpu_ms):
        self.host += host_ms
        self._enqueue(gpu_ms)

    def host_ms(self):
        return self.host

    def sleep(self, milliseconds):
        self._enqueue(milliseconds)

    def record(self):
        self._enqueue(0.0)
        return self.gpu

    def elapsed_ms(self, start, end):
        return end - start

    def synchronize(self):
        self.host = max(self.host, self.gpu)


def test_device_only_time_hides_the_host_time_of_launches():
    """Three launches of 0.05 ms host time and 0.01 ms GPU time: timed per call in a loop on an idle GPU the
    call takes its host's 0.15 ms; device-only, the GPU's 0.03 ms. A call that waits for
    the GPU cannot run ahead and is timed as before. A CPU clock has no device-only time."""
    clock = FakeGpuClock()
    timer = benchmark.Timer(torch.device("cpu"), repeats=10, warmup=2, budget_s=60.0, clock=clock)

    def host_bound(i):
        for _ in range(3):
            clock.launch(0.05, 0.01)

    assert timer(host_bound) == pytest.approx(0.15)
    assert timer.device_only(host_bound) == (pytest.approx(0.03), False)

    def synchronising(i):
        clock.launch(0.05, 0.01)
        clock.synchronize()
        clock.launch(0.05, 0.01)

    assert timer.device_only(synchronising) == (pytest.approx(timer(synchronising)), True)
    assert timer(synchronising) == pytest.approx(0.11)
    cpu_time, cpu_waits = benchmark.Timer(torch.device("cpu"), repeats=1, warmup=0, budget_s=1.0).device_only(host_bound)
    assert math.isnan(cpu_time) and not cpu_waits


def test_cuda_clock_converts_milliseconds_to_the_gpu_clock_cycles_it_measured(monkeypatch):
    """CudaClock over a simulated GPU running at 1.5 GHz: the calibration finds 1.5e6 cycles per ms, so a
    sleep of 4 ms spins 6e6 cycles, and its events time it as 4 ms."""
    gpu = FakeGpuClock()
    cycles_per_ms = 1.5e6
    sleeps = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.time = gpu.record()

        def elapsed_time(self, end):
            return end.time - self.time

    def sleep(cycles):
        sleeps.append(cycles)
        gpu.sleep(cycles / cycles_per_ms)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", sleep)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: gpu.synchronize())
    clock = benchmark.CudaClock(torch.device("cuda"))
    start = clock.record()
    clock.sleep(4.0)
    end = clock.record()
    clock.synchronize()
    assert sleeps[-1] == 6_000_000 and len(sleeps) == 3  # two calibration sleeps, then the one asked for
    assert clock.elapsed_ms(start, end) == pytest.approx(4.0 + 2 * sleeps[0] / cycles_per_ms)  # calibration included
    begin = clock.record()
    clock.sleep(0.5)
    assert clock.elapsed_ms(begin, clock.record()) == pytest.approx(0.5) and len(sleeps) == 4  # calibrated once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_only_timing_runs_on_a_gpu():
    """The real CudaClock: a plausible calibration (0.1 to 10 GHz) and a finite, positive device-only time
    for a launch-bound step (no timing relation is asserted: the GPU may be shared with other tests)."""
    timer = benchmark.Timer(torch.device("cuda"), repeats=10, warmup=2, budget_s=5.0)
    x = torch.zeros(16, device="cuda")

    def step(i):
        for _ in range(20):
            x.add_(1.0)

    assert math.isfinite(timer(step))
    device_only, waits_for_gpu = timer.device_only(step)
    assert 1e5 < timer.clock._cycles_per_ms < 1e7
    assert math.isfinite(device_only) and device_only > 0 and not waits_for_gpu


def test_device_only_time_is_measured_for_robustdrop_and_the_speed_of_light_only():
    clock = FakeGpuClock()
    timer = benchmark.Timer(torch.device("cpu"), repeats=3, warmup=1, budget_s=60.0, clock=clock)
    x = torch.randn(4, requires_grad=True)

    def fn(t):
        clock.launch(0.05, 0.01)
        return t * 2.0

    for kind, measured in (("robustdrop", True), ("speed-of-light", True), ("naive", False), ("anchor", False)):
        row = benchmark.measure(benchmark.Impl("impl", kind, lambda: fn), [x], [torch.ones(4)], timer,
                                benchmark.Row("op", "", "4", "float32", "cuda", "impl", kind))
        assert row.status == "ok" and math.isfinite(row.fwd_bwd_ms)
        assert math.isfinite(row.fwd_bwd_device_ms) == measured, kind
        if measured:
            assert row.fwd_bwd_device_ms == pytest.approx(0.01) and row.fwd_bwd_waits_for_gpu is False

    def broken_sleep(milliseconds):
        raise RuntimeError("no sleep kernel")

    clock.sleep = broken_sleep  # a failing device-only timing leaves the row's plain times standing
    with pytest.warns(RuntimeWarning, match="impl: no device-only time .RuntimeError: no sleep kernel"):
        row = benchmark.measure(benchmark.Impl("impl", "robustdrop", lambda: fn), [x], [torch.ones(4)], timer,
                                benchmark.Row("op", "", "4", "float32", "cuda", "impl", "robustdrop"))
    assert row.status == "ok" and math.isfinite(row.fwd_bwd_ms) and math.isnan(row.fwd_bwd_device_ms)
    assert row.fwd_bwd_waits_for_gpu is None


def test_feature_density_batched_eigh_anchor_bins_as_the_reference():
    """The FDD anchor (one float32 eigh over the batch, Gram side when C < H*W) does the op's work: each channel in the reference's
    cell wherever the reference's coordinate is not within 1e-4 of a bin edge (float32 against float64
    PCA), the same counts on the samples without such channels, and whole channels kept or zeroed."""
    from robustdrop.benchmarks import feature_density as bench_fdd
    from robustdrop.reference import feature_density as reference

    generator = torch.Generator().manual_seed(5)
    maps = torch.randn(6, 3, 36, generator=generator)
    mixing = torch.randn(6, 20, 3, generator=generator) * torch.tensor([8.0, 4.0, 2.0])
    x = (mixing @ maps + 0.05 * torch.randn(6, 20, 36, generator=generator)).view(6, 20, 6, 6)
    wide = x.reshape(6, 20, 36).transpose(1, 2).reshape(6, 36, 4, 5)  # C > D: the covariance side
    for sample, dims, grids in ((x, 1, 25), (x, 2, 5), (x, 3, 3), (wide, 2, 5), (wide, 3, 3),
                                (torch.randn(6, 40, generator=generator), 1, 25)):
        cell, counts = bench_fdd.batched_feature_density(sample, dims, grids)
        cell_ref, counts_ref = reference.feature_density(sample, dims, grids)
        near_edge = reference.bin_edge_distance(reference.feature_coordinates(sample, dims), grids) <= 1e-4
        assert near_edge.double().mean().item() <= 0.02, dims
        assert torch.equal(cell[~near_edge], cell_ref[~near_edge]), dims
        clean = ~near_edge.any(1)
        assert clean.any() and torch.equal(counts[clean], counts_ref[clean]), dims
    y = bench_fdd.batched_eigh_dropout(x, 2)
    kept = (y == x).flatten(2).all(2)
    assert torch.equal(kept | (y == 0).flatten(2).all(2), torch.ones_like(kept)) and kept.any() and not kept.all()


def test_unknown_op_is_an_error():
    with pytest.raises(ValueError, match="unknown op"):
        benchmark.select_modules(["no_such_op"])
    assert set(benchmark.select_modules(["drop_block2d"])) == {"block_mask"}


def test_training_step_bench_runs(tmp_path):
    """``python -m robustdrop bench-steps --quick``: a DropBlock step and both ActDB modes, timed."""
    stdout = run_cpu_command(["bench-steps", "--quick", "--device", "cpu", "--repeats", "1", "--out", str(tmp_path)], tmp_path)
    with open(tmp_path / "steps_cpu.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows] == ["DropBlock2d (p=0.1)", "ActiveDropBlock2d sequential",
                                             "ActiveDropBlock2d batched"]
    for row in rows:
        assert math.isfinite(float(row["median_ms"])) and float(row["median_ms"]) > 0
    assert float(rows[0]["x_dropblock"]) == 1.0
    assert "ActiveDropBlock2d batched" in stdout


def _target_rows(device="cuda", dtype="float32", anchor_status="ok"):
    def row(impl, kind, fwd_ms, fwd_bwd_ms, full=False, status="ok"):
        return benchmark.Row("drop_block2d", "p=0.1 bs=7", "32x64x56x56", dtype, device, impl, kind, fwd_ms=fwd_ms,
                             fwd_bwd_ms=fwd_bwd_ms, speedup_fwd=10.0 / fwd_ms, speedup_fwd_bwd=20.0 / fwd_bwd_ms,
                             x_mul_fwd_bwd=fwd_bwd_ms / 1.0, saved_bytes=800 if not full else 6400,
                             saved_full_size=full, status=status)

    return [row(NAIVE, "naive", 10.0, 20.0, full=True), row("robustdrop[cuda]", "robustdrop", 1.0, 1.2),
            row("robustdrop[triton]", "robustdrop", 1.0, 1.5, full=True),
            row("anchor", "anchor", 4.0, 7.0, status=anchor_status), row(SPEED_OF_LIGHT, "speed-of-light", 0.5, 1.0)]


def test_targets_are_checked_on_each_robustdrop_row():
    targets = (benchmark.Target(2, "x_mul_fwd_bwd", device="cuda", at_most=1.3),
               benchmark.Target(2, "anchor_fwd_bwd", device="cuda", at_least=5.0, anchor="anchor"),
               benchmark.Target(2, "no_full_size_saved"),
               benchmark.Target(2, "speedup_fwd_bwd", device="cpu", at_least=8.0))
    case = benchmark.Case("drop_block2d", "p=0.1 bs=7", (32, 64, 56, 56), naive=lambda x: x,
                          robustdrop=lambda x, backend: x, targets=targets)
    cells = benchmark.target_cells(case, _target_rows())
    got = {(line[2], line[3]): (line[4], line[5]) for line in cells}
    assert all(len(line) == len(benchmark.TARGET_HEADER) and line[0] == "2" for line in cells)
    # 3 targets apply on cuda (the cpu one does not), each to both robustdrop rows.
    assert len(cells) == 6
    assert got[("robustdrop[cuda]", "fwd+bwd time over torch.mul(x, 2.0)'s <= 1.3")] == ("1.20", "yes")
    assert got[("robustdrop[triton]", "fwd+bwd time over torch.mul(x, 2.0)'s <= 1.3")] == ("1.50", "NO")
    assert got[("robustdrop[cuda]", "fwd+bwd speedup over anchor >= 5")] == ("5.83", "yes")
    assert got[("robustdrop[triton]", "fwd+bwd speedup over anchor >= 5")] == ("4.67", "NO")
    assert got[("robustdrop[cuda]", "no full-size tensor saved for backward")] == ("800 bytes", "yes")
    assert got[("robustdrop[triton]", "no full-size tensor saved for backward")] == ("6,400 bytes (full-size)", "NO")
    # An anchor that failed is not measured, never met; targets are for float32 runs only.
    failed = benchmark.target_cells(case, _target_rows(anchor_status="failed: ImportError"))
    assert {line[5] for line in failed if "anchor" in line[3]} == {"not measured"}
    assert benchmark.target_cells(case, _target_rows(dtype="bfloat16")) == []
    cpu = benchmark.target_cells(case, _target_rows(device="cpu"))
    assert {line[3] for line in cpu} == {"no full-size tensor saved for backward",
                                         "fwd+bwd speedup over the naive baseline >= 8"}
    markdown = benchmark.format_markdown(_target_rows(), {"device_name": "GPU", "git_commit": "abc", "date": "today",
                                                          "torch_version": "2", "copy_gbps": 1.0}, cells)
    assert "## The issues' targets measured in this run" in markdown and "| 2 | drop_block2d" in markdown


def test_the_reference_row_is_not_judged_against_the_targets():
    """--with-reference adds the reference backend's row: the correctness oracle, not a contender."""
    case = benchmark.Case("drop_block2d", "p=0.1 bs=7", (32, 64, 56, 56), naive=lambda x: x,
                          robustdrop=lambda x, backend: x,
                          targets=(benchmark.Target(2, "speedup_fwd_bwd", device="cuda", at_least=8.0),))
    rows = _target_rows()
    reference = dataclasses.replace(rows[1], impl="robustdrop[reference]", fwd_bwd_ms=25.0, speedup_fwd_bwd=0.8)
    assert benchmark.target_cells(case, rows + [reference]) == benchmark.target_cells(case, rows)
    assert [line[2] for line in benchmark.target_cells(case, rows)] == ["robustdrop[cuda]", "robustdrop[triton]"]


@pytest.mark.parametrize("command", [["bench", "--repeats", "0"], ["bench-steps", "--quick", "--batch", "0"],
                                     ["bench-steps", "--quick", "--repeats", "0"],
                                     ["bench-subnets", "--quick", "--batch", "0"]])
def test_zero_counts_are_refused_not_replaced_by_the_default(command, capsys):
    assert cli(command) == 2
    assert capsys.readouterr().err.startswith("error: --")


def test_device_only_times_are_judged_and_shown_only_when_measured():
    """The device-only bound is judged on x_mul_fwd_bwd_device (not measured where it is NaN), and the two
    device-only columns appear only when a row has a device-only time (GPU runs)."""
    rows = _target_rows()
    rows[1].fwd_bwd_device_ms, rows[1].x_mul_fwd_bwd_device = 0.9, 1.1
    case = benchmark.Case("drop_block2d", "p=0.1 bs=7", (32, 64, 56, 56), naive=lambda x: x,
                          robustdrop=lambda x, backend: x,
                          targets=(benchmark.Target(2, "x_mul_fwd_bwd_device", device="cuda", at_most=1.3),))
    cells = benchmark.target_cells(case, rows)
    assert [(line[2], line[4], line[5]) for line in cells] == [("robustdrop[cuda]", "1.10", "yes"),
                                                               ("robustdrop[triton]", "-", "not measured")]
    header, body = benchmark.table(rows)
    assert header == list(benchmark.TABLE_COLUMNS) and body[1][header.index("fwd+bwd device ms")] == "0.900"
    # A call that synchronises has its plain time as device-only time, and says so.
    rows[1].fwd_bwd_waits_for_gpu = True
    assert benchmark.table(rows)[1][1][header.index("fwd+bwd device ms")] == "0.900 (syncs)"
    assert benchmark.target_cells(case, rows)[0][4] == "1.10 (syncs)"
    header, body = benchmark.table(_target_rows())
    assert not set(benchmark.DEVICE_ONLY_COLUMNS) & set(header) and all(len(line) == len(header) for line in body)


def test_a_target_needs_one_bound_and_a_known_metric():
    for bad in (dict(metric="speedup", at_least=1.0), dict(metric="speedup_fwd"),
                dict(metric="speedup_fwd", at_least=1.0, at_most=2.0), dict(metric="anchor_fwd_bwd", at_least=1.0),
                dict(metric="speedup_fwd", at_least=1.0, anchor="timm")):
        with pytest.raises(ValueError, match="Target"):
            benchmark.Target(2, **bad)


def test_the_issues_target_cases_carry_their_targets():
    """Each op module's target case carries its targets (a CPU config builds every non-GPU case)."""
    config = BenchConfig(torch.device("cpu"), torch.float32, quick=False)
    issues = {}
    for module in benchmark.op_modules().values():
        for case in module.cases(config):
            for target in case.targets:
                issues.setdefault(target.issue, set()).add((case.op, case.shape))
    assert issues == {2: {("drop_block2d", (32, 64, 56, 56))}, 3: {("cam_drop2d", (32, 256, 14, 14))},
                      4: {("feature_density_dropout", (64, 512, 4, 4)), ("feature_density_dropout", (64, 128, 16, 16))},
                      6: {("kl_distill", (256, 1000))}}


def test_gpu_check_script_parses_and_names_its_stages(tmp_path):
    """benchmarks/gpu_check.sh runs only on a GPU machine; here: its syntax, and an unknown stage is
    refused with the list of stages (and recorded as failed) without running anything else."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    result = subprocess.run(["bash", str(script), "no-such-stage"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, GPU_CHECK_OUT=str(tmp_path)))
    assert result.returncode != 0
    assert "unknown stage 'no-such-stage'" in result.stderr
    stages = ("info", "build", "verify", "test", "sanitize", "bench-fp32", "bench-bf16", "bench-models", "prebuild",
              "prebuild-test")
    for stage in stages:
        assert stage in result.stderr
    assert "| no-such-stage | FAILED" in (tmp_path / "summary.md").read_text()


def test_gpu_check_bench_models_runs_the_subnet_benchmark_first_and_both_always(tmp_path):
    """bench-models runs bench-subnets (issue 6's target) and then bench-steps even when the first fails;
    the stage fails with the failing one's status. A stand-in Python records its calls: the extension
    check passes, bench-subnets exits 3."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    calls = tmp_path / "calls.txt"
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\ncase "$*" in *bench-subnets*) exit 3 ;; esac\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(script), "bench-models"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, GPU_CHECK_OUT=str(out), PYTHON=str(python)))
    assert result.returncode != 0
    commands = [line.split()[2] for line in calls.read_text().splitlines() if line.startswith("-m robustdrop")]
    assert commands == ["bench-subnets", "bench-steps"]
    assert "| bench-models | FAILED (3)" in (out / "summary.md").read_text()


def test_gpu_check_skips_the_stages_its_time_budget_cannot_fit(tmp_path):
    """With less of GPU_CHECK_SECONDS left than a stage's minimum, the stage is skipped, recorded and
    fails the run, and results.md is still written."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    result = subprocess.run(["bash", str(script), "info", "bench-fp32"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, GPU_CHECK_OUT=str(tmp_path), GPU_CHECK_SECONDS="5"))
    assert result.returncode != 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| info | SKIPPED (no time left)" in summary and "| bench-fp32 | SKIPPED (no time left)" in summary
    assert "within 5s" in (tmp_path / "results.md").read_text()


def test_info_reports_the_backends_and_what_auto_runs(monkeypatch, capsys):
    """`python -m robustdrop info`: every backend with its availability, what backend="auto" runs on CPU
    tensors here, and a ROBUSTDROP_BACKEND override when one is set, a bad one with its error."""
    monkeypatch.delenv("ROBUSTDROP_BACKEND", raising=False)
    assert cli(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(any(line.startswith(f"  {name} ") for line in lines) for name in robustdrop.backends())
    expected = robustdrop._backend.resolve_backend("auto", torch.empty(0))
    assert f'backend="auto" on CPU tensors: {expected}' in lines
    assert not any("ROBUSTDROP_BACKEND" in line for line in lines)
    monkeypatch.setenv("ROBUSTDROP_BACKEND", "reference")
    assert cli(["info"]) == 0
    out = capsys.readouterr().out
    assert 'backend="auto" on CPU tensors: reference' in out and "ROBUSTDROP_BACKEND=reference is set" in out
    monkeypatch.setenv("ROBUSTDROP_BACKEND", "bogus")
    assert cli(["info"]) == 0
    assert "ROBUSTDROP_BACKEND must be one of" in capsys.readouterr().out
