"""make services, the local stack: a real PostgreSQL and a real ``mlflow server`` (the
``local_stack`` fixture), used as a worker uses them, from another directory, with the password
only in the pgpass file."""

import socket
import uuid
from pathlib import Path

import mlflow
import optuna
import psutil
import psycopg
import pytest
from mlflow import MlflowClient

from conftest import run_cli
from mnist_sweep.stack import ROLE, _write_pgpass, main, start, stop

pytestmark = pytest.mark.slow  # the session's real servers, stopped and started again by one test


def objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0.0, 1.0)


def test_postgres_admits_the_role_through_pgpass_only(local_stack, monkeypatch, tmp_path):
    assert local_stack.pgpass.stat().st_mode & 0o777 == 0o600  # libpq ignores a file others can read
    assert all(local_stack.password not in uri for uri in local_stack.env().values())
    monkeypatch.setenv("PGPASSFILE", str(local_stack.pgpass))
    name = f"stack-{uuid.uuid4().hex[:8]}"
    optuna.create_study(storage=local_stack.optuna_storage, study_name=name).optimize(objective, n_trials=2)
    assert len(optuna.load_study(study_name=name, storage=local_stack.optuna_storage).trials) == 2

    server = {"host": local_stack.host, "port": local_stack.pg_port, "user": ROLE, "dbname": "optuna"}
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**server, password="not-" + local_stack.password)
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(**server, passfile=str(tmp_path / "no-such-pgpass"))


def test_a_reader_of_the_password_file_as_a_start_rewrites_it_reads_a_whole_file(tmp_path):
    pgpass = tmp_path / "pgpass"
    _write_pgpass(pgpass, "127.0.0.1", 5433, "old")
    with pgpass.open() as reader:  # a worker's libpq, opening the file as `make services` starts again
        _write_pgpass(pgpass, "127.0.0.1", 5434, "new")
        # rewritten in place, the reader read the new file or nothing
        assert reader.read() == f"127.0.0.1:5433:*:{ROLE}:old\n"
    assert pgpass.read_text() == f"127.0.0.1:5434:*:{ROLE}:new\n"
    assert pgpass.stat().st_mode & 0o777 == 0o600
    assert [path.name for path in tmp_path.iterdir()] == ["pgpass"]  # nothing left beside it


def test_the_tracking_server_keeps_runs_in_postgres_and_serves_their_artifacts(local_stack, monkeypatch, tmp_path):
    worker, reader = tmp_path / "worker", tmp_path / "reader"
    worker.mkdir()
    reader.mkdir()
    monkeypatch.chdir(worker)  # a local artifact store would land here
    client = MlflowClient(local_stack.tracking_uri)
    name = f"stack-{uuid.uuid4().hex[:8]}"
    experiment = client.get_experiment(client.create_experiment(name))
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    run = client.create_run(experiment.experiment_id)
    client.log_text(run.info.run_id, "seven", "notes/digit.txt")
    client.set_terminated(run.info.run_id)
    assert list(worker.iterdir()) == []

    stored = list((local_stack.root / "mlartifacts").rglob("digit.txt"))
    assert [path.read_text() for path in stored] == ["seven"]  # in the server's artifact root
    with psycopg.connect(host=local_stack.host, port=local_stack.pg_port, user=ROLE, dbname="mlflow",
                         passfile=str(local_stack.pgpass)) as conn:
        assert conn.execute("SELECT artifact_location FROM experiments WHERE name = %s",
                            (name,)).fetchone() == (experiment.artifact_location,)

    monkeypatch.chdir(reader)  # another machine's worker, as far as paths go
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="notes/digit.txt",
                                                dst_path=str(reader), tracking_uri=local_stack.tracking_uri)
    assert Path(local).read_text() == "seven"


@pytest.mark.parametrize("arg", ["mlflow_workers=0", "mlflow_workers=two"])
def test_a_worker_count_that_is_no_whole_number_is_one_line_before_anything_starts(arg, tmp_path):
    with pytest.raises(ValueError, match=r"^mlflow_workers must be a whole number, at least 1 \(got '(0|two)'\)$"):
        main(["start", f"root={tmp_path / 'services'}", arg])
    assert list(tmp_path.iterdir()) == []


def test_a_second_start_returns_the_running_stack(local_stack):
    pid = (local_stack.root / "mlflow.pid").read_text()
    assert start(local_stack.root, pg_port=1, mlflow_port=2) == local_stack  # the ports they run on, not these
    assert (local_stack.root / "mlflow.pid").read_text() == pid

    done = run_cli("mnist_sweep.stack", "start", f"root={local_stack.root}", timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"OPTUNA_STORAGE={local_stack.optuna_storage}" in done.stdout
    assert f"MLFLOW_TRACKING_URI={local_stack.tracking_uri}" in done.stdout
    assert local_stack.password not in done.stdout + done.stderr


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_stop_stops_both_and_start_resumes_their_data(stack_alone, monkeypatch):
    """It stops the session's servers (while no other test uses them), then starts them again on
    the same ports. Its setup can wait 30-40 s: for every test then using the servers to let go."""
    local_stack = stack_alone
    monkeypatch.setenv("PGPASSFILE", str(local_stack.pgpass))
    name = f"stack-{uuid.uuid4().hex[:8]}"
    optuna.create_study(storage=local_stack.optuna_storage, study_name=name).optimize(objective, n_trials=1)

    stop(local_stack.root)
    assert refused(local_stack.host, local_stack.pg_port)
    assert refused(local_stack.host, local_stack.mlflow_port)
    stop(local_stack.root)  # nothing runs: nothing to do

    assert start(local_stack.root, pg_port=local_stack.pg_port, mlflow_port=local_stack.mlflow_port) == local_stack
    # the session's one uvicorn worker (conftest), kept by the restart: the server and the uvicorn
    # it starts, serving in its own process (more workers: a supervisor and a process each)
    assert local_stack.mlflow_workers == 1
    server = psutil.Process(int((local_stack.root / "mlflow.pid").read_text()))
    (uvicorn,) = server.children(recursive=True)
    assert uvicorn.cmdline()[1:3] == ["-m", "uvicorn"] and "--workers 1 " in " ".join(uvicorn.cmdline()) + " "
    assert len(optuna.load_study(study_name=name, storage=local_stack.optuna_storage).trials) == 1
