"""The stores without a server: password redaction in any text and log line, the stores group, the
lock that serialises what must not race on a store, and what a user reads when a store's file or
disk fails."""

import contextlib
import errno
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import requests
import sqlalchemy

from mnist_sweep import stores, tracking, trial
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
    """~30 s: one process per unreachable store, as a user meets the error (each pays the imports)."""
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
    """~15-30 s: a run and a sweep, each its own process with the variables taken out of its environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}
    for flags, variable in (([], "MLFLOW_TRACKING_URI"), (["-m"], "OPTUNA_STORAGE")):
        done = subprocess.run([sys.executable, "-m", "mnist_sweep", *flags, *overrides, "stores=server"],
                              cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith("error:") and variable in done.stderr


def sqlite_full_error() -> sqlalchemy.exc.OperationalError:
    """What SQLite raises when its disk is full, for real: a database capped at two pages."""
    with sqlalchemy.create_engine("sqlite://").connect() as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE t (x)"))
        connection.execute(sqlalchemy.text("PRAGMA max_page_count = 2"))
        with pytest.raises(sqlalchemy.exc.OperationalError) as full:
            for _ in range(100):
                connection.execute(sqlalchemy.text("INSERT INTO t VALUES (:x)"), {"x": "x" * 1000})
    return full.value


def raising(error: BaseException):
    def action():
        raise error
    return action


def test_a_full_disk_is_told_apart_however_deep_it_was_raised():
    full = sqlite_full_error()
    try:
        raise RuntimeError("the storage failed") from full  # as Optuna and MLflow wrap it
    except RuntimeError as wrapped:
        assert stores.disk_full(wrapped)
    assert stores.disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not stores.disk_full(OSError(errno.EACCES, "Permission denied"))  # 13, as SQLITE_FULL: not mixed up
    assert not stores.disk_full(ValueError("nothing to do with a disk"))
    assert stores.one_line(full) == "(sqlite3.OperationalError) database or disk is full"  # no SQL, no parameters


def opened(uri: str, action) -> str:
    with pytest.raises(stores.StoreError) as error:
        with stores.opening("the study's database", uri, "optuna.storage"):
            action()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_store_file_that_cannot_be_used_is_one_line_naming_it_and_what_to_do(tmp_path):
    text = tmp_path / "optuna.db"
    text.write_text("notes, not a database")
    uri = f"sqlite:///{text}"

    def query():
        sqlalchemy.create_engine(uri).connect().execute(sqlalchemy.text("SELECT * FROM sqlite_master"))

    assert opened(uri, query) == (f"the study's database {text} is not an SQLite database ((sqlite3.DatabaseError) "
                                  "file is not a database): move it away (a new one is made there), or point "
                                  "optuna.storage at another file")
    in_the_way = tmp_path / "notes.txt"
    in_the_way.write_text("")
    uri = f"sqlite:///{in_the_way / 'optuna.db'}"
    assert f"({in_the_way} is a file, not a folder): make it writable, or set paths.outputs (or optuna.storage)" \
        in opened(uri, lambda: stores.lock(uri).__enter__())
    theirs = tmp_path / "theirs.db"
    uri = f"sqlite:///{theirs}"  # as root no file refuses a write: the error is what another user meets
    refused = PermissionError(errno.EACCES, "Permission denied", f"{theirs}.lock")
    assert opened(uri, raising(refused)).startswith(f"cannot write the study's database {theirs} ([Errno 13] "
                                                    "Permission denied")
    assert opened(uri, raising(sqlite_full_error())).startswith(f"the disk holding {theirs} ran out of space")


def test_the_study_and_the_mlflow_store_say_so_the_same_way(tmp_path):
    text = tmp_path / "outputs.db"
    text.write_text("notes, not a database")
    for what, open_it in {"the study's database": lambda uri: trial.open_storage(uri),
                          "the MLflow store": lambda uri: tracking.use_store(uri, "x", str(tmp_path / "art"))}.items():
        with pytest.raises(stores.StoreError, match=f"^{what} {text} is not an SQLite database"):
            open_it(f"sqlite:///{text}")
    assert text.read_text() == "notes, not a database"  # nothing written over it


def journal_mode(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as database:
        return database.execute("PRAGMA journal_mode").fetchone()[0]


def test_the_local_stores_keep_a_write_ahead_log_and_a_server_store_is_left_alone(tmp_path):
    trial.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}?timeout=5")
    tracking.use_store(f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=5", "x", str(tmp_path / "art"))
    assert journal_mode(tmp_path / "optuna.db") == journal_mode(tmp_path / "mlflow.db") == "wal"  # the file keeps it
    stores.write_ahead("postgresql+psycopg://127.0.0.1:1/optuna")  # no connection tried: it would fail
    stores.write_ahead("http://127.0.0.1:1")


def test_what_a_process_committed_is_in_the_database_file_alone_after_its_exit(tmp_path):
    """A tool's process exits with its stores' connections open (MLflow's pool, frozen with the rest:
    cli.run), so SQLite's own last-connection checkpoint never runs: the exit's does."""
    db = tmp_path / "store.db"
    writer = (
        "import gc, sqlite3, sys\n"
        "from mnist_sweep import stores\n"
        "stores.write_ahead(f'sqlite:///{sys.argv[1]}')\n"
        "held = [sqlite3.connect(sys.argv[1])]\n"
        "held[0].execute('CREATE TABLE runs (id)')\n"
        "held[0].execute(\"INSERT INTO runs VALUES ('r1')\")\n"
        "held[0].commit()\n"
        "held.append(held)  # a cycle, frozen: never closed, as a run's store connections\n"
        "gc.freeze()\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(db)], cwd=PROJECT_ROOT, check=True, timeout=60)
    alone = tmp_path / "copy.db"
    alone.write_bytes(db.read_bytes())  # as a user copies the store, without its log
    with contextlib.closing(sqlite3.connect(alone)) as database:
        assert database.execute("SELECT id FROM runs").fetchall() == [("r1",)]


def test_a_full_disk_names_the_fullest_of_the_places_written(tmp_path, monkeypatch):
    roomy, full = tmp_path / "outputs", tmp_path / "other-disk" / "mlflow.db"
    roomy.mkdir()
    full.parent.mkdir()
    free = {full.parent: 4096}
    monkeypatch.setattr(stores.shutil, "disk_usage", lambda path: SimpleNamespace(free=free.get(Path(path), 10**9)))
    assert stores.disk_full_message([roomy, full]) == (
        f"the disk holding {full} ran out of space (4 KiB left now): free space there, or set paths.outputs to "
        "another disk, then run the same command again; what finished is kept")
    assert stores.written(str(roomy), "sqlite:////srv/mlflow.db?timeout=60", "http://host:5000", None,
                          "postgresql+psycopg://db/optuna", "mlflow-artifacts:/") == [roomy, Path("/srv/mlflow.db")]


def test_a_database_that_stops_answering_is_one_line_naming_it_and_what_was_said():
    driver = ConnectionRefusedError("connection refused\n\tIs the server running?")
    refused = sqlalchemy.exc.OperationalError("SELECT 1", {}, driver)
    refused.__cause__ = driver  # as SQLAlchemy raises it: from the driver's error
    uri = "postgresql+psycopg://me:pw@db:5433/optuna"
    with pytest.raises(stores.StoreError) as caught, stores.answering("the study's database", uri):
        # Optuna words it as bad data, with SQLAlchemy's error, then the driver's, as its causes
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from refused
    assert str(caught.value).startswith("the study's database postgresql+psycopg://me:***@db:5433/optuna stopped "
                                        "answering (connection refused Is the server running?): this worker stops")
    with pytest.raises(ValueError), stores.answering("the study's database", uri):  # anything else goes through
        raise ValueError("bad data")
    assert stores.gone(refused) and stores.gone(requests.ConnectionError()) and not stores.gone(ValueError())


def test_an_outage_is_ridden_out_up_to_its_bound_and_then_its_error_goes_on(monkeypatch):
    slept = []
    monkeypatch.setattr(stores.time, "sleep", slept.append)  # no real waiting; the bound runs on the clock below
    clock = iter(range(0, 1000, 10))  # each failure 10 s later than the one before
    monkeypatch.setattr(stores.time, "monotonic", lambda: next(clock))
    refused = requests.ConnectionError("Connection refused")
    answers = iter([refused, refused, "answered"])

    def call():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert stores.ride_out(call, "the MLflow store", "http://u:pw@host:5050", 120) == "answered"
    assert slept == [stores.FIRST_PAUSE_S, 2 * stores.FIRST_PAUSE_S]  # waits that grow
    answers = iter([refused] * 20)
    with pytest.raises(requests.ConnectionError):  # past 25 s: today's error
        stores.ride_out(call, "the MLflow store", "http://host:5050", 25)
    for not_an_outage, uri in ((ValueError("bad data"), "http://host:5050"),  # what was asked was wrong
                               (refused, "sqlite:///outputs/mlflow.db")):  # a local file: no waiting brings it back
        answers, slept[:] = iter([not_an_outage]), []
        with pytest.raises(type(not_an_outage)):
            stores.ride_out(call, "the MLflow store", uri, 120)
        assert slept == []


def test_a_database_that_never_answered_is_an_error_at_once_and_one_that_did_is_waited_for(monkeypatch):
    """Nothing listens on the port: a worker's first contact fails at once, whatever outage_s says; a
    job, whose sweeper reached the database just before (``answered``), waits out to the bound first."""
    slept = []
    monkeypatch.setattr(stores.time, "sleep", slept.append)
    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/optuna"
    with pytest.raises(stores.StoreError, match="cannot reach the database"):
        trial.open_storage(url, outage_s=120)
    assert slept == []
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(stores.time, "monotonic", lambda: next(clock))
    with pytest.raises(stores.StoreError, match="cannot reach the database"):
        trial.open_storage(url, outage_s=30, answered=True)
    assert len(slept) == 3  # 10, 20, 30 s after the first failure: then the bound
