"""Shared fixtures: a tiny MNIST-shaped data set the tests make, and overrides that keep every
run's state (MLflow store, Optuna study, Hydra dirs) inside the test's temporary directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_sweep import data
from mnist_sweep.config import PROJECT_ROOT


def make_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` learnable 28×28 uint8 images: class k is a bright 8×8 block at its own place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        row, col = divmod(int(label), 4)
        image[2 + 8 * row : 10 + 8 * row, 2 + 6 * col : 10 + 6 * col] = 230
    return images, labels


def write_tiny_mnist(root: Path, n_train: int = 320, n_test: int = 160) -> dict[str, str]:
    """The four raw IDX files under ``root``; returns their MD5s (the ``data.md5`` to pass)."""
    raw = data.raw_dir(root)
    (train_x, train_y), (test_x, test_y) = make_digits(n_train, 0), make_digits(n_test, 1)
    arrays = {
        "train-images-idx3-ubyte": train_x,
        "train-labels-idx1-ubyte": train_y,
        "t10k-images-idx3-ubyte": test_x,
        "t10k-labels-idx1-ubyte": test_y,
    }
    for name, array in arrays.items():
        data.write_idx(raw / name, array)
    return {name: data.md5sum(raw / name) for name in arrays}


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("tiny_mnist")
    return root, write_tiny_mnist(root)


@pytest.fixture
def overrides(tiny_mnist, tmp_path) -> list[str]:
    """Hydra overrides for a fast run on the tiny data, all state under ``tmp_path``."""
    root, md5 = tiny_mnist
    return [
        f"data.root={root}",
        *(f"data.md5.{name}={digest}" for name, digest in md5.items()),
        f"paths.outputs={tmp_path / 'outputs'}",
        "model.channels=[4,8]",
        "data.batch_size=32",
        "data.eval_batch_size=64",
        "device=cpu",
    ]


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module args…`` from the project root, as a user would type it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout
    )
