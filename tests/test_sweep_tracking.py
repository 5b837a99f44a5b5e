"""A sweep in MLflow: the study's one parent run, its summary and champion, runs left by dead
workers; a plain grid's parent. In-process on embedded stores, and one grid as a user runs it."""

import mlflow
import optuna
import pytest
import requests
import torch
from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
from optuna.trial import TrialState

from conftest import run_cli
from mnist_sweep import stores, sweep_tracking, tracking
from mnist_sweep.model import ConvNet
from mnist_sweep.registry import CHAMPION, REGISTERED_MODEL
from mnist_sweep.stack import free_port
from mnist_sweep.trial import PARENT_ATTR, RUN_ID_ATTR, open_storage


@pytest.fixture
def stores_(tmp_path):
    """An embedded MLflow store and study database, and the study's MLflow side as a worker opens it."""
    uri, storage_url = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(storage_url), direction="maximize")
    tracker = sweep_tracking.MlflowStudy(uri, "sweep", str(tmp_path / "artifacts"), 0, 8, storage_url)
    tracker.open(study, created=True)
    return tracker, study, MlflowClient()


def trial_run(client: MlflowClient, study: optuna.Study, parent: str, acc: float | None, model: bool) -> str:
    """A trial with its child run, as a job leaves them: the run RUNNING until ``acc`` completes both."""
    trial = study.ask()
    if acc is None:  # its worker died mid-trial: nobody ends its run
        tags = {"mlflow.parentRunId": parent, tracking.STUDY_TAG: study.study_name,
                tracking.TRIAL_TAG: str(trial.number)}
        orphan = client.create_run(client.get_run(parent).info.experiment_id, tags=tags)
        trial.set_user_attr(RUN_ID_ATTR, orphan.info.run_id)
        return orphan.info.run_id
    tags = {tracking.TRIAL_TAG: str(trial.number), tracking.STUDY_TAG: study.study_name}
    with tracking.run(f"trial-{trial.number}", {}, tags, parent) as active:
        trial.set_user_attr(RUN_ID_ATTR, active.info.run_id)
        if model:
            tracking.log_outputs(ConvNet([4]), torch.zeros(2, 1, 28, 28), "pickle", "shallow-4")
        mlflow.log_metric("test_acc", acc)
    study.tell(trial, acc)
    return active.info.run_id


def test_one_parent_per_study_whichever_worker_asks(stores_):
    tracker, study, client = stores_
    assert study.user_attrs[PARENT_ATTR] == tracker.parent_id
    experiment = client.get_experiment_by_name("sweep").experiment_id
    assert sweep_tracking.study_parent(client, experiment, study, created=False) == tracker.parent_id
    parent = client.get_run(tracker.parent_id)
    assert parent.info.run_name == "s" and parent.info.status == "RUNNING"
    assert parent.data.tags[tracking.STUDY_TAG] == "s"


def test_closing_summarises_crowns_the_best_and_ends_the_parent_once_no_trial_runs(stores_, tmp_path):
    tracker, study, client = stores_
    trial_run(client, study, tracker.parent_id, 0.8, model=True)
    best = trial_run(client, study, tracker.parent_id, 0.9, model=True)
    running = study.ask()  # another worker's trial, still training
    tracker.close(study, str(tmp_path / "no-results.yaml"), interrupted=False)
    parent = client.get_run(tracker.parent_id)
    assert parent.info.status == "RUNNING"  # the last worker to end ends it
    assert parent.data.metrics["best_test_acc"] == 0.9 and parent.data.tags["best_run_id"] == best
    assert parent.data.tags["trials"] == "2 finished"
    assert client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).run_id == best
    assert "plots/optimization_history.png" in {a.path for a in client.list_artifacts(tracker.parent_id, "plots")}
    study.tell(running, 0.1)
    tracker.close(study, str(tmp_path / "no-results.yaml"), interrupted=True)
    assert client.get_run(tracker.parent_id).info.status == "KILLED"  # Ctrl-C ended the sweep


