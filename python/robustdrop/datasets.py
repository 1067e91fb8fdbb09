"""Small image datasets for the robustness experiment, as tensors in memory.

Two sources, both returned as a ``Dataset`` of float32 images in [0, 1]:

* ``load_digits``: scikit-learn's handwritten digits (shipped inside
  scikit-learn, nothing to download): 1797 grey 8x8 images of the digits 0-9,
  pixel values 0..16 divided by 16, split with a fixed stratified split
  (360 test images, the rest for training).
* ``load_cifar10``: CIFAR-10 in its python pickle format: a directory holding
  ``test_batch`` and at least one of ``data_batch_1`` .. ``data_batch_5``,
  each a pickled dict with ``b"data"`` uint8 (n, 3072) (the 1024 red, then
  green, then blue values of each 32x32 image, row-major) and ``b"labels"``
  (n class indices in 0..9); pixel values 0..255 divided by 255.
"""
import dataclasses
import os
import pickle

import numpy as np
import torch

__all__ = ["Dataset", "load_digits", "load_cifar10", "CIFAR_TRAIN_FILES", "CIFAR_TEST_FILE"]

CIFAR_TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_SIDE = 32


@dataclasses.dataclass
class Dataset:
    """Images and labels of one train/test split.

    Attributes:
        name: a short description, e.g. "digits (sklearn)".
        train_x: (N_train, C, H, W) float32 in [0, 1]; train_y: (N_train,) int64.
        test_x: (N_test, C, H, W) float32 in [0, 1]; test_y: (N_test,) int64.
        num_classes: K, the labels are in 0..K-1.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def limited(self, limit: int | None) -> "Dataset":
        """The first ``limit`` images of each split (all of them for None): quick runs and tests."""
        if limit is None:
            return self
        return dataclasses.replace(self, train_x=self.train_x[:limit], train_y=self.train_y[:limit],
                                   test_x=self.test_x[:limit], test_y=self.test_y[:limit])


def load_digits(*, test_size: int = 360, seed: int = 0) -> Dataset:
    """scikit-learn's digits: train (1437, 1, 8, 8) and test (360, 1, 8, 8) by default.

    The split is stratified by class and fixed by ``seed`` (scikit-learn's
    ``train_test_split``), so every run and every method sees the same images.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("the digits dataset needs scikit-learn (pip install scikit-learn), "
                          "or pass --data with a CIFAR-10 folder") from None
    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32) / 16.0  # values 0..16 -> [0, 1]
    labels = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=test_size, stratify=labels,
                                                        random_state=seed)
    return Dataset("digits (sklearn, 8x8 grey)", torch.from_numpy(train_x).unsqueeze(1),
                   torch.from_numpy(train_y), torch.from_numpy(test_x).unsqueeze(1), torch.from_numpy(test_y), 10)


def load_cifar10(path: str) -> Dataset:
    """CIFAR-10 from its python pickle batches in directory ``path`` (see the module docstring).

    Loads every ``data_batch_k`` present (at least one) as the training set and
    ``test_batch`` as the test set: images (n, 3, 32, 32), labels (n,). The
    batches are pickles, which can run code when loaded: load only files you trust.

    Raises:
        ValueError naming ``--data`` when the directory, the batches or their
        contents are missing or malformed.
    """
    if not os.path.isdir(path):
        raise ValueError(f"--data {path!r} is not a directory (expected a CIFAR-10 python folder with "
                         f"data_batch_1..5 and test_batch)")
    present = [name for name in CIFAR_TRAIN_FILES if os.path.isfile(os.path.join(path, name))]
    if not present:
        raise ValueError(f"--data {path!r} holds none of {', '.join(CIFAR_TRAIN_FILES)} (CIFAR-10 python format)")
    if not os.path.isfile(os.path.join(path, CIFAR_TEST_FILE)):
        raise ValueError(f"--data {path!r} has no {CIFAR_TEST_FILE} file (CIFAR-10 python format)")
    parts = [_read_batch(os.path.join(path, name)) for name in present]
    train_x = torch.cat([images for images, _ in parts])
    train_y = torch.cat([labels for _, labels in parts])
    test_x, test_y = _read_batch(os.path.join(path, CIFAR_TEST_FILE))
    return Dataset(f"CIFAR-10 ({len(present)} of 5 training batches)", train_x, train_y, test_x, test_y, 10)


def _read_batch(file: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled CIFAR-10 batch -> images (n, 3, 32, 32) float32 in [0, 1], labels (n,) int64."""
    try:
        with open(file, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as error:
        raise ValueError(f"--data: cannot read {file!r} as a pickled CIFAR-10 batch ({error})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"--data: {file!r} must be a pickled dict with b'data' and b'labels', got {keys}")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIDE * CIFAR_SIDE:
        raise ValueError(f"--data: {file!r} b'data' must be uint8 (n, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(batch[b"labels"])
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"--data: {file!r} b'labels' must hold {data.shape[0]} integer labels (one per image), "
                         f"got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"--data: {file!r} labels must be in 0..9, got {labels.min()}..{labels.max()}")
    images = torch.from_numpy(data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).astype(np.float32) / 255.0)
    return images, torch.from_numpy(labels.astype(np.int64))
