"""Shared fixtures: a tiny MNIST-shaped data set the tests make, and overrides that keep every
run's state (MLflow store, Optuna study, Hydra dirs) inside the test's temporary directory."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from mnist_sweep import data, registry, slurm, stack, tensors, tracking, train
from mnist_sweep.config import CONF_DIR, PROJECT_ROOT
from mnist_sweep.model import ConvNet
from mnist_sweep.trial import RUN_ID_ATTR, open_storage


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def make_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` learnable 28×28 uint8 images: class k is a bright 8×8 block at its own place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        row, col = divmod(int(label), 4)
        image[2 + 8 * row : 10 + 8 * row, 2 + 6 * col : 10 + 6 * col] = 230
    return images, labels


def write_tiny_mnist(root: Path, n_train: int = 320, n_test: int = 160) -> dict[str, str]:
    """The four raw IDX files under ``root``; returns their MD5s (the ``data.md5`` to pass)."""
    raw = data.raw_dir(root)
    (train_x, train_y), (test_x, test_y) = make_digits(n_train, 0), make_digits(n_test, 1)
    arrays = {
        "train-images-idx3-ubyte": train_x,
        "train-labels-idx1-ubyte": train_y,
        "t10k-images-idx3-ubyte": test_x,
        "t10k-labels-idx1-ubyte": test_y,
    }
    for name, array in arrays.items():
        data.write_idx(raw / name, array)
    return {name: data.md5sum(raw / name) for name in arrays}


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("tiny_mnist")
    return root, write_tiny_mnist(root)


@pytest.fixture
def overrides(tiny_mnist, tmp_path) -> list[str]:
    """Hydra overrides for a fast run on the tiny data, all state under ``tmp_path``, whose MLflow
    store starts as a copy of the session's empty one (a new store's schema takes seconds to make)."""
    root, md5 = tiny_mnist
    (tmp_path / "outputs").mkdir(exist_ok=True)
    shutil.copy(shared("mlflow_schema"), tmp_path / "outputs" / "mlflow.db")
    return [
        f"data.root={root}",
        *(f"data.md5.{name}={digest}" for name, digest in md5.items()),
        f"paths.outputs={tmp_path / 'outputs'}",
        "model.channels=[4,8]",
        "data.batch_size=32",
        "data.eval_batch_size=64",
        "device=cpu",
        "epochs=1",  # a sweep's trials too (its space searches 2-8): a test that needs more says so
        # one thread: tests run two (or more) at once on two cores, and an oversubscribed OpenMP team
        # spins: a tiny epoch took 3-5x as long on 2 threads (a test of threads=0 says so)
        "threads=1",
        # a run's model as a pickle: pt2's torch.export costs a process seconds, and only the tests of
        # the format and of loading the champion need it (they say mlflow.model_format=pt2)
        "mlflow.model_format=pickle",
        # no study plots at a sweep's end (~2.5 CPU-s at each worker's close): the tests of the plots
        # say mlflow.study_plots=true
        "mlflow.study_plots=false",
    ]


def store(tmp_path) -> MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    return MlflowClient()


def runs_in(outputs: Path) -> list:
    """Every run in the MLflow store under ``outputs`` (the ``overrides`` fixture's starts empty)."""
    client = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def checkpoint_epoch(outputs: Path, run_id: str | None) -> int | None:
    """The epoch of run ``run_id``'s checkpoint under ``outputs`` (the default checkpoint.dir), if any."""
    file = outputs / "checkpoints" / f"{run_id}.pt"
    try:
        return torch.load(file, weights_only=True)["epoch"]
    except Exception:  # noqa: BLE001 - none yet, or being renamed into place this instant
        return None


def only_run(client: MlflowClient):
    (run,) = client.search_runs([client.get_experiment_by_name("mnist_sweep").experiment_id])
    return run


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module args…`` from the project root, as a user would type it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def logged_model(tiny_mnist, tmp_path_factory) -> SimpleNamespace:
    """A ConvNet([4, 8]) trained for a few steps (right on some digits only), logged as pt2 to an
    MLflow store of its own and registered as mnist-cnn@champion, as a sweep would."""
    root, md5 = tiny_mnist
    train_set, _ = tensors.load(data.prepare(root, md5, log=lambda line: None), torch.device("cpu"))
    torch.manual_seed(0)
    model = ConvNet([4, 8])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)  # about half right
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train.train_epoch(model, optimizer, constant, train_set, batch_size=32, seed=0)
    model.eval()

    store = tmp_path_factory.mktemp("mlflow")
    tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking.use_store(tracking_uri, "tiny", str(store / "mlartifacts"))
    with tracking.run("tiny-run", {}, {}) as active:
        tracking.log_outputs(model, train_set.images[:2], "pt2", "shallow-4-8")
        mlflow.log_metric("test_acc", 0.5)  # what promote compares
    run = mlflow.get_run(active.info.run_id)
    registry.promote(MlflowClient(), run)
    return SimpleNamespace(model=model, tracking_uri=tracking_uri, run_id=run.info.run_id,
                           model_uri=run.data.tags[tracking.MODEL_URI_TAG])


