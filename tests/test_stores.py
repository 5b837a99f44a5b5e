"""The stores without a server: password redaction in any text and log line, the stores group, and
the lock that serialises what must not race on a store."""

import logging
import os
import subprocess
import sys
import time

import pytest

from mnist_sweep import stores
from mnist_sweep.config import PROJECT_ROOT
from mnist_sweep.stack import free_port
from mnist_sweep.config import compose


@pytest.mark.parametrize("text, redacted", [
    ("postgresql+psycopg://bob:s3cr-t_x@db:5432/optuna", "postgresql+psycopg://bob:***@db:5432/optuna"),
    ("http://alice:pw@127.0.0.1:5050", "http://alice:***@127.0.0.1:5050"),
    ("postgresql://db/optuna?user=bob&password=pw&sslmode=require",
     "postgresql://db/optuna?user=bob&password=***&sslmode=require"),
    ("overrides: [a=1, 'mlflow.tracking_uri=https://u:p@h/x', b=2]",
     "overrides: [a=1, 'mlflow.tracking_uri=https://u:***@h/x', b=2]"),
    ("sqlite:////work/outputs/optuna.db?timeout=60", "sqlite:////work/outputs/optuna.db?timeout=60"),
    ("http://127.0.0.1:5050", "http://127.0.0.1:5050"),  # no password, nothing to hide
])
def test_redact_hides_passwords_in_any_text(text, redacted):
    assert stores.redact(text) == redacted


def test_every_log_line_is_redacted(caplog):
    handler = logging.Handler()
    records = []
    handler.emit = records.append
    handler.addFilter(stores.Redact())
    logger = logging.getLogger("test_stores")
    logger.addHandler(handler)
    try:
        logger.warning("#0 : mlflow.tracking_uri=%s", "http://u:hunter2@host")
    finally:
        logger.removeHandler(handler)
    assert records[0].getMessage() == "#0 : mlflow.tracking_uri=http://u:***@host"


def test_stores_server_reads_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5050")
    monkeypatch.setenv("OPTUNA_STORAGE", "postgresql+psycopg://w@db.example:5433/optuna")
    cfg = compose(["stores=server"], with_hydra=True)
    assert cfg.mlflow.tracking_uri == "http://mlflow.example:5050"
    assert cfg.mlflow.artifact_root is None  # the server's artifact root
    assert cfg.hydra.sweeper.storage == "postgresql+psycopg://w@db.example:5433/optuna"
    local = compose([], with_hydra=True)
    assert local.hydra.sweeper.storage.startswith("sqlite:///") and local.mlflow.artifact_root.endswith("mlartifacts")


@pytest.mark.slow  # four processes
def test_unreachable_servers_are_one_line_errors_before_training(overrides, tmp_path):
    closed = free_port()
    cases = {
        "tracking server": (["stores=server"], {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed}",
                                                "OPTUNA_STORAGE": f"sqlite:///{tmp_path / 'optuna.db'}"}),
        "study database": (["-m", "stores=server"], {
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "OPTUNA_STORAGE": f"postgresql+psycopg://someone:hunter2@127.0.0.1:{closed}/optuna"}),
    }
    for what, (args, env) in cases.items():
        began = time.monotonic()
        flags, args = [a for a in args if a == "-m"], [a for a in args if a != "-m"]  # -m goes first
        done = subprocess.run([sys.executable, "-m", "mnist_sweep", *flags, *overrides, *args], cwd=PROJECT_ROOT,
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - began
        assert done.returncode == 1, (what, done.stderr[-2000:])
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: cannot ") and str(closed) in last, (what, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and "hunter2" not in done.stderr + done.stdout, what
        assert "epoch" not in done.stdout + done.stderr, what  # nothing trained
        assert took < 30, (what, took)


@pytest.mark.slow
def test_stores_server_without_its_environment_says_what_to_set(overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}
    for flags, variable in (([], "MLFLOW_TRACKING_URI"), (["-m"], "OPTUNA_STORAGE")):
        done = subprocess.run([sys.executable, "-m", "mnist_sweep", *flags, *overrides, "stores=server"],
                              cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith("error:") and variable in done.stderr
