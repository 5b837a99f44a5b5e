"""Sweeps on real shared stores: a PostgreSQL study and an `mlflow server` on loopback (the
``services`` fixture starts both), as N machines would use them with ``stores=server``. Never
sqlite standing in: with CI=true a missing PostgreSQL fails these tests."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from mnist_sweep import tracking
from mnist_sweep.config import PROJECT_ROOT
from mnist_sweep.study import RUN_ID_ATTR
from mnist_sweep.sweep import CHAMPION, FAILURE_TAG, PARENT_ATTR, REGISTERED_MODEL, STUDY_TAG

pytestmark = pytest.mark.slow
FINISHED = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}


@pytest.fixture
def name() -> str:
    """A study and experiment of this test's own: the servers are shared by the whole session."""
    return f"t{uuid.uuid4().hex[:10]}"


def server_args(overrides: list[str], name: str) -> list[str]:
    """The test's overrides, on the shared stores: the study and experiment named ``name``."""
    return [*overrides, "stores=server", f"hydra.sweeper.study_name={name}", f"mlflow.experiment={name}"]


def start(args: list[str], env: dict[str, str], cwd: Path = PROJECT_ROOT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mnist_sweep", *args], cwd=cwd, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


def load_study(services, name: str) -> optuna.Study:
    os.environ["PGPASSFILE"] = str(services.pgpass)  # what libpq reads for the password
    return optuna.load_study(study_name=name, storage=services.optuna_storage)


def study_runs(services, name: str) -> tuple[MlflowClient, list, list]:
    """The tracking server's client, the study's parent runs and its children."""
    client = MlflowClient(services.tracking_uri)
    everything = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    parents = [r for r in everything if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, [r for r in everything if "mlflow.parentRunId" in r.data.tags]


def with_password(uri: str, user: str, password: str) -> str:
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest.split('@')[-1]}"


def test_two_workers_on_postgres_and_a_tracking_server(services, overrides, name, tmp_path):
    # The password in both URIs, as a careless user would put it: it must not leak into MLflow.
    # (This loopback MLflow server has no auth: it ignores the basic-auth credentials.)
    # The study's URI comes from the environment; the tracking URI is typed on the command line, so
    # it is in every job's overrides, config files and flattened params.
    env = {**services.env(), "OPTUNA_STORAGE": with_password(services.optuna_storage, "mnist_sweep", services.password)}
    typed = f"mlflow.tracking_uri={with_password(services.tracking_uri, 'alice', services.password)}"
    workers = [start(["-m", *server_args(overrides, name), typed, "hydra.sweeper.n_trials=3",
                      f"hydra.sweep.dir={tmp_path / f'w{i}'}"], env) for i in range(2)]
    outputs = [finish(proc) for proc in workers]
    assert all(services.password not in output for output in outputs)  # log lines are redacted

    trials = load_study(services, name).get_trials()
    assert len(trials) == 6 and {t.state for t in trials} <= FINISHED
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # no duplicate proposals

    client, (parent,), kids = study_runs(services, name)
    assert parent.info.run_name == name and parent.info.status == "FINISHED"
    assert load_study(services, name).user_attrs[PARENT_ATTR] == parent.info.run_id
    assert sorted(int(k.data.tags["trial"]) for k in kids) == list(range(6))
    assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parent.info.run_id}
    for kid in kids:
        trial = trials[int(kid.data.tags["trial"])]
        assert kid.data.tags[STUDY_TAG] == name and trial.user_attrs[RUN_ID_ATTR] == kid.info.run_id
        assert kid.info.artifact_uri.startswith("mlflow-artifacts:")  # through the server, not a local folder

    # The champion is a registered model any machine can load through the server
    best = max((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    best_run = client.get_run(best.user_attrs[RUN_ID_ATTR])
    assert parent.data.tags["best_run_id"] == best_run.info.run_id
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert best_run.info.run_id in {v.run_id for v in versions}
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    acc = {v.run_id: client.get_run(v.run_id).data.metrics["test_acc"] for v in versions}
    assert acc[champion.run_id] == max(acc.values())  # other tests' sweeps share this registry
    elsewhere = tmp_path / "another-machine"
    elsewhere.mkdir()
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, mlflow; m = mlflow.pytorch.load_model(sys.argv[1]); print(type(m).__name__)",
         best_run.data.tags[tracking.MODEL_URI_TAG]],
        cwd=elsewhere, env={**os.environ, "MLFLOW_TRACKING_URI": services.tracking_uri},
        capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]

    # The password appears nowhere in the tracking server: params, tags, artifacts
    mlflow.set_tracking_uri(services.tracking_uri)
    files = []
    for run in [parent, *kids]:
        assert all(services.password not in str(v) for v in (*run.data.params.values(), *run.data.tags.values()))
        # a run's own artifacts (a pruned run has none), and its logged model's (MLflow 3 keeps them apart)
        where = [dict(run_id=run.info.run_id)]
        if tracking.MODEL_URI_TAG in run.data.tags:
            where.append(dict(artifact_uri=run.data.tags[tracking.MODEL_URI_TAG]))
        for i, source in enumerate(where):
            root = Path(mlflow.artifacts.download_artifacts(**source, dst_path=str(tmp_path / run.info.run_id / str(i))))
            files += [p for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "hydra.yaml", "overrides.yaml", "state_dict.pt", "MLmodel", "optimization_results.yaml"} <= names
    assert not [p for p in files if services.password.encode() in p.read_bytes()]


