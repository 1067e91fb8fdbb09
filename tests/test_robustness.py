"""``python -m robustdrop robustness``: data loading, the experiment on tiny data, its outputs and its errors."""
import csv
import io
import math
import pickle
import re

import numpy as np
import pytest
import torch

from robustdrop import datasets, robustness
from robustdrop.__main__ import main as cli

META_COLUMNS = ("device_name", "torch_version", "git_commit", "date")


def write_cifar_batch(path, count: int, seed: int) -> None:
    """A CIFAR-10 python-format batch of ``count`` random images and labels."""
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
             b"labels": [int(label) for label in rng.integers(0, 10, count)]}
    with open(path, "wb") as handle:
        pickle.dump(batch, handle)


@pytest.fixture
def cifar_dir(tmp_path):
    """Two of the five training batches (32 images each) and a test batch of 32."""
    folder = tmp_path / "cifar"
    folder.mkdir()
    write_cifar_batch(folder / "data_batch_1", 32, 1)
    write_cifar_batch(folder / "data_batch_3", 32, 3)
    write_cifar_batch(folder / "test_batch", 32, 0)
    return folder


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def check_scores(row: dict) -> None:
    """Accuracies are fractions of the test images; ADP and the epoch time agree with them."""
    n_test = int(row["n_test"])
    exact = {}
    for key in ("clean_acc", "fgsm_acc", "pgd_acc"):
        value = float(row[key])
        assert 0.0 <= value <= 1.0, (row["method"], key, value)
        correct = round(value * n_test)
        assert abs(value * n_test - correct) < 1e-3, (row["method"], key, value)
        exact[key] = correct / n_test
    for attack in ("fgsm", "pgd"):
        if exact["clean_acc"] == 0.0:
            assert row[f"adp_{attack}_pct"] == ""
        else:
            expected = (exact["clean_acc"] - exact[f"{attack}_acc"]) / exact["clean_acc"] * 100
            assert float(row[f"adp_{attack}_pct"]) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    seconds = float(row["train_s_per_epoch"])
    assert math.isfinite(seconds) and seconds > 0


def test_cifar_folder_run_writes_table_csv_and_png(cifar_dir, tmp_path, capsys):
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    assert cli(["robustness", "--data", str(cifar_dir), "--epochs", "1", "--method", "none", "camdrop",
                "--batch-size", "32", "--pgd-steps", "2", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # --threads 1 (the default) held for the run only
    captured = capsys.readouterr()
    assert "64 train / 32 test images" in captured.out and "(1 threads)" in captured.out
    assert "| method | clean acc | FGSM acc (eps=0.03137) | PGD acc (eps=0.03137, alpha=0.007843, 2 steps) |" \
        in captured.out
    assert [line.split("|")[1].strip() for line in captured.out.splitlines()
            if line.startswith("| none") or line.startswith("| camdrop")] == ["none", "camdrop"]
    # stderr is not a terminal here: one progress line per epoch, no redrawn bar.
    assert [line.split()[0] for line in captured.err.splitlines() if "epoch 1/1" in line] == ["none", "camdrop"]
    assert "\r" not in captured.err

    rows = read_csv(out / "robustness_cifar10_cpu.csv")
    assert [row["method"] for row in rows] == ["none", "camdrop"]
    assert set(robustness.CSV_COLUMNS + META_COLUMNS) == set(rows[0])
    for row in rows:
        assert row["dataset"] == "CIFAR-10 (2 of 5 training batches)"
        assert (row["n_train"], row["n_test"], row["epochs"], row["device"]) == ("64", "32", "1", "cpu")
        assert float(row["eps"]) == pytest.approx(8 / 255, rel=1e-5)
        assert float(row["pgd_alpha"]) == pytest.approx(2 / 255, rel=1e-5)
        assert row["torch_version"] == torch.__version__ and row["git_commit"] and row["device_name"]
        check_scores(row)
    assert (out / "robustness_cifar10_cpu.md").read_text().count("| camdrop |") == 1
    assert (out / "robustness_cifar10_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_digits_run_covers_every_method(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    assert cli(["robustness", "--limit", "32", "--batch-size", "32", "--epochs", "1", "--pgd-steps", "2",
                "--out", str(out)]) == 0
    rows = read_csv(out / "robustness_digits_cpu.csv")
    assert [row["method"] for row in rows] == list(robustness.METHODS)
    assert len(robustness.METHODS) == 9
    for row in rows:
        assert (row["n_train"], row["n_test"]) == ("32", "32")
        assert float(row["eps"]) == pytest.approx(0.1)
        check_scores(row)
    table_rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [line.split("|")[1].strip() for line in table_rows] == list(robustness.METHODS)


def test_digits_are_scaled_and_split_as_documented():
    pytest.importorskip("sklearn")
    data = datasets.load_digits()
    assert data.train_x.shape == (1437, 1, 8, 8) and data.test_x.shape == (360, 1, 8, 8)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.train_x.min() == 0.0 and data.train_x.max() == 1.0
    # Values were 0..16: every pixel is a multiple of 1/16.
    assert torch.equal(data.test_x * 16, (data.test_x * 16).round())
    assert set(torch.bincount(data.test_y, minlength=10).tolist()) <= {35, 36, 37}  # stratified
    again = datasets.load_digits()
    assert torch.equal(again.test_x, data.test_x) and torch.equal(again.train_y, data.train_y)


def test_cifar_loader_reads_what_is_there(cifar_dir):
    data = datasets.load_cifar10(str(cifar_dir))
    assert data.train_x.shape == (64, 3, 32, 32) and data.test_x.shape == (32, 3, 32, 32)
    with open(cifar_dir / "data_batch_3", "rb") as handle:
        batch = pickle.load(handle)
    # Channel-major rows: the first 1024 values are the red plane of image 0.
    assert torch.equal(data.train_x[32, 0].flatten() * 255, torch.from_numpy(batch[b"data"][0, :1024]).float())
    assert data.train_y[32:].tolist() == batch[b"labels"]


@pytest.mark.parametrize("layout, message", [
    ("missing", "is not a directory"),
    ("no_train", "holds none of data_batch_1"),
    ("no_test", "has no test_batch"),
    ("not_a_pickle", "cannot read"),
    ("wrong_keys", "b'data' and b'labels'"),
    ("wrong_width", r"uint8 \(n, 3072\)"),
    ("wrong_labels", "one per image"),
])
def test_bad_data_is_a_clear_error_naming_data(tmp_path, capsys, layout, message):
    folder = tmp_path / "cifar"
    if layout != "missing":
        folder.mkdir()
        if layout != "no_train":
            write_cifar_batch(folder / "data_batch_1", 4, 1)
        if layout != "no_test":
            write_cifar_batch(folder / "test_batch", 4, 0)
        broken = {"not_a_pickle": b"not a pickle",
                  "wrong_keys": pickle.dumps({b"images": []}),
                  "wrong_width": pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}),
                  "wrong_labels": pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3})}
        if layout in broken:
            (folder / "test_batch").write_bytes(broken[layout])
    assert cli(["robustness", "--data", str(folder), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --data") and "Traceback" not in error
    assert re.search(message, error)
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["robustness", "--method", "none", "dropconnect"])
    assert exit_info.value.code == 2
    assert "argument --method: invalid choice: 'dropconnect'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="methods must be one or more of none, dropout"):
        robustness.run_experiment(None, methods=["dropconnect"])


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--batch-size", "-1"), ("--pgd-steps", "0"),
                                         ("--eps", "nan"), ("--eps", "0"), ("--threads", "-1"),
                                         ("--seed", str(2**64))])
