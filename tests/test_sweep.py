"""Subprocess sweeps on the tiny data: the study, the MLflow parent and children, parallel
workers, divergence and Ctrl-C. Slow (a few seconds a trial), and CI runs them."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from conftest import run_cli
from mnist_sweep.config import PROJECT_ROOT
from mnist_sweep.sweep import CHAMPION, REGISTERED_MODEL

pytestmark = pytest.mark.slow


def sweep(overrides: list[str], *args: str) -> subprocess.CompletedProcess:
    done = run_cli("mnist_sweep", "-m", *overrides, *args, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def study(tmp_path, name="mnist_sweep") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}")


def runs(tmp_path) -> tuple[MlflowClient, list, dict]:
    """The client, the parent runs, and each parent's children."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    client = MlflowClient()
    everything = client.search_runs([client.get_experiment_by_name("mnist_sweep").experiment_id])
    parents = [r for r in everything if "mlflow.parentRunId" not in r.data.tags]
    children = {p.info.run_id: [r for r in everything if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
                for p in parents}
    return client, parents, children


def test_sweep_records_study_parent_children_plots_and_champion_then_resumes(overrides, tmp_path):
    sweep(overrides, "hydra.sweeper.n_trials=3")
    trials = study(tmp_path).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3

    client, parents, children = runs(tmp_path)
    (parent,) = parents
    kids = children[parent.info.run_id]
    assert parent.info.run_name == "mnist_sweep" and parent.info.status == "FINISHED"
    assert len(kids) == 3 and {k.info.status for k in kids} == {"FINISHED"}
    assert sorted(k.data.tags["trial"] for k in kids) == ["0", "1", "2"]
    assert {r.data.tags["mlflow.source.name"] for r in [parent, *kids]} == {"python -m mnist_sweep -m"}
    assert all(sorted(i.dataset.name for i in k.inputs.dataset_inputs) == ["mnist-test", "mnist-train"] for k in kids)
    for kid in kids:  # each child's params are its trial's, as numbers the UI can sort
        trial = trials[int(kid.data.tags["trial"])]
        assert float(kid.data.params["optim.lr"]) == pytest.approx(trial.params["optim.lr"])
        # data.batch_size=32 is fixed by the overrides: Optuna keeps fixed values as user attributes
        assert kid.data.params["data.batch_size"] == trial.user_attrs["data.batch_size"] == "32"
        assert kid.data.params["model"] == trial.params["model"]
        assert kid.data.metrics["test_acc"] == pytest.approx(trial.value)

    best = max(trials, key=lambda t: t.value)
    assert parent.data.metrics["best_test_acc"] == pytest.approx(best.value)
    best_kid = client.get_run(parent.data.tags["best_run_id"])
    assert best_kid.data.tags["trial"] == str(best.number)
    assert parent.data.params["best.model"] == best.params["model"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "optimization_results.yaml" in artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {f"plots/{p}.png" for p in ("optimization_history", "param_importances", "parallel_coordinate")}
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    assert champion.run_id == best_kid.info.run_id

    sweep(overrides, "hydra.sweeper.n_trials=2")  # same study name: continues it
    trials = study(tmp_path).get_trials()
    assert len(trials) == 5 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    first_points = [t.params for t in trials[:2]]
    assert all(t.params not in first_points for t in trials[3:])  # not a replay of the first trials
    _, parents, children = runs(tmp_path)
    assert len(parents) == 2
    newest = max(parents, key=lambda p: p.info.start_time)
    assert sorted(k.data.tags["trial"] for k in children[newest.info.run_id]) == ["3", "4"]


def test_a_diverging_trial_does_not_stop_the_sweep(overrides, tmp_path):
    sweep(overrides, "hydra.sweeper.n_trials=4", "optim.lr=choice(0.05, 1e8)")
    trials = study(tmp_path).get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials) and len(trials) == 4
    diverged = [t for t in trials if t.params["optim.lr"] == 1e8]
    assert diverged and all(t.value == 0.0 for t in diverged)
    _, (parent,), children = runs(tmp_path)
    statuses = sorted(k.info.status for k in children[parent.info.run_id])
    assert "FAILED" in statuses and "FINISHED" in statuses and parent.info.status == "FINISHED"


def test_a_sweep_where_every_trial_diverges_still_ends_cleanly(overrides, tmp_path):
    sweep(overrides, "hydra.sweeper.n_trials=2", "optim.lr=1e8")
    assert [t.value for t in study(tmp_path).get_trials()] == [0.0, 0.0]
    client, (parent,), _ = runs(tmp_path)
    assert parent.info.status == "FINISHED" and "best_run_id" not in parent.data.tags
    assert not client.search_registered_models()  # nothing worth registering


def test_two_joblib_workers_record_every_trial_in_both_stores(overrides, tmp_path):
    sweep(overrides, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
          "hydra.sweeper.n_trials=4")
    trials = study(tmp_path).get_trials()
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    _, (parent,), children = runs(tmp_path)
    kids = children[parent.info.run_id]
    assert sorted(k.data.tags["trial"] for k in kids) == ["0", "1", "2", "3"]
    assert {k.info.status for k in kids} == {"FINISHED"}
    # threads=0 (auto) splits the cores between the two workers
    assert {k.data.tags["torch.threads"] for k in kids} == {str(max(1, os.cpu_count() // 2))}


def test_basic_sweeper_runs_a_plain_grid(overrides, tmp_path):
    sweep(overrides, "hydra/sweeper=basic", "model=shallow,deep", "optim.lr=0.01,0.1")
    _, (parent,), children = runs(tmp_path)
    grid = {(k.data.params["model"], k.data.params["optim.lr"]) for k in children[parent.info.run_id]}
    assert grid == {("shallow", "0.01"), ("shallow", "0.1"), ("deep", "0.01"), ("deep", "0.1")}
    assert parent.info.run_name.startswith("sweep-") and parent.info.status == "FINISHED"


def test_ctrl_c_ends_the_sweep_cleanly(overrides, tmp_path):
    args = [sys.executable, "-m", "mnist_sweep", "-m", *overrides, "hydra.sweeper.n_trials=20", "epochs=20"]
    proc = subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until one trial is done and the next is running
            time.sleep(1)
            if not (tmp_path / "outputs" / "optuna.db").exists():
                continue
            try:
                done = study(tmp_path).get_trials(states=[optuna.trial.TrialState.COMPLETE])
            except KeyError:  # the study is not created yet
                continue
            if done:
                break
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    trials = study(tmp_path).get_trials()
    states = {t.state for t in trials}
    assert optuna.trial.TrialState.COMPLETE in states and optuna.trial.TrialState.RUNNING not in states
    _, (parent,), children = runs(tmp_path)
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in {k.info.status for k in children[parent.info.run_id]}