def test_a_killed_worker_is_recovered_by_another(services, overrides, name):
    heartbeat = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    doomed = start(["-m", *server_args(overrides, name), *heartbeat, "hydra.sweeper.n_trials=5", "epochs=30"],
                   services.env())
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until its first trial runs and has its MLflow run
            time.sleep(0.5)
            try:
                trials = load_study(services, name).get_trials()
            except KeyError:  # no study yet
                continue
            if trials and RUN_ID_ATTR in trials[0].user_attrs:
                break
        doomed.send_signal(signal.SIGKILL)  # no handler runs
        doomed.wait(timeout=60)
    finally:
        doomed.kill()
    assert load_study(services, name).get_trials()[0].state == optuna.trial.TrialState.RUNNING
    time.sleep(4)  # past the grace period
    finish(start(["-m", *server_args(overrides, name), *heartbeat, "hydra.sweeper.n_trials=1"], services.env()))

    trials = load_study(services, name).get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL and trials[1].state in FINISHED
    client, (parent,), _ = study_runs(services, name)
    dead = client.get_run(trials[0].user_attrs[RUN_ID_ATTR])
    assert dead.info.status == "FAILED" and FAILURE_TAG in dead.data.tags
    assert parent.info.status == "FINISHED"


def test_a_submitit_local_sweep_keeps_the_trial_handover_and_pruning(services, overrides, name, tmp_path):
    finish(start(["-m", *server_args(overrides, name), "hydra/launcher=submitit_local", "hydra.sweeper.n_trials=2",
                  f"hydra.launcher.submitit_folder='{tmp_path / 'submitit'}/%j'"], services.env()))
    trials = load_study(services, name).get_trials()
    assert len(trials) == 2 and {t.state for t in trials} <= FINISHED
    assert all(t.intermediate_values for t in trials)  # each job reported to the pruner through the database
    _, (parent,), kids = study_runs(services, name)
    assert sorted(int(k.data.tags["trial"]) for k in kids) == [0, 1]
    for kid in kids:
        assert trials[int(kid.data.tags["trial"])].user_attrs[RUN_ID_ATTR] == kid.info.run_id
    logs = list((tmp_path / "submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # each trial was its own submitit job


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:  # refused, or not up yet (URLError is an OSError)
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_tracking_server_that_goes_away_mid_sweep_stops_the_sweep_and_keeps_the_study(
        services, overrides, name, tmp_path):
    port = free_port()
    server = subprocess.Popen(  # a tracking server of this test's own, to stop
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        env = {**services.env(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
        deadline = time.monotonic() + 120
        while not answers(f"http://127.0.0.1:{port}/health"):
            assert time.monotonic() < deadline, "the test's tracking server did not start"
            time.sleep(0.5)
        proc = start(["-m", *server_args(overrides, name), "hydra.sweeper.n_trials=3", "epochs=4",
                      "hydra/sweeper/pruner=none"], env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until trial 0 has logged its first epoch
            time.sleep(0.5)
            try:
                trials = load_study(services, name).get_trials()
            except KeyError:
                continue
            if trials and trials[0].intermediate_values:
                break
        os.killpg(server.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    trials = load_study(services, name).get_trials()
    assert trials[0].state == optuna.trial.TrialState.COMPLETE  # trained to the end: the study has its result
    assert len(trials) == 1  # no trial started without a place to record it
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopped answering" in errors[0], output[-3000:]


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


def test_stores_server_without_its_environment_says_what_to_set(overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}
    for flags, variable in (([], "MLFLOW_TRACKING_URI"), (["-m"], "OPTUNA_STORAGE")):
        done = subprocess.run([sys.executable, "-m", "mnist_sweep", *flags, *overrides, "stores=server"],
                              cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith("error:") and variable in done.stderr