def test_told_no_plots_the_summary_has_all_but_the_plots(stores_, tmp_path):
    tracker, study, client = stores_
    tracker.plots = False  # as mlflow.study_plots=false builds it
    best = trial_run(client, study, tracker.parent_id, 0.9, model=True)
    tracker.close(study, str(tmp_path / "no-results.yaml"), interrupted=False)
    parent = client.get_run(tracker.parent_id)
    assert parent.data.tags["best_run_id"] == best and parent.info.status == "FINISHED"
    assert client.list_artifacts(tracker.parent_id, "plots") == []


def test_a_dead_workers_run_is_ended_failed_with_the_reason(stores_, tmp_path):
    tracker, study, client = stores_
    orphan = trial_run(client, study, tracker.parent_id, None, model=False)
    (trial,) = study.get_trials()
    study.tell(trial.number, state=TrialState.FAIL)  # what a live worker does to a trial without heartbeat
    tracker.close(study, str(tmp_path / "no-results.yaml"), interrupted=False)
    run = client.get_run(orphan)
    assert run.info.status == "FAILED" and "no heartbeat" in run.data.tags[sweep_tracking.FAILURE_TAG]
    assert client.get_run(tracker.parent_id).info.status == "FINISHED"  # no best run: no champion, no error


def test_a_run_its_job_could_not_end_is_ended_failed_and_the_champion_is_the_best_with_a_model(stores_, tmp_path):
    tracker, study, client = stores_
    with_model = trial_run(client, study, tracker.parent_id, 0.8, model=True)
    # the best trial: its job lost the tracking server after its metrics, before its model and its end
    trial = study.ask()
    tags = {"mlflow.parentRunId": tracker.parent_id, tracking.STUDY_TAG: study.study_name,
            tracking.TRIAL_TAG: str(trial.number)}
    cut_short = client.create_run(client.get_run(tracker.parent_id).info.experiment_id, tags=tags).info.run_id
    client.log_metric(cut_short, "test_acc", 0.9)
    trial.set_user_attr(RUN_ID_ATTR, cut_short)
    study.tell(trial, 0.9)
    tracker.close(study, str(tmp_path / "no-results.yaml"), interrupted=False)
    run = client.get_run(cut_short)
    assert run.info.status == "FAILED" and "its record is incomplete" in run.data.tags[sweep_tracking.FAILURE_TAG]
    assert client.get_run(tracker.parent_id).data.tags["best_run_id"] == cut_short  # the study's best, as it is
    assert client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).run_id == with_model  # the best with a model


def test_when_every_trial_diverged_nothing_is_crowned_and_the_parent_still_ends(stores_, tmp_path):
    tracker, study, client = stores_
    diverged = study.ask()  # what run.py records for a diverged run: 0.0 in the study, no test_acc in MLflow
    with tracking.run("diverged", {}, {tracking.TRIAL_TAG: str(diverged.number)}, tracker.parent_id) as active:
        diverged.set_user_attr(RUN_ID_ATTR, active.info.run_id)
    study.tell(diverged, 0.0)
    tracker.close(study, str(tmp_path / "no-results.yaml"), interrupted=False)
    parent = client.get_run(tracker.parent_id)
    assert parent.info.status == "FINISHED" and "best_run_id" not in parent.data.tags
    assert not client.search_registered_models()  # nothing worth registering


def test_a_store_that_stops_answering_stops_the_sweep_in_one_line(stores_, monkeypatch):
    tracker, study, client = stores_
    trial_run(client, study, tracker.parent_id, 0.5, model=False)
    monkeypatch.setenv(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, "0")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    tracker.tracking_uri = mlflow.get_tracking_uri()
    with pytest.raises(stores.StoreError, match="stopped answering .*the study keeps its 1 finished trials"):
        tracker.check(study)
    slept = []
    monkeypatch.setattr(stores.time, "sleep", slept.append)
    tracker.outage_s = 3600  # a restart of the server: the sweep waits for it before its next batch
    answers = iter([requests.ConnectionError("Connection refused")] * 3 + [None])

    def get_run(self, run_id):
        answer = next(answers)
        if answer is not None:
            raise answer

    monkeypatch.setattr(MlflowClient, "get_run", get_run)
    tracker.check(study)
    assert len(slept) == 3