@pytest.fixture(scope="session")
def weights_only_trial(tmp_path_factory) -> SimpleNamespace:
    """An MLflow store holding a sweep trial that logged its weights but no model, as
    mlflow.log_models=best leaves a trial that did not lead its study."""
    store = tmp_path_factory.mktemp("weights_only")
    tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking.use_store(tracking_uri, "mnist_sweep", str(store / "mlartifacts"))
    params = {"mlflow.model_format": "pt2", "mlflow.log_models": "best", "model": "deep"}
    tags = {"trial": "3", "hydra.overrides": "optuna.study=mnist_sweep optuna.trial=3 model=deep optim.lr=0.05"}
    with tracking.run("deep-sgd-lr0.05-bs64", params, tags) as active:
        tracking.log_outputs(ConvNet([4]), torch.zeros(2, 1, 28, 28), None, "deep-4")
    return SimpleNamespace(tracking_uri=tracking_uri, run_id=active.info.run_id)


@pytest.fixture(scope="session")
def store_without_champion(tmp_path_factory) -> SimpleNamespace:
    """An MLflow store where two runs logged a model and no sweep registered one: ``make run`` twice."""
    store = tmp_path_factory.mktemp("no_champion")
    tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking.use_store(tracking_uri, "mnist_sweep", str(store / "mlartifacts"))
    for name in ("older-run", "newer-run"):
        with tracking.run(name, {}, {}) as active:
            tracking.log_outputs(ConvNet([4]), torch.zeros(2, 1, 28, 28), "pickle", name)  # pickle: fast
    return SimpleNamespace(tracking_uri=tracking_uri, latest_run_id=active.info.run_id)


# ----------------------------------------------------------------- what the whole session shares
# One PostgreSQL + MLflow server, one Slurm cluster and one empty MLflow schema for the whole run,
# whichever xdist worker asks first: it starts them (the others wait on a file lock, then join what
# it started), in the background from collection on, so the first in-process tests run meanwhile.
# The process that started pytest stops them at the end. Their folders sit outside pytest's
# tmp_path: as root, PostgreSQL runs as the user postgres, who cannot enter /tmp/pytest-of-root.
SHARED_ENV = "MNIST_SWEEP_TEST_SHARED"  # the run's folder of shared things, set before workers start


def shared_root() -> Path:
    return Path(os.environ[SHARED_ENV])


def _start_stack(root: Path) -> stack.Stack:
    # one uvicorn worker: the tests need no throughput, and each more is an MLflow process to start
    # (~5 CPU-s) at the session's start and at every restart a test makes
    running = stack.start(root, pg_port=stack.free_port(), mlflow_port=stack.free_port(), mlflow_workers=1)
    # Optuna's tables, made now under the store's lock (open_storage): Optuna makes them at a client's
    # first connection, and a test's plain optuna.load_study racing a sweep's first one on the fresh
    # database collided (duplicate key: type studydirection)
    os.environ["PGPASSFILE"] = str(running.pgpass)  # what libpq reads for the password
    open_storage(running.optuna_storage)
    return running


def _start_slurm(root: Path) -> slurm.Cluster:
    return slurm.start(root, slurm.Ports(*(stack.free_port() for _ in slurm.Ports._fields)))


def _make_mlflow_schema(root: Path) -> Path:
    db = root / "mlflow.db"
    if not db.exists():  # in a process of its own: alembic's migration context is one per process,
        # and a test of this process may be making a store of its own at the same moment
        subprocess.run([sys.executable, "-c", "import sys; from mlflow.store.tracking.sqlalchemy_store import "
                        "SqlAlchemyStore; SqlAlchemyStore(sys.argv[1], sys.argv[2])",
                        f"sqlite:///{root / 'making.db'}", str(root / "artifacts")], check=True, capture_output=True)
        (root / "making.db").rename(db)  # whole, or not there
    return db


