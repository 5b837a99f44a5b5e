"""Recording runs in MLflow, without training: the store, bounded HTTP retries, a run that always
ends, a recorder that outlives its store."""

import errno
import uuid

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

from conftest import only_run, store
from mnist_sweep import stores, tracking
from mnist_sweep.config import compose


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


def test_a_recorder_does_not_outlive_a_full_disk():
    def log_epoch(epoch):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise mlflow.exceptions.MlflowException("database or disk is full") from err

    record = tracking.Recorder()
    with pytest.raises(mlflow.exceptions.MlflowException):  # nothing more can be written: the run stops
        record(log_epoch, 1)


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


def test_interrupted_run_ends_killed(tmp_path):
    store(tmp_path)
    tracking.use_store(mlflow.get_tracking_uri(), "mnist_sweep", str(tmp_path / "artifacts"))
    with pytest.raises(KeyboardInterrupt):
        with tracking.run("interrupted", {}, {}):
            raise KeyboardInterrupt
    assert only_run(MlflowClient()).info.status == "KILLED"


@pytest.mark.slow  # the real MLflow server (the local_stack fixture)
def test_a_tracking_server_keeps_artifacts_itself_whatever_artifact_root_says(local_stack, tmp_path, monkeypatch):
    """mlflow.tracking_uri=http://… with the default stores=local: the local artifact_root means
    nothing there, or every model would sit on the first worker's disk."""
    monkeypatch.chdir(tmp_path)
    name = f"artifacts-{uuid.uuid4().hex[:8]}"
    tracking.use_store(local_stack.tracking_uri, name, str(tmp_path / "mlartifacts"))
    assert mlflow.get_experiment_by_name(name).artifact_location.startswith("mlflow-artifacts:")
    assert not (tmp_path / "mlartifacts").exists()

    legacy = f"legacy-{uuid.uuid4().hex[:8]}"  # made by an earlier version: its artifacts on one disk
    MlflowClient(local_stack.tracking_uri).create_experiment(legacy, artifact_location=(tmp_path / "a").as_uri())
    with pytest.raises(stores.StoreError, match=f"experiment '{legacy}' on the tracking server .* name a new "
                                                "mlflow.experiment") as err:
        tracking.use_store(local_stack.tracking_uri, legacy, str(tmp_path / "mlartifacts"))
    assert "\n" not in str(err.value)