def test_a_store_that_goes_away_while_the_sweep_closes_is_waited_for_then_stops_it_in_one_line(stores_, tmp_path,
                                                                                                 monkeypatch):
    """Found by a soak: the tracking server stopped between the close's first call and its last, and
    the worker ended with MLflow's raw error, the URI's password in it, and the parent RUNNING."""
    tracker, study, client = stores_
    trial_run(client, study, tracker.parent_id, 0.5, model=False)
    tracker.tracking_uri = "http://soak:secret@127.0.0.1:5050"  # a server's: it can come back (the calls stay local)
    slept = []
    monkeypatch.setattr(stores.time, "sleep", slept.append)
    ending, refusals = sweep_tracking.end_orphaned_runs, [requests.ConnectionError("Connection refused")] * 2

    def end_orphaned_runs(*args):
        if refusals:
            raise refusals.pop()
        ending(*args)

    monkeypatch.setattr(sweep_tracking, "end_orphaned_runs", end_orphaned_runs)
    tracker.outage_s = 3600
    tracker.close(study, str(tmp_path / "no-results.yaml"), interrupted=False)
    assert len(slept) == 2 and client.get_run(tracker.parent_id).info.status == "FINISHED"

    client.set_terminated(tracker.parent_id, "RUNNING")
    refusals.append(mlflow.exceptions.MlflowException(f"API request to {tracker.tracking_uri}/runs failed: refused"))
    tracker.outage_s = 0  # past its bound: one line, redacted, and the study's figures
    with pytest.raises(stores.StoreError, match="stopped answering .*the study keeps its 1 finished trials") as err:
        tracker.close(study, str(tmp_path / "no-results.yaml"), interrupted=False)
    assert "secret" not in str(err.value)


@pytest.mark.slow
def test_a_plain_grid_has_a_parent_run_of_its_own(overrides, tmp_path):
    done = run_cli("mnist_sweep", "-m", *overrides, "hydra/sweeper=basic", "model=shallow,deep", "optim.lr=0.01,0.1",
                   "mlflow.model_format=null", timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("mnist_sweep").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    grid = {(k.data.params["model"], k.data.params["optim.lr"]) for k in kids}
    assert grid == {("shallow", "0.01"), ("shallow", "0.1"), ("deep", "0.01"), ("deep", "0.1")}
    assert parent.info.run_name.startswith("sweep-") and parent.info.status == "FINISHED"
    assert parent.data.tags["best_run_id"] in {k.info.run_id for k in kids}


def test_a_summary_that_fails_still_ends_the_parent(stores_, tmp_path, monkeypatch):
    tracker, study, client = stores_
    trial_run(client, study, tracker.parent_id, 0.5, model=False)

    def broken(*args, **kwargs):
        raise RuntimeError("the plots could not be made")

    monkeypatch.setattr(sweep_tracking, "summarize", broken)
    with pytest.raises(RuntimeError, match="plots"):
        tracker.close(study, str(tmp_path / "no-results.yaml"), interrupted=True)
    assert client.get_run(tracker.parent_id).info.status == "KILLED"


def test_the_front_is_every_trial_no_other_beats_on_both_accuracy_and_cost():
    def point(number, acc, cost):
        return optuna.trial.FrozenTrial(number, TrialState.COMPLETE, None, None, None, {}, {}, {}, {}, {}, number,
                                        values=[acc, cost])

    trials = [point(0, 0.99, 300), point(1, 0.98, 100), point(2, 0.97, 200), point(3, 0.995, 900),
              point(4, 0.98, 150), point(5, 0.9, 10)]
    assert [t.number for t in sweep_tracking.pareto_front(trials)] == [3, 0, 1, 5]  # most accurate first