# fixture -> (what it shares, its start, the programs it needs, what CI runs the tests against)
SHARED = {
    "local_stack": ("stack", _start_stack, stack.postgres_bindir, "real servers"),
    "slurm_cluster": ("slurm", _start_slurm, slurm.programs, "a real Slurm"),
    "overrides": ("mlflow_schema", _make_mlflow_schema, lambda: None, ""),
}
_starts: dict[str, Future] = {}
_pool = ThreadPoolExecutor(max_workers=len(SHARED), thread_name_prefix="shared-start")


def _start_shared(name: str, start: Callable[[Path], object]) -> object:
    root = shared_root() / name
    with open(shared_root() / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker starts it; the next finds it running
        root.mkdir(exist_ok=True)
        root.chmod(0o711)  # postgres and munged pass through to their files; others may not list them
        return start(root)


def begin(fixture: str) -> Future:
    name, start, _, _ = SHARED[fixture]
    if name not in _starts:
        _starts[name] = _pool.submit(_start_shared, name, start)
    return _starts[name]


def shared(name: str) -> object:
    """The shared thing ``name`` (a key of SHARED's values), started if no test has asked yet."""
    fixture = next(f for f, (n, *_) in SHARED.items() if n == name)
    return begin(fixture).result()


def pytest_configure(config) -> None:
    if not hasattr(config, "workerinput"):  # the process that started pytest: before any worker starts
        root = Path(tempfile.mkdtemp(prefix="mnist_sweep-tests-"))
        root.chmod(0o711)
        os.environ[SHARED_ENV] = str(root)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Start what the collected tests will need, in the background."""
    wanted = {name for item in items for name in getattr(item, "fixturenames", ())}
    for fixture, (_, _, programs, _) in SHARED.items():
        if fixture in wanted:
            with contextlib.suppress(FileNotFoundError):  # missing programs: the test says so (require)
                programs()
                begin(fixture)


def pytest_runtest_setup(item) -> None:
    """Under ``--dist loadgroup`` (make test), a test marked ``xdist_group`` must run in its group's
    one worker: the Slurm tests share a cluster that one of them stops, the pad's a browser. Where
    xdist ignored the mark (3.8 under pytest 9.2: a test's id keeps no @group), the test fails."""
    if (getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group")
            and "@" not in item.nodeid):
        pytest.fail("pytest-xdist ignored this test's xdist_group: its group would not run in one worker "
                    "(pyproject.toml pins a pytest that xdist's loadgroup works with)", pytrace=False)


def pytest_sessionfinish(session) -> None:
    for started in _starts.values():  # a short session may end before its servers are up: then stop them
        started.exception()
    if hasattr(session.config, "workerinput"):
        return
    root = shared_root()
    stops = [(stop, root / name) for stop, name in ((stack.stop, "stack"), (slurm.stop, "slurm"))
             if (root / name).exists()]
    with ThreadPoolExecutor(max_workers=2) as pool:  # both at once: each mostly waits on its daemons' exit
        list(pool.map(lambda stopping: stopping[0](stopping[1]), stops))
    shutil.rmtree(root, ignore_errors=True)


def unavailable(reason: str, what: str) -> None:
    """Skip a test that cannot have ``what`` here; under CI (``CI`` set and not false), fail it:
    CI runs the tests against ``what``, never without."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason} (CI runs the tests against {what})")
    pytest.skip(reason)


def require(find_programs: Callable[[], object], what: str) -> None:
    """A test needs the programs ``find_programs`` finds (else :func:`unavailable`)."""
    try:
        find_programs()
    except FileNotFoundError as err:
        unavailable(str(err), what)


@contextlib.contextmanager
def _stack_held(mode: int) -> Iterator[stack.Stack]:
    _, _, programs, what = SHARED["local_stack"]
    require(programs, what)
    running = shared("stack")
    with open(shared_root() / "stack.in-use", "a") as lock:
        fcntl.flock(lock, mode)
        yield running


@pytest.fixture
def local_stack() -> Iterator[stack.Stack]:
    """The session's real PostgreSQL and ``mlflow server`` on free loopback ports (each test its own
    study, experiment or database names). Without PostgreSQL's programs: skipped, but failed under CI."""
    with _stack_held(fcntl.LOCK_SH) as running:
        yield running


@pytest.fixture
def stack_alone() -> Iterator[stack.Stack]:
    """The session's stack, with no other test using it (for a test that stops it)."""
    with _stack_held(fcntl.LOCK_EX) as running:
        yield running


@pytest.fixture(scope="session")
def slurm_cluster() -> slurm.Cluster:
    """The session's real single-node Slurm (munged, MariaDB, slurmdbd, slurmctld, slurmd) on free
    loopback ports. Without Slurm's programs: skipped, but failed under CI (.ci/run installs them)."""
    _, _, programs, what = SHARED["slurm_cluster"]
    require(programs, what)
    return shared("slurm")


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Callable[..., Path]]:
    """``small_disk(size, read_only=False)``: a folder on a disk of its own (tmpfs) of ``size``
    (``mount``'s syntax: "8m"), to fill up or make read-only as a user's disk is, unmounted at the
    end. Mounting needs root: skipped without it, failed under CI."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            unavailable(f"cannot mount a small disk here: {done.stderr.strip()}", "a disk that fills up")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:  # lazily: an MLflow client of the test may still hold its database open
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    """The process failed with one ``error:`` line as its last, holding ``words``, and no traceback."""
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(word in last for word in words), (last, words)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    return last


def ended_pid() -> int:
    """The id of a process that has ended (and been reaped), as a killed worker's is."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


