"""The study's cost as it grows: the product's own calls on a PostgreSQL study filled with synthetic
finished trials, timed at each size, with the SQL statements each makes and their time.

A synthetic trial is one the default search would leave: params drawn from the default space as the
sweeper parses it (hydra-optuna-sweeper's distributions), an intermediate value at every percent step
a :class:`~mnist_sweep.trial.JobTrial` reports (``checks_per_epoch`` checks and the end of each epoch),
its MLflow run and worker recorded, and a mix of COMPLETE and PRUNED (pruned past the warm-up).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import unittest.mock
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import sqlalchemy
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.trial import TrialState

from mnist_sweep import trial as jobs
from mnist_sweep.config import PROJECT_ROOT, compose
from mnist_sweep.hydra_plugin import sweeper

SIZES = (100, 1000, 5000)  # trials in the study when each round of timings runs
QUICK_SIZES = (10, 50)
CPU_TICK_S = 1 / os.sysconf("SC_CLK_TCK")  # /proc counts CPU time in clock ticks: less reads as 0
SWEEPER_CONF = PROJECT_ROOT / "conf" / "hydra" / "sweeper"
OBJECTIVE = "test_acc"
EPOCHS = 4  # the timed trial's length: the middle of the default space's choice(2, 4, 8)
PRUNED_SHARE = 0.4  # of the synthetic trials: about what the median pruner stops in a long search
# What one trial costs the study's database, from the job's and the sweeper's calls (heartbeats apart)
JOB_CALLS = ("join", "first report", "report", "leads", "complete")
SWEEPER_CALLS = ("fail_stale_trials", "fail_abandoned", "room", "ask", "record_returns")


def search_config() -> tuple[dict, optuna.pruners.BasePruner, dict, int]:
    """The default search as the sweeper builds it: its distributions, the median pruner, its
    sampler's config (search.yaml's option of hydra/sweeper/sampler), and a job's checks per epoch
    (conf/config.yaml)."""
    search = OmegaConf.load(SWEEPER_CONF / "search.yaml")
    space, _ = sweeper.parse_space([f"{key}={value}" for key, value in search.params.items()])
    pruner = instantiate(OmegaConf.load(SWEEPER_CONF / "pruner" / "median.yaml"))
    sampler = OmegaConf.to_container(compose([], with_hydra=True).hydra.sweeper.sampler)
    checks = OmegaConf.load(PROJECT_ROOT / "conf" / "config.yaml").pruning.checks_per_epoch
    return space, pruner, sampler, checks


def draw(dist: optuna.distributions.BaseDistribution, rng: np.random.Generator):
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return dist.choices[rng.integers(len(dist.choices))]
    if dist.log:
        return float(np.exp(rng.uniform(np.log(dist.low), np.log(dist.high))))
    return float(rng.uniform(dist.low, dist.high))


def percents(epochs: int, checks: int) -> list[int]:
    """The steps a trial of ``epochs`` reports at, as JobTrial computes them."""
    per_epoch = checks + 1
    return [round(100 * step / (epochs * per_epoch)) for step in range(1, epochs * per_epoch + 1)]


def synthetic_trial(space: dict, checks: int, rng: np.random.Generator) -> optuna.trial.FrozenTrial:
    """A finished trial of the default search: its learning curve rises to a final accuracy near 99%;
    a pruned one stops at a check past the pruner's warm-up."""
    params = {name: draw(dist, rng) for name, dist in space.items()}
    steps = percents(int(params["epochs"]), checks)
    final = 0.99 - abs(rng.normal(0, 0.004))
    curve = {p: final - 0.08 * (1 - p / 100) ** 2 + rng.normal(0, 0.002) for p in steps}
    pruned = rng.random() < PRUNED_SHARE
    if pruned:
        stop = rng.integers(next(i for i, p in enumerate(steps) if p >= 25), len(steps))
        curve = {p: v for p, v in curve.items() if p <= steps[stop]}
    attrs = {jobs.RUN_ID_ATTR: uuid.uuid4().hex, jobs.WORKER_ATTR: {"host": "bench", "pid": int(rng.integers(1e5))}}
    trial = optuna.trial.create_trial(
        state=TrialState.PRUNED if pruned else TrialState.COMPLETE, value=None if pruned else curve[steps[-1]],
        params=params, distributions=space, user_attrs=attrs, intermediate_values=curve)
    # create_trial converts them to optuna 3's classes; the sweeper's trials store the plugin's own
    trial.distributions = dict(space)
    return trial


