"""The viewers: make ui and make dashboard print their link and serve on this machine only; make
serve answers over REST, and a missing champion is one line."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient

from conftest import make_digits
from mnist_sweep import viewers
from mnist_sweep.stack import free_port
from mnist_sweep.config import PROJECT_ROOT


def stop(server: subprocess.Popen) -> None:
    """End a server started in a session of its own, and all it started."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_the_ui_links_open_the_configured_experiments_runs_and_models(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    client.create_experiment("another")  # so that the id is not the first one by luck
    experiment_id = client.create_experiment("mnist_sweep")
    for tab in ("runs", "models"):
        assert viewers.experiment_link(tracking_uri, "mnist_sweep", 5000, tab) == (
            f"http://127.0.0.1:5000/#/experiments/{experiment_id}/{tab}?workflowType=machine_learning")
    assert viewers.experiment_link(tracking_uri, "not-there", 5000) is None


def test_make_ui_prints_the_links_then_starts_the_ui_on_localhost(tmp_path, monkeypatch, capsys):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    tracking_uri = f"sqlite:///{outputs}/mlflow.db?timeout=60"  # what paths.outputs makes of mlflow.tracking_uri
    started = []
    monkeypatch.setattr(viewers, "serve_ui", lambda uri, port: started.append((uri, port)))

    assert viewers.main(["ui", f"paths.outputs={outputs}"]) == 0
    assert capsys.readouterr().out == (
        "MLflow UI on http://127.0.0.1:5000: no experiment mnist_sweep yet (make run creates it; then reload)\n")
    experiment_id = MlflowClient(tracking_uri).create_experiment("mnist_sweep")
    assert viewers.main(["ui", f"paths.outputs={outputs}", "port=5005"]) == 0
    page = f"http://127.0.0.1:5005/#/experiments/{experiment_id}"
    assert capsys.readouterr().out == (
        f"MLflow UI, the mnist_sweep runs: {page}/runs?workflowType=machine_learning\n"
        f"  its models, side by side with their scores and costs: {page}/models?workflowType=machine_learning\n")
    assert started == [(tracking_uri, 5000), (tracking_uri, 5005)]  # the UI is started both times


def test_make_dashboard_serves_the_sweeps_study_storage_on_localhost(tmp_path, monkeypatch, capsys):
    import optuna_dashboard

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    storage = f"sqlite:///{outputs}/optuna.db?timeout=60"  # hydra.sweeper.storage, under paths.outputs
    served = []

    def run_server(storage, host, port):
        served.append((storage, host, port))

    monkeypatch.setattr(optuna_dashboard, "run_server", run_server)
    assert viewers.main(["dashboard", f"paths.outputs={outputs}"]) == 0
    assert "no study mnist_sweep yet" in capsys.readouterr().out

    optuna.create_study(study_name="another", storage=storage)
    study = optuna.create_study(study_name="mnist_sweep", storage=storage)
    assert viewers.main(["dashboard", f"paths.outputs={outputs}"]) == 0
    assert capsys.readouterr().out == (
        f"optuna-dashboard, study mnist_sweep: http://127.0.0.1:8080/dashboard/studies/{study._study_id}\n")
    assert served == [(storage, "127.0.0.1", 8080)] * 2


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


def wait_until_ready(server: subprocess.Popen, url: str, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    pytest.fail(f"no answer from {url} in {seconds} s:\n{log.read_text()}")


@pytest.mark.slow  # starts a real model server
def test_make_serve_answers_raw_pixels_over_rest_with_the_champion(logged_model, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "mnist_sweep.viewers", "model", "model_uri=models:/mnist-cnn@champion",
           f"port={port}", f"mlflow.tracking_uri={logged_model.tracking_uri}"]
    with log.open("w") as out:
        # a session of its own: uvicorn is the server's child, and both must stop at the end
        server = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_until_ready(server, f"http://127.0.0.1:{port}/ping", log, seconds=120)
        images, _ = make_digits(5, seed=4)  # uint8: the JSON holds integers 0-255, as a client sends them
        body = json.dumps({"inputs": images[:, None].tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.array(json.load(response)["predictions"])
    finally:
        stop(server)
    with torch.inference_mode():
        want = logged_model.model(torch.from_numpy(images).float().unsqueeze(1)).numpy()
    assert served.shape == (5, 10)
    np.testing.assert_allclose(served, want, rtol=1e-4, atol=1e-4)


def session_processes(sid: int) -> list[int]:
    """The processes of session ``sid`` (a process started with start_new_session leads its own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command's name, which may hold spaces
        except OSError:  # ended meanwhile
            continue
        if int(fields[3]) == sid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow  # starts the real MLflow UI
def test_make_ui_is_one_server_process_without_a_job_runner_serving_the_models(logged_model, tmp_path):
    port, log = free_port(), tmp_path / "ui.log"
    cmd = [sys.executable, "-m", "mnist_sweep.viewers", "ui", f"port={port}",
           f"mlflow.tracking_uri={logged_model.tracking_uri}", "mlflow.experiment=tiny"]
    with log.open("w") as out:
        server = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_until_ready(server, f"http://127.0.0.1:{port}/health", log, seconds=120)
        # MLflow's own launch: 15 processes (itself, 4 workers and their supervisor, a job runner and 8 consumers)
        assert session_processes(server.pid) == [server.pid], log.read_text()[-2000:]
        argv = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode().split("\0")
        assert argv[1:3] == ["-m", "uvicorn"] and argv[argv.index("--workers") + 1] == "1"
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        environ = Path(f"/proc/{server.pid}/environ").read_bytes().decode().split("\0")
        assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in environ
        # what the Models tab asks the server for: the experiment's logged models, by name
        experiment_id = MlflowClient(logged_model.tracking_uri).get_experiment_by_name("tiny").experiment_id
        request = urllib.request.Request(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/logged-models/search",
                                         json.dumps({"experiment_ids": [experiment_id]}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            models = json.load(response)["models"]
        # (the fixture's store is shared: another test may have logged a model of its own there)
        assert "shallow-4-8" in [model["info"]["name"] for model in models]
    finally:
        stop(server)
    assert "its models, side by side with their scores and costs: " in log.read_text()  # make ui's second link
