"""Recording runs in MLflow, without training: the store, bounded HTTP retries, a run that always
ends, a recorder that outlives its store."""

import errno
import os
import uuid

import mlflow
import pytest
import requests
import torch
from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

from conftest import only_run, store
from mnist_sweep import costs, stack, stores, tracking
from mnist_sweep.config import compose
from mnist_sweep.model import ConvNet


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


class Server:
    """A fake tracking server for a :class:`tracking.Recorder`: a record function that lands while it
    is up and is refused while it is down, and its health check (``tracking.answers``)."""

    def __init__(self, monkeypatch):
        self.up, self.landed, self.tries = True, [], 0
        monkeypatch.setattr(tracking, "answers", lambda uri: self.up)

    def log(self, value, *rest):
        self.tries += 1
        if not self.up:
            raise requests.ConnectionError("Connection refused")
        self.landed.append((value, tracking.taken_at(), *rest))
        return f"id-{value}"


def test_while_the_server_is_away_records_wait_without_a_try_each_and_land_in_order_once_back(monkeypatch):
    server = Server(monkeypatch)
    monkeypatch.setattr(tracking, "PROBE_S", 0.0)  # a health check at every record
    record = tracking.Recorder("http://tracking:5050", outage_s=60)
    assert record(server.log, 1) == "id-1"
    server.up = False
    waiting = [record(server.log, 2), record(server.log, 3)]
    model_id = record(server.log, 4)
    record(server.log, "costs", model_id)  # a later record takes the result of one that waits
    assert server.tries == 2 and server.landed[1:] == []  # only the record that met the outage tried
    assert all(isinstance(each, tracking.Record) for each in [*waiting, model_id]) and record.lost is None
    server.up = True
    assert record(server.log, 5) == "id-5"
    assert [landed[0] for landed in server.landed] == [1, 2, 3, 4, "costs", 5] and server.tries == 7
    assert server.landed[4][2] == "id-4"
    times = [landed[1] for landed in server.landed]
    assert times == sorted(times) and times[1] == waiting[0].at  # each with the time it was taken, not sent


def test_the_runs_end_waits_for_the_server_up_to_outage_s_then_drops_the_records(monkeypatch):
    server = Server(monkeypatch)
    back = tracking.Recorder("http://tracking:5050", outage_s=30)
    server.up = False
    back(server.log, 1)
    checks = []
    monkeypatch.setattr(tracking, "answers", lambda uri: checks.append(uri) or len(checks) >= 3)
    server.up = True
    back.settle()  # the server answers at the third health check
    assert [landed[0] for landed in server.landed] == [1] and back.lost is None and len(checks) == 3

    monkeypatch.setattr(tracking, "answers", lambda uri: False)
    gone = tracking.Recorder("http://tracking:5050", outage_s=0.5)
    server.up, server.tries = False, 0
    gone(server.log, 2)
    gone(server.log, 3)
    gone.settle()
    assert gone.lost.startswith("log: ") and "Connection refused" in gone.lost and not gone.waiting
    assert gone(server.log, 4) is None and server.tries == 1  # only the first met the outage; nothing more is tried
    # no patience for an embedded store: no waiting brings a sqlite file back
    assert tracking.Recorder("sqlite:///mlflow.db", outage_s=60).outage_s == 0