# --------------------------------------------------------------------------- sweeps as a user starts them

FINISHED = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}


def sweep_here(*args: str) -> None:
    """``python -m mnist_sweep -m args`` in this process: the same Hydra entry, sweeper and jobs,
    without a new interpreter's imports (seconds a sweep). One that fails raises; its log goes to
    stdout (``capsys``), as in a terminal."""
    from hydra.core.global_hydra import GlobalHydra

    from mnist_sweep.__main__ import main

    argv, sys.argv = sys.argv, ["mnist_sweep", "-m", *args]
    GlobalHydra.instance().clear()
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code, f"the sweep ended with {exit_.code}"
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


def start(args: list[str], env: dict[str, str] | None = None, nice: int = 0) -> subprocess.Popen:
    """``python -m mnist_sweep args``, as a worker a user starts, with ``env`` added to the environment,
    at ``nice``'s priority (`nice -n`)."""
    return subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-m", "mnist_sweep", *args], cwd=PROJECT_ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


def server_args(overrides: list[str], name: str) -> list[str]:
    """The test's overrides, on the shared stores: the study and experiment named ``name``."""
    return [*overrides, "stores=server", f"hydra.sweeper.study_name={name}", f"mlflow.experiment={name}"]


@functools.cache
def _study_storage(url: str) -> optuna.storages.RDBStorage:
    # one engine a database for the whole session: a test polling a study would otherwise open a
    # pool of connections at each look, and the shared PostgreSQL refuses clients past 100; its
    # connections are checked before use, since a test restarts the database (stack_alone)
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def load_study(local_stack, name: str) -> optuna.Study:
    os.environ["PGPASSFILE"] = str(local_stack.pgpass)  # what libpq reads for the password
    return optuna.load_study(study_name=name, storage=_study_storage(local_stack.optuna_storage))


def study_runs(local_stack, name: str) -> tuple[MlflowClient, list, list]:
    """The tracking server's client, the study's parent runs and its children."""
    client = MlflowClient(local_stack.tracking_uri)
    everything = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    parents = [r for r in everything if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, [r for r in everything if "mlflow.parentRunId" in r.data.tags]


def assert_each_job_ran_its_trial(local_stack, name: str, n: int) -> tuple[MlflowClient, object, list]:
    """A sweep of ``n`` trials whose jobs ran elsewhere (submitit, Slurm): each finished, reported to
    the pruner through the database, and has its run; returns the client, the parent and the runs."""
    trials = load_study(local_stack, name).get_trials()
    assert len(trials) == n and {t.state for t in trials} <= FINISHED
    assert all(t.intermediate_values for t in trials)  # each job reported to the pruner through the database
    client, (parent,), kids = study_runs(local_stack, name)
    assert sorted(int(k.data.tags["trial"]) for k in kids) == list(range(n))
    for kid in kids:
        assert trials[int(kid.data.tags["trial"])].user_attrs[RUN_ID_ATTR] == kid.info.run_id
    return client, parent, kids
