"""make ui, make dashboard and make serve: the link each prints, and a missing champion as one line."""

import re
import shutil
import subprocess

import mlflow
import optuna
import pytest
import torch
from mlflow import MlflowClient

from conftest import run_cli
from mnist_sweep import servers, tracking
from mnist_sweep.config import PROJECT_ROOT


def test_the_ui_link_opens_the_configured_experiments_runs(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    client.create_experiment("another")  # so that the id is not the first one by luck
    experiment_id = client.create_experiment("mnist_sweep")
    assert servers.runs_link(tracking_uri, "mnist_sweep", 5000) == (
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    assert servers.runs_link(tracking_uri, "not-there", 5000) is None


def test_make_ui_prints_the_link_then_starts_the_ui_on_localhost(tmp_path, monkeypatch, capsys):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    tracking_uri = f"sqlite:///{outputs}/mlflow.db?timeout=60"  # what paths.outputs makes of mlflow.tracking_uri
    started = []
    monkeypatch.setattr(servers.os, "execv", lambda path, argv: started.append(argv))

    assert servers.main(["ui", f"paths.outputs={outputs}"]) == 0
    assert capsys.readouterr().out == (
        "MLflow UI on http://127.0.0.1:5000: no experiment mnist_sweep yet (make run creates it; then reload)\n")
    experiment_id = MlflowClient(tracking_uri).create_experiment("mnist_sweep")
    assert servers.main(["ui", f"paths.outputs={outputs}", "port=5005"]) == 0
    link = f"http://127.0.0.1:5005/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    assert capsys.readouterr().out == f"MLflow UI, the mnist_sweep runs: {link}\n"
    for argv in started:  # the UI is started both times, on this machine only
        assert argv[1:4] == ["-m", "mlflow", "ui"]
        assert argv[argv.index("--backend-store-uri") + 1] == tracking_uri
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert [argv[argv.index("--port") + 1] for argv in started] == ["5000", "5005"]


def test_make_dashboard_serves_the_sweeps_study_storage_on_localhost(tmp_path, monkeypatch, capsys):
    import optuna_dashboard

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    storage = f"sqlite:///{outputs}/optuna.db?timeout=60"  # hydra.sweeper.storage, under paths.outputs
    served = []

    def run_server(storage, host, port):
        served.append((storage, host, port))

    monkeypatch.setattr(optuna_dashboard, "run_server", run_server)
    assert servers.main(["dashboard", f"paths.outputs={outputs}"]) == 0
    assert "no study mnist_sweep yet" in capsys.readouterr().out

    optuna.create_study(study_name="another", storage=storage)
    study = optuna.create_study(study_name="mnist_sweep", storage=storage)
    assert servers.main(["dashboard", f"paths.outputs={outputs}"]) == 0
    assert capsys.readouterr().out == (
        f"optuna-dashboard, study mnist_sweep: http://127.0.0.1:8080/dashboard/studies/{study._study_id}\n")
    assert served == [(storage, "127.0.0.1", 8080)] * 2


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


@pytest.mark.parametrize("command,option", [
    (("mnist_sweep.evaluate",), "model_uri"),
    (("mnist_sweep.predict", "images=whatever.png"), "model_uri"),
    (("mnist_sweep.servers", "model"), "MODEL"),
])
def test_with_no_champion_each_command_names_the_latest_run_in_one_line(store_without_champion, command, option):
    done = run_cli(*command, "model_uri=models:/mnist-cnn@champion",
                   f"mlflow.tracking_uri={store_without_champion.tracking_uri}")
    error = one_line_error(done)
    assert f"{option}=models:/mnist-cnn@champion: Registered Model with name=mnist-cnn not found" in error
    assert "make sweep" in error
    assert f"{option}=runs:/{store_without_champion.latest_run_id}/model, the latest run's model (newer-run)" in error


@pytest.mark.parametrize("command,option", [
    (("mnist_sweep.evaluate",), "model_uri"),
    (("mnist_sweep.predict", "images=whatever.png"), "model_uri"),
    (("mnist_sweep.servers", "model"), "MODEL"),
])
def test_a_trial_with_weights_only_is_one_line_that_says_how_to_get_its_model(weights_only_trial, command, option):
    run_id = weights_only_trial.run_id
    for uri in (run_id, f"runs:/{run_id}/model"):
        error = one_line_error(run_cli(*command, f"model_uri={uri}", f"mlflow.tracking_uri={weights_only_trial.tracking_uri}"))
        assert error.startswith(f"error: {option}=")
        assert f"run {run_id} (deep-sgd-lr0.05-bs64) logged its weights (runs:/{run_id}/weights) but no model" in error
        assert "mlflow.log_models=best" in error
        # the trial's own overrides, without its study identity: a single run that logs the model
        assert error.rstrip().endswith("Train it again as one run to get its model: python -m mnist_sweep model=deep "
                                       "optim.lr=0.05")


def test_a_run_without_a_model_says_it_ran_with_model_format_null(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.use_store(tracking_uri, "mnist_sweep", str(tmp_path / "mlartifacts"))
    params = {"mlflow.model_format": None, "mlflow.log_models": "best"}
    with tracking.run("no-model", params, {"hydra.overrides": "mlflow.model_format=null epochs=2"}) as active:
        tracking.log_outputs(torch.nn.Linear(1, 1), None, torch.zeros(2, 1), None)
    mlflow.set_tracking_uri(tracking_uri)
    with pytest.raises(tracking.ModelNotFound) as err:
        tracking.resolve_model(active.info.run_id)
    assert "no model: it ran with mlflow.model_format=null" in str(err.value)
    assert str(err.value).endswith("python -m mnist_sweep epochs=2")


def test_with_no_model_at_all_the_error_says_to_train_first(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.use_store(tracking_uri, "mnist_sweep", str(tmp_path / "mlartifacts"))
    with tracking.run("weights-only", {}, {}):  # mlflow.model_format=null logs no model
        pass
    mlflow.set_tracking_uri(tracking_uri)
    with pytest.raises(tracking.ModelNotFound) as err:
        tracking.resolve_model("models:/mnist-cnn@champion")
    assert "No run in this store has logged a model yet: train one (make run) or run a sweep (make sweep)" in str(
        err.value)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_serve_with_no_champion_is_one_line_not_a_traceback(store_without_champion):
    # -o: use the venv these tests run in, whatever the age of its install stamp
    done = subprocess.run(["make", "-s", "-o", ".venv/.installed", "serve",
                           f"ARGS=mlflow.tracking_uri={store_without_champion.tracking_uri}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    first, *rest = done.stderr.splitlines()
    assert first.startswith("error: MODEL=models:/mnist-cnn@champion: ") and "Traceback" not in done.stderr
    assert f"MODEL=runs:/{store_without_champion.latest_run_id}/model" in first
    # make's own last word; "make[1]:" when the tests themselves run under make (make test)
    assert all(re.match(r"make(\[\d+\])?: \*\*\*", line) for line in rest), done.stderr
