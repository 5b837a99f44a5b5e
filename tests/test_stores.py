"""The stores' pieces that need no server: redaction, the stores config group, MLflow's bounded
retries and a run that outlives its tracking store."""

import logging

import mlflow
import pytest
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

from mnist_sweep import stores, tracking
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


def test_mlflow_http_retries_are_bounded(monkeypatch):
    monkeypatch.delenv(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, raising=False)
    monkeypatch.delenv(MLFLOW_HTTP_REQUEST_TIMEOUT.name, raising=False)
    cfg = compose([])
    tracking.bound_http(cfg.mlflow.http_retries, cfg.mlflow.http_timeout)
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2 and MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 8
    monkeypatch.delenv(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name)  # leave other tests MLflow's defaults
    monkeypatch.delenv(MLFLOW_HTTP_REQUEST_TIMEOUT.name)


def test_a_recorder_stops_recording_after_the_store_fails_and_says_what_failed():
    calls = []

    def log_epoch(epoch):
        calls.append(epoch)
        if epoch == 2:
            raise mlflow.exceptions.MlflowException("API request to http://u:pw@h/api failed: connection refused")

    record = tracking.Recorder()
    for epoch in (1, 2, 3, 4):
        record(log_epoch, epoch)
    assert calls == [1, 2]  # nothing tried after the failure: each would wait out its retries
    assert record.lost.startswith("log_epoch: ") and "connection refused" in record.lost and "pw" not in record.lost


def test_artifacts_go_where_the_store_says_unless_an_artifact_root_is_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.use_store(store, "served", None)  # stores=server: a tracking server picks mlflow-artifacts:
    served = mlflow.get_experiment_by_name("served")
    assert served.artifact_location == str(tmp_path / "mlruns" / served.experiment_id)  # the store's default
    tracking.use_store(store, "local", str(tmp_path / "arts"))  # stores=local: under outputs/
    assert mlflow.get_experiment_by_name("local").artifact_location == (tmp_path / "arts").as_uri()


def test_an_unreachable_store_is_one_line_naming_it_without_its_password(monkeypatch):
    monkeypatch.setenv(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, "0")
    with pytest.raises(stores.StoreError) as error:
        tracking.use_store("http://bob:hunter2@127.0.0.1:9", "x", None)  # port 9: nothing listens
    message = str(error.value)
    assert message.startswith("cannot use the MLflow store http://bob:***@127.0.0.1:9: ") and "\n" not in message
    assert "hunter2" not in message