def fill(study: optuna.Study, n: int, space: dict, checks: int, rng: np.random.Generator) -> None:
    """Add synthetic finished trials until the study holds ``n``."""
    for _ in range(n - len(study.get_trials(deepcopy=False))):
        study.add_trial(synthetic_trial(space, checks, rng))


@dataclass
class Calls:
    """Per named call: its wall seconds, SQL statements and seconds inside them, one entry a call."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    statements: dict[str, list[int]] = field(default_factory=dict)
    sql_seconds: dict[str, list[float]] = field(default_factory=dict)
    _open: list[list[float]] = field(default_factory=list)  # [statements, seconds] of the timing in progress
    _started: float = 0.0

    def before(self, *args) -> None:
        self._started = time.perf_counter()

    def after(self, *args) -> None:
        for counts in self._open:
            counts[0] += 1
            counts[1] += time.perf_counter() - self._started

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        counts = [0, 0.0]
        self._open.append(counts)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds.setdefault(name, []).append(time.perf_counter() - start)
            self._open.remove(counts)
            self.statements.setdefault(name, []).append(int(counts[0]))
            self.sql_seconds.setdefault(name, []).append(counts[1])

    def medians(self) -> dict[str, dict[str, float]]:
        return {name: {"s": statistics.median(self.seconds[name]),
                       "statements": statistics.median(self.statements[name]),
                       "sql_s": statistics.median(self.sql_seconds[name])} for name in self.seconds}


@contextlib.contextmanager
def counting(calls: Calls) -> Iterator[Calls]:
    """Count every SQL statement any engine of this process runs (the job's joins make their own)."""
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", calls.before)
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", calls.after)
    try:
        yield calls
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", calls.before)
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "after_cursor_execute", calls.after)


def one_trial(study: optuna.Study, storage: optuna.storages.RDBStorage, url: str, space: dict,
              pruner: optuna.pruners.BasePruner, checks: int, calls: Calls) -> None:
    """One trial of the default search, as a worker runs it in a study of this size: the sweeper's
    work before its batch, its ask, the job's join, every report of an EPOCHS-epoch trial (it leads, so
    none prunes it), the job's leads and its tell, then the sweeper's record of the returns."""
    with warnings_quiet():
        with calls.time("fail_stale_trials"):
            optuna.storages.fail_stale_trials(study)
        with calls.time("fail_abandoned"):
            sweeper.fail_abandoned(study, storage)
        with calls.time("room"):
            sweeper.room(study, max_trials=10**9)
        with calls.time("ask"):
            asked = study.ask()
            for name, dist in space.items():
                asked._suggest(name, dist)  # as the plugin's _configure_trials does (the job runs EPOCHS)
        with calls.time("join"):
            job = jobs.join(study.study_name, asked.number, url, pruner, None, OBJECTIVE, EPOCHS, checks)
    with calls.time("heartbeat"):
        job.heartbeat.storage.record_heartbeat(jobs.trial_id(job.trial))
    with job:
        for step, percent in enumerate(percents(EPOCHS, checks), start=1):
            with calls.time("first report" if step == 1 else "report"):
                job.report_check(step, 0.999 - 0.05 * (1 - percent / 100) ** 2)
        with calls.time("leads"):
            job.leads(0.999)
        with calls.time("complete"):
            job.complete(0.999)
    with calls.time("record_returns"):
        done = JobReturn(status=JobStatus.COMPLETED, _return_value=0.999)
        sweeper.record_returns(study, storage, [asked], [done], max_failure_rate=1.0)
    job.heartbeat.storage.engine.dispose()  # the job's process would end here, and its connections with it