def test_bad_numbers_are_clear_errors(capsys, flag, value):
    assert cli(["robustness", flag, value]) == 2
    assert capsys.readouterr().err.startswith(f"error: {flag} must be")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"eps": 0.0}, ValueError, r"eps must be finite and > 0, got 0.0"),  # PGD's step eps / 4 would be 0
    ({"eps": math.inf}, ValueError, "eps must be finite"),
    ({"epochs": 0}, ValueError, "epochs must be >= 1"),
    ({"pgd_steps": 2.5}, TypeError, "pgd_steps must be an int"),
    ({"seed": -2**63 - 1}, ValueError, r"seed must be an int in \[-2\*\*63, 2\*\*64\)"),
])
def test_bad_settings_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        robustness.Settings(**kwargs)


@pytest.mark.parametrize("method", robustness.METHODS)
def test_each_method_builds_the_documented_model(method):
    from robustdrop import nn as rdnn
    from torch import nn

    expected = {"none": None, "dropout": nn.Dropout, "dropblock": rdnn.DropBlock2d,
                "active_dropblock": rdnn.ActiveDropBlock2d, "camdrop": rdnn.CamDrop2d,
                "fdd1d": rdnn.FeatureDensityDropout1d, "fdd2d": rdnn.FeatureDensityDropout2d,
                "random_mask": rdnn.RandomMask2d, "ews": None}[method]
    model = robustness.build_model(method, in_channels=1, num_classes=10, upsample=2, mean=torch.tensor([0.25]),
                                   std=torch.tensor([0.5]))
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model[0](x), (x - 0.25) / 0.5)
    assert isinstance(model[1], nn.Upsample) and model[1].scale_factor == 2
    kinds = (nn.Dropout, rdnn.DropBlock2d, rdnn.ActiveDropBlock2d, rdnn.CamDrop2d, rdnn.FeatureDensityDropout1d,
             rdnn.FeatureDensityDropout2d, rdnn.RandomMask2d)
    found = {type(module) for module in model.modules() if isinstance(module, kinds)}
    assert found == (set() if expected is None else {expected})
    assert model.eval()(x).shape == (2, 10)


def test_progress_bar_redraws_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    bar = robustness.Progress(terminal)
    bar.update("none epoch 1/2", 1, 4, 2.0)
    bar.update("none epoch 1/2", 4, 4, 1.0)
    bar.epoch_done("none epoch 1/2", 1.5, 0.31)
    text = terminal.getvalue()
    assert text.count("\r") == 3 and text.endswith("none epoch 1/2 loss 1.500 (0.3 s)\n")
    assert "[" + "#" * 6 + "." * 18 + "] 1/4" in text and "[" + "#" * 24 + "] 4/4" in text

    log = io.StringIO()
    bar = robustness.Progress(log)
    for done in range(1, 5):
        bar.update("none epoch 1/2", done, 4, 1.0)
    bar.epoch_done("none epoch 1/2", 1.5, 0.31)
    assert log.getvalue() == "none epoch 1/2 loss 1.500 (0.3 s)\n"