def test_a_record_sent_again_after_its_answer_was_lost_lands_once_and_the_run_keeps_one_model(tmp_path, monkeypatch):
    """Against MLflow's own store: a metric whose first try landed, a model export cut short midway,
    and one whose last step (its tag) was lost, each sent again once the "server" answers."""
    store(tmp_path)
    tracking.use_store(mlflow.get_tracking_uri(), "mnist_sweep", str(tmp_path / "artifacts"))
    monkeypatch.setattr(tracking, "PROBE_S", 0.0)
    monkeypatch.setattr(tracking, "answers", lambda uri: True)
    record = tracking.Recorder("http://tracking:5050", outage_s=60)  # a server's patience, on a local store
    lose_answer = {"log_epoch", "log_model_artifacts", "set_tag"}

    def once_lost(name, call):
        def flaky(*args, **kwargs):
            if name == "log_model_artifacts" and name in lose_answer:  # cut short before it lands
                lose_answer.discard(name)
                raise requests.ConnectionError("Connection reset by peer")
            done = call(*args, **kwargs)
            if name in lose_answer and (name != "set_tag" or args[0] == tracking.MODEL_URI_TAG):
                lose_answer.discard(name)  # it landed, but its answer was lost
                raise requests.ConnectionError("Connection reset by peer")
            return done
        return flaky

    monkeypatch.setattr(tracking, "log_epoch", once_lost("log_epoch", tracking.log_epoch))
    monkeypatch.setattr(MlflowClient, "log_model_artifacts", once_lost("log_model_artifacts",
                                                                       MlflowClient.log_model_artifacts))
    monkeypatch.setattr(mlflow, "set_tag", once_lost("set_tag", mlflow.set_tag))
    with tracking.run("flaky", {}, {}, record=record) as active:
        for epoch in (1, 2):
            record(tracking.log_epoch, epoch, {"test_acc": epoch / 10})
        for _ in range(2):  # the first export is cut short, the second's tag lost: a third finds it whole
            model_id = record(tracking.log_outputs, ConvNet([4]), torch.zeros(2, 1, 28, 28), "pickle", "shallow-4")
        record(tracking.log_costs, {"param_count": 10.0}, model_id)
    client = MlflowClient()
    run = client.get_run(active.info.run_id)
    assert run.info.status == "FINISHED" and record.lost is None and not lose_answer
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test_acc")] == [(1, 0.1), (2, 0.2)]
    (model,) = client.search_logged_models([run.info.experiment_id])  # the half-made one deleted, no second
    assert run.data.tags[tracking.MODEL_URI_TAG] == f"models:/{model.model_id}" and model.status == "READY"
    assert len(client.get_metric_history(run.info.run_id, "param_count")) == 1


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


def test_logged_models_are_named_carry_their_scores_costs_and_params_and_sort_by_them(tmp_path):
    """What MLflow's Models tab lists: each candidate by name, its last scores and its costs."""
    store(tmp_path)
    tracking.use_store(mlflow.get_tracking_uri(), "mnist_sweep", str(tmp_path / "artifacts"))
    image = torch.full((1, 1, 28, 28), 128.0)
    for trial, widths, acc in ((1, [4], 0.9), (2, [8, 16], 0.95)):
        model = ConvNet(widths)
        with tracking.run(f"trial-{trial}", {"model.channels": str(widths)}, {}):
            tracking.log_epoch(1, {"test_acc": acc - 0.1, "test_loss": 0.5})
            tracking.log_epoch(2, {"test_acc": acc, "test_loss": 0.3})
            tracking.log_check(2, 0.1)  # a check's step counts checks: not the last epoch's score
            name = tracking.model_name("shallow", model.widths, "lr.study/2", trial)
            model_id = tracking.log_outputs(model, torch.zeros(2, 1, 28, 28), "pickle", name)
            tracking.log_costs(costs.measure(model, image), model_id)
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("mnist_sweep").experiment_id

    def names(key: str, ascending: bool) -> list[str]:
        found = client.search_logged_models([experiment_id], order_by=[{"field_name": f"metrics.{key}",
                                                                         "ascending": ascending}])
        return [model.name for model in found]

    small, large = "shallow-4-trial1-lr_study_2", "shallow-8-16-trial2-lr_study_2"  # no . or / in a model's name
    assert names("test_acc", ascending=False) == [large, small]
    assert names("param_count", ascending=True) == [small, large]
    for model in client.search_logged_models([experiment_id]):
        run = client.get_run(model.source_run_id)
        assert run.data.tags[tracking.MODEL_URI_TAG] == f"models:/{model.model_id}"
        linked = {metric.key: metric.value for metric in model.metrics}
        assert linked == {key: run.data.metrics[key] for key in ("test_acc", "test_loss", "param_count", "latency_ms",
                                                                 "latency_ms_iqr", "model_bytes")}
        assert linked["test_acc"] in (0.9, 0.95)  # the last epoch's
        assert model.params == run.data.params  # the run's config, as columns
        # the run's own history keeps one point per epoch: the model's scores are those very points
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")] == [1, 2]



