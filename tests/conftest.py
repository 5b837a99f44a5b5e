"""Shared fixtures: a tiny MNIST-shaped data set the tests make, and overrides that keep every
run's state (MLflow store, Optuna study, Hydra dirs) inside the test's temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from mnist_sweep import data, registry, stack, tensors, tracking, train
from mnist_sweep.config import CONF_DIR, PROJECT_ROOT
from mnist_sweep.model import ConvNet


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


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


def store(tmp_path) -> MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    return MlflowClient()


def only_run(client: MlflowClient):
    (run,) = client.search_runs([client.get_experiment_by_name("mnist_sweep").experiment_id])
    return run


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module args…`` from the project root, as a user would type it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def logged_model(tiny_mnist, tmp_path_factory) -> SimpleNamespace:
    """A ConvNet([4, 8]) trained for a few steps (right on some digits only), logged as pt2 to an
    MLflow store of its own and registered as mnist-cnn@champion, as a sweep would."""
    root, md5 = tiny_mnist
    train_set, _ = tensors.load(data.prepare(root, md5, log=lambda line: None), torch.device("cpu"))
    torch.manual_seed(0)
    model = ConvNet([4, 8])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)  # about half right
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train.train_epoch(model, optimizer, constant, train_set, batch_size=32, seed=0)
    model.eval()

    store = tmp_path_factory.mktemp("mlflow")
    tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking.use_store(tracking_uri, "tiny", str(store / "mlartifacts"))
    with tracking.run("tiny-run", {}, {}) as active:
        tracking.log_outputs(model, None, train_set.images[:2], "pt2")
        mlflow.log_metric("test_acc", 0.5)  # what promote compares
    run = mlflow.get_run(active.info.run_id)
    registry.promote(MlflowClient(), run)
    return SimpleNamespace(model=model, tracking_uri=tracking_uri, run_id=run.info.run_id,
                           model_uri=run.data.tags[tracking.MODEL_URI_TAG])


@pytest.fixture(scope="session")
def weights_only_trial(tmp_path_factory) -> SimpleNamespace:
    """An MLflow store holding a sweep trial that logged its weights but no model, as
    mlflow.log_models=best leaves a trial that did not lead its study."""
    store = tmp_path_factory.mktemp("weights_only")
    tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking.use_store(tracking_uri, "mnist_sweep", str(store / "mlartifacts"))
    params = {"mlflow.model_format": "pt2", "mlflow.log_models": "best", "model": "deep"}
    tags = {"trial": "3", "hydra.overrides": "optuna.study=mnist_sweep optuna.trial=3 model=deep optim.lr=0.05"}
    with tracking.run("deep-sgd-lr0.05-bs64", params, tags) as active:
        tracking.log_outputs(ConvNet([4]), None, torch.zeros(2, 1, 28, 28), None)
    return SimpleNamespace(tracking_uri=tracking_uri, run_id=active.info.run_id)


@pytest.fixture(scope="session")
def store_without_champion(tmp_path_factory) -> SimpleNamespace:
    """An MLflow store where two runs logged a model and no sweep registered one: ``make run`` twice."""
    store = tmp_path_factory.mktemp("no_champion")
    tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking.use_store(tracking_uri, "mnist_sweep", str(store / "mlartifacts"))
    for name in ("older-run", "newer-run"):
        with tracking.run(name, {}, {}) as active:
            tracking.log_outputs(ConvNet([4]), None, torch.zeros(2, 1, 28, 28), "pickle")  # pickle: the fast one
    return SimpleNamespace(tracking_uri=tracking_uri, latest_run_id=active.info.run_id)


@pytest.fixture(scope="session")
def services() -> Iterator[stack.Stack]:
    """A real PostgreSQL and ``mlflow server`` on free loopback ports, their data in a temporary
    root, stopped at the end. Without PostgreSQL's programs: skipped, but failed under CI=true."""
    try:
        stack.postgres_bindir()
    except FileNotFoundError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{err} (CI runs the tests against real servers)")
        pytest.skip(str(err))
    # Not under pytest's tmp_path: as root, PostgreSQL runs as the user postgres, who cannot enter
    # /tmp/pytest-of-root (mode 700). 711: others may pass through to the data, not list or read.
    root = Path(tempfile.mkdtemp(prefix="mnist_sweep-services-"))
    root.chmod(0o711)
    try:
        yield stack.start(root, pg_port=stack.free_port(), mlflow_port=stack.free_port())
    finally:
        stack.stop(root)
        shutil.rmtree(root)