@contextlib.contextmanager
def warnings_quiet() -> Iterator[None]:
    """Without Optuna's notes that heartbeats are experimental and meant for Study.optimize: the
    sweeper silences them too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        yield


@contextlib.contextmanager
def pgpass(path: Path) -> Iterator[None]:
    """The stack's password file, where libpq looks for it, for the block."""
    before = os.environ.get("PGPASSFILE")
    os.environ["PGPASSFILE"] = str(path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PGPASSFILE"]
        else:
            os.environ["PGPASSFILE"] = before


def process_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and every process under it, the ended ones its parents reaped
    included (PostgreSQL's backends of closed connections, MLflow's workers)."""
    children, stats = {}, {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (proc / "stat").read_text().rpartition(")")[2].split()
                stats[int(proc.name)] = sum(int(f) for f in fields[11:15]) * CPU_TICK_S  # utime stime cutime cstime
                children.setdefault(int(fields[1]), []).append(int(proc.name))
    tree, total = [pid], 0.0
    while tree:
        here = tree.pop()
        total += stats.get(here, 0.0)
        tree.extend(children.get(here, []))
    return total


def measure(url: str, study_name: str, sizes: tuple[int, ...], repeats: int, db_pid: int, seed: int = 0,
            on_size: Callable[[int], None] = lambda n: None) -> dict[int, dict]:
    """At each of ``sizes``: the study filled to that many finished trials, then ``repeats`` trials run
    through the product's calls (:func:`one_trial`); the medians per call, the database server's CPU
    seconds per trial (``db_pid``: its postmaster), and how long filling took."""
    space, pruner, sampler_config, checks = search_config()
    search = OmegaConf.load(SWEEPER_CONF / "search.yaml")
    storage = jobs.open_storage(url, search.heartbeat_interval, search.grace_period)
    study, _ = sweeper.open_study(storage, study_name, ["maximize"], pruner)
    study.sampler = instantiate(sampler_config)  # the sweeper's sampler, as search.yaml configures it
    rng = np.random.default_rng(seed)
    results = {}
    for n in sizes:
        on_size(n)
        start = time.perf_counter()
        fill(study, n, space, checks, rng)
        filled_s = time.perf_counter() - start
        study.get_trials(deepcopy=False)  # the sweeper's study, warm as in a running sweep
        calls, cpu = Calls(), process_cpu(db_pid)
        with counting(calls):
            for _ in range(repeats):
                one_trial(study, storage, url, space, pruner, checks, calls)
        results[n] = {"calls": calls.medians(), "fill_s": filled_s, "reports": len(percents(EPOCHS, checks)),
                      "db_cpu_s": (process_cpu(db_pid) - cpu) / repeats, "db_cpu_tick_s": CPU_TICK_S / repeats,
                      "heartbeat_s": search.heartbeat_interval,
                      "trials": len(study.get_trials(deepcopy=False))}
    storage.engine.dispose()
    return results


def per_trial(calls: dict[str, dict[str, float]], reports: int, key: str) -> float:
    """One trial's total of ``key`` over the job's and the sweeper's calls: the first report, and the
    median report for each of the others."""
    total = sum(calls[name][key] for name in (*JOB_CALLS, *SWEEPER_CALLS) if name != "report")
    return total + (reports - 1) * calls["report"][key]


def tracking_cost(cfg, tracking_uri: str, server_pid: int, db_pid: int, repeats: int) -> dict[str, float]:
    """One trial's records on the tracking server, as the shared-stores section times them
    (:func:`~mnist_sweep.bench.inprocess.time_tracking`), with the HTTP requests they make, the
    server's CPU seconds (``server_pid``: the ``mlflow server`` process) and its database's
    (``db_pid``: the postmaster), each per trial."""
    import requests

    from mnist_sweep.bench.inprocess import time_tracking

    sent = []
    send = requests.Session.send

    def counted(session, request, **kwargs):
        sent.append(request.method)
        return send(session, request, **kwargs)

    cpu, db_cpu = process_cpu(server_pid), process_cpu(db_pid)
    with unittest.mock.patch.object(requests.Session, "send", counted):
        seconds = time_tracking({"server": (tracking_uri, None)}, cfg, repeats)["server"]
    trials = repeats + 1  # time_tracking records one more, untimed, as its warm-up
    return {"s": seconds, "requests": len(sent) / trials, "server_cpu_s": (process_cpu(server_pid) - cpu) / trials,
            "db_cpu_s": (process_cpu(db_pid) - db_cpu) / trials}