@pytest.mark.slow  # the real tracking server, stopped while no other test uses it
def test_a_run_rides_out_a_real_restart_of_its_tracking_server(stack_alone, caplog):
    """The tracking server stopped mid-run: training's records wait without a try each, and land,
    in order and once, when the run ends after the server is back (its start takes 10-25 s here)."""
    tracking.bound_http(0, 8)
    name = f"restart-{uuid.uuid4().hex[:8]}"
    tracking.use_store(stack_alone.tracking_uri, name, None)
    record = tracking.Recorder(stack_alone.tracking_uri, outage_s=300)
    try:
        with tracking.run("restarted", {"epochs": 3}, {}, record=record) as active:
            record(tracking.log_epoch, 1, {"test_acc": 0.1})
            stack.stop_mlflow(stack_alone.root)
            for epoch in (2, 3):
                record(tracking.log_epoch, epoch, {"test_acc": epoch / 10})
            model_id = record(tracking.log_outputs, ConvNet([4]), torch.zeros(2, 1, 28, 28), "pickle", "shallow-4")
            record(tracking.log_costs, {"param_count": 10.0}, model_id)
            assert len(record.waiting) == 4  # all waiting: training went on
            stack.start(stack_alone.root, stack_alone.host, stack_alone.pg_port, stack_alone.mlflow_port)
    finally:
        stack.start(stack_alone.root, stack_alone.host, stack_alone.pg_port, stack_alone.mlflow_port)
        for variable in (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT):
            os.environ.pop(variable.name, None)  # leave other tests MLflow's defaults
    client = MlflowClient(stack_alone.tracking_uri)
    run = client.get_run(active.info.run_id)
    assert run.info.status == "FINISHED" and record.lost is None and "MLflow answers again" in caplog.text
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test_acc")] == [
        (1, 0.1), (2, 0.2), (3, 0.3)]
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert run.data.tags[tracking.MODEL_URI_TAG] == f"models:/{model.model_id}"
    assert run.data.metrics["param_count"] == 10.0 and {m.key for m in model.metrics} >= {"test_acc", "param_count"}


def test_mlflows_own_log_lines_are_redacted_too(capsys):
    """MLflow's loggers do not reach Hydra's redacting handlers: a warning of its system metrics
    monitor while the server is away quotes the store's URL."""
    import logging

    logging.getLogger("mlflow.system_metrics.system_metrics_monitor").warning(
        "Failed to get mlflow run: API request to http://soak:s3cret@127.0.0.1:5050/api/2.0/mlflow/runs/get failed.")
    assert "http://soak:***@127.0.0.1:5050" in capsys.readouterr().err


def test_an_outage_between_finding_the_experiment_and_choosing_it_is_ridden_out(monkeypatch):
    """Found by a soak: a worker found its experiment, then the tracking server stopped before
    MLflow's set_experiment asked for it again, and the worker ended with MLflow's raw error."""
    found = mlflow.entities.Experiment("7", "sweep", "mlflow-artifacts:/7", "active")
    monkeypatch.setattr(mlflow, "get_experiment_by_name", lambda name: found)
    refusals, chosen, slept = [requests.ConnectionError("Connection refused")] * 2, [], []

    def set_experiment(experiment_id):
        if refusals:
            raise refusals.pop()
        chosen.append(experiment_id)

    monkeypatch.setattr(mlflow, "set_experiment", set_experiment)
    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: None)  # this process's other tests keep theirs
    monkeypatch.setattr(stores.time, "sleep", slept.append)
    assert tracking.use_store("http://127.0.0.1:5050", "sweep", None, outage_s=3600) == "7"
    assert chosen == ["7"] and len(slept) == 2
