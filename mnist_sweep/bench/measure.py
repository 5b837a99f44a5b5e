"""The benchmark's sections: each runs its measurements, in the order the table was always made,
and hands back what it measured; ``report`` turns that into rows."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mnist_sweep import stack
from mnist_sweep.bench import classic, phases, report
from mnist_sweep.bench.inprocess import (time_augment, time_bare_fit, time_checkpoint, time_costs, time_system_metrics,
                                         time_tracking)
from mnist_sweep.bench.timers import (Stores, profile_run, server_stores, sqlite_stores, time_classic, time_imports,
                                      time_run, time_sweep, trial_overheads)

if TYPE_CHECKING:
    from omegaconf import DictConfig

SWEEP_TRIALS = 8  # per mode: 6 of them (not the first, not the last) give the per-trial overhead
# The throughput and shared-store sweeps: trials of one short, fixed size (a 1-epoch shallow run,
# a model the searches choose), so that trials/min and per-trial overhead compare; the sweeper
# searches the rest of its space.
SWEEP_PINS = ("model=shallow", "model.channels=16", "epochs=1", "augment=none")
# How the embedded stores' sweep runs its trials, by workers: one at a time, or joblib's processes
LAUNCHERS = {1: (), 2: ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2")}
COST_MEASUREMENTS = 20  # latency measurements of one model in a row: their spread is the metric's noise
DEADLINES = (300, 600)  # s: the deadline searches' hydra.sweeper.timeout (target: over within T + 60 s)
PARETO_S = 1200  # s: each Pareto search's budget, one per cost
ENOUGH_TRIALS = "hydra.sweeper.n_trials=100000"  # a search the budget ends, not its trial count
TEN_MINUTES = 600  # s: --search's budget, the README's `-m hydra.sweeper.timeout=600`
QUICK_BUDGET_S = 15  # s: --search's budget with --quick (at most 2 trials on the tiny data): a wide trial stops there
ASK_SIZES = (10, 40)  # trials in the study when --search times each sampler's ask: a 10-minute search's, and more
PRUNE_TRIALS = 10  # per pruner: enough past TPE's 6 random startup trials for pruning to matter
PRUNE_EPOCHS = 2   # a trial's length: pruning can save most of it


@dataclass(frozen=True)
class Bench:
    """What every section shares: where it writes, its config and stores, the caller's overrides."""

    out: Path
    stamp: str
    cfg: DictConfig  # the default config on the bench's stores with the caller's overrides
    stores: Stores  # the bench's own: <out>/mlflow.db, <out>/optuna.db
    user: tuple[str, ...]  # the caller's overrides: last in every command, so they win
    quick: bool
    repeats: int
    services: Path | None = None  # a running `make services` root to use, instead of servers of the bench's own

    def run_dir(self, name: str) -> str:
        return f"hydra.run.dir={self.out / 'runs' / f'{self.stamp}-{name}'}"

    def fresh(self, name: str) -> Stores:
        """A new, empty store, as a first run meets it."""
        return sqlite_stores(self.out / "fresh" / f"{self.stamp}-{name}")

    @property
    def n_trials(self) -> int:
        return 2 if self.quick else SWEEP_TRIALS


def say(what: str) -> None:
    print(f"bench: {what}", file=sys.stderr, flush=True)


def setup(out: Path, user: list[str], quick: bool, repeats: int, services: Path | None = None) -> Bench:
    """The bench's directory and config; untimed, the data verified and parsed once and the bench's
    store created (its schema takes seconds)."""
    from mnist_sweep import data, tracking
    from mnist_sweep.config import compose

    out.mkdir(parents=True, exist_ok=True)
    stores = sqlite_stores(out)
    cfg = compose([*stores.run_overrides, *user])
    data.prepare(Path(cfg.data.root), dict(cfg.data.md5))
    tracking.use_store(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.artifact_root)
    return Bench(out, datetime.now().strftime("%Y%m%d-%H%M%S"), cfg, stores, tuple(user), quick,
                 1 if quick else repeats, services)


def repeated_runs(bench: Bench, with_classic: bool, with_overhead: bool = True) -> dict:
    """Each repeat: the classic recipe, a run on the bench's store, and for the overhead rows one on
    a fresh store and the imports."""
    runs: dict = {"classic": [], "ours": [], "fresh": [], "imports": {"torch": [], "main": []}}
    experiment = bench.cfg.mlflow.experiment
    for i in range(bench.repeats):
        if with_classic:
            say(f"{i + 1}/{bench.repeats} classic recipe")
            runs["classic"].append(time_classic(str(bench.cfg.data.root), 1 if bench.quick else classic.EPOCHS))
        say(f"{i + 1}/{bench.repeats} python -m mnist_sweep{', existing and fresh store' if with_overhead else ''}")
        runs["ours"].append(time_run([bench.run_dir(str(i)), *bench.user], bench.stores, experiment))
        if not with_overhead:
            continue
        runs["fresh"].append(time_run([bench.run_dir(f"{i}-fresh"), *bench.user], bench.fresh(str(i)), experiment))
        for name, seconds in time_imports().items():
            runs["imports"][name].append(seconds)
    return runs


def time_to_target(bench: Bench) -> report.Rows:
    """Only the time to 99.0%: the classic recipe and ``python -m mnist_sweep``, alternating, as a
    full run times them (``--target``), and nothing a full run times beside them."""
    runs = repeated_runs(bench, with_classic=True, with_overhead=False)
    return report.target_rows(runs["classic"], runs["ours"])


def profiles(bench: Bench, keys: dict[str, phases.Key]) -> dict[str, dict]:
    say("python -m mnist_sweep under cProfile, existing and fresh store")
    return {kind: profile_run([bench.run_dir(name), *bench.user], stores,
                              bench.out / f"profile-{bench.stamp}-{kind}.prof", keys)
            for kind, name, stores in (("existing", "profile", bench.stores),
                                       ("fresh", "profile-fresh", bench.fresh("profile")))}


def bare_fits(bench: Bench) -> list[dict]:
    say("bare training loop")
    if torch.cuda.is_available():
        time_bare_fit(bench.cfg)  # warm-up: CUDA context, kernel selection and caches
    return [time_bare_fit(bench.cfg) for _ in range(bench.repeats)]


def model_costs(bench: Bench) -> dict:
    say("cost metrics of the default model, measured again and again")
    return time_costs(bench.cfg, 3 if bench.quick else COST_MEASUREMENTS)


CHECKPOINT_SAVES = 20  # of the default model's state: their median is the row


def checkpoint_saves(bench: Bench) -> dict:
    say("the default model's checkpoint, saved again and again")
    return time_checkpoint(bench.cfg, 3 if bench.quick else CHECKPOINT_SAVES)


def system_metrics(bench: Bench) -> dict:
    say("one-epoch runs with and without system metrics, alternating")
    return time_system_metrics(bench.cfg, bench.repeats)


def pinned(workers: int) -> list[str]:
    """A throughput sweep's arguments: its trials' fixed size, the threads each gets, no pruner."""
    return [*SWEEP_PINS, f"threads={2 // workers}", "hydra/sweeper/pruner=none"]


def throughput(bench: Bench, workers: int) -> dict:
    say(f"sweep with {workers} worker(s)")
    return time_sweep(f"bench-{bench.stamp}-{workers}w", pinned(workers), bench.stores, bench.out, bench.user,
                      bench.n_trials, launcher=LAUNCHERS[workers])


@contextlib.contextmanager
def servers(bench: Bench) -> Iterator[stack.Stack]:
    """The PostgreSQL and MLflow server under ``bench.services`` (``--services``: already running,
    left running; the bench's records go to databases and experiments of its own there), else
    :func:`own_stack`."""
    if bench.services is None:
        with own_stack() as running:
            yield running
    else:
        yield stack.start(bench.services)  # the running stack, as it runs


@contextlib.contextmanager
def own_stack() -> Iterator[stack.Stack]:
    """``make services``' PostgreSQL and MLflow server, of the bench's own, stopped at the end."""
    # Throwaway servers in a directory the user postgres can enter (as root, PostgreSQL runs as
    # postgres, and `out` may sit under a private directory such as /tmp/pytest-of-root)
    root = Path(tempfile.mkdtemp(prefix="mnist_sweep-bench-services-"))
    root.chmod(0o711)
    # free ports, two different ones: a user's `make services` may hold the default ones
    pg_port = stack.free_port()
    mlflow_port = next(port for port in iter(stack.free_port, None) if port != pg_port)
    try:
        yield stack.start(root, pg_port=pg_port, mlflow_port=mlflow_port)
    finally:
        stack.stop(root)
        shutil.rmtree(root, ignore_errors=True)


def shared_stores(bench: Bench) -> tuple[dict, dict] | str:
    """The throughput sweep on shared stores of the bench's own (stopped at the end) with 1 and 2
    worker processes, and the tracking cost; a one-line reason instead where PostgreSQL is not installed."""
    say("shared stores (PostgreSQL, MLflow server)")
    try:
        stack.postgres_bindir()
    except FileNotFoundError as err:
        return str(err)
    with servers(bench) as running:
        sweeps = {workers: time_sweep(f"bench-{bench.stamp}-shared-{workers}w", pinned(workers), server_stores(running),
                                      bench.out, bench.user, bench.n_trials, processes=workers)
                  for workers in (1, 2)}
        cfg = bench.cfg
        costs = time_tracking({"embedded": (cfg.mlflow.tracking_uri, cfg.mlflow.artifact_root),
                               "server": (running.tracking_uri, None)}, cfg, bench.repeats)
    return sweeps, costs


def study_growth(bench: Bench) -> dict | str:
    """The study's cost at each size (``growth.SIZES``; quick: ``QUICK_SIZES``) on a PostgreSQL of the
    bench's own, and one trial's cost to its tracking server; a one-line reason instead where
    PostgreSQL is not installed."""
    from mnist_sweep.bench import growth

    say("the study's cost as it grows (PostgreSQL, MLflow server)")
    try:
        stack.postgres_bindir()
    except FileNotFoundError as err:
        return str(err)
    with servers(bench) as running:
        postmaster = int((running.root / "pgdata" / "postmaster.pid").read_text().split()[0])
        with growth.pgpass(running.pgpass):
            study = growth.measure(running.optuna_storage, f"bench-{bench.stamp}-growth",
                                   growth.QUICK_SIZES if bench.quick else growth.SIZES, bench.repeats, postmaster,
                                   on_size=lambda n: say(f"study of {n} trials"))
        server = int((running.root / "mlflow.pid").read_text())
        tracking = growth.tracking_cost(bench.cfg, running.tracking_uri, server, postmaster, bench.repeats)
    return {"study": study, "tracking": tracking}


def pruning(bench: Bench) -> dict[str, dict]:
    """The same seeded search once per pruner (``--quick``: none and median, which prove the rows;
    tests/test_search.py runs each pruner option)."""
    searches = {}
    for pruner in report.PRUNERS[:2] if bench.quick else report.PRUNERS:
        say(f"search with pruner {pruner}")
        args = ["model=shallow", f"epochs={1 if bench.quick else PRUNE_EPOCHS}", f"hydra/sweeper/pruner={pruner}"]
        searches[pruner] = time_sweep(f"bench-{bench.stamp}-{pruner}", args, bench.stores, bench.out, bench.user,
                                      2 if bench.quick else PRUNE_TRIALS)
    return searches


def augment_epochs(bench: Bench) -> dict[str, dict]:
    from mnist_sweep.config import compose

    augments = {}
    for name in report.AUGMENTS:
        say(f"one epoch with augment={name}")
        augments[name] = time_augment(compose([*bench.stores.run_overrides, *bench.user, f"augment={name}"]))
    return augments


def overhead_and_more(bench: Bench, overhead_only: bool) -> report.Rows:
    """Everything but the search targets; with ``overhead_only``, the framework's overhead alone."""
    keys = phases.resolve()  # before anything runs: a phase naming a function that is gone fails here
    runs = repeated_runs(bench, with_classic=not overhead_only)
    profiled = None if bench.quick else profiles(bench, keys)  # two runs under cProfile: the quick bench's longest
    bare = bare_fits(bench)
    sweeps = {workers: throughput(bench, workers) for workers in ((1,) if overhead_only else (1, 2))}
    trials = trial_overheads(f"bench-{bench.stamp}-1w", bench.stores)
    rows = report.overhead_rows(runs["imports"], runs["ours"], runs["fresh"], bare, profiled, trials)
    rows |= (report.sweep_rows(sweeps) | report.cost_rows(model_costs(bench))
             | report.system_metrics_row(system_metrics(bench)) | report.checkpoint_row(checkpoint_saves(bench), bare))
    if overhead_only:
        return rows
    shared, searches, augments = shared_stores(bench), pruning(bench), augment_epochs(bench)
    return (rows | report.target_rows(runs["classic"], runs["ours"]) | report.shared_rows(shared, sweeps[1])
            | report.pruning_rows(searches) | report.gpu_row(bare) | report.augment_rows(augments))


def soak(bench: Bench) -> tuple[list[str], object]:
    """``make soak`` at its default size (``--quick``: 6 trials, 2 workers, one fault of each kind),
    in a directory of the bench's own, on the bench's data; its violations and figures."""
    from mnist_sweep import soak as soak_

    say("soak (3 workers, faults injected)")
    plan = (soak_.Plan(trials=6, workers=2, rounds=1, first=5, every=5, server_workers=1) if bench.quick
            else soak_.Plan())
    data = [o for o in bench.user if o.startswith("data.")]
    parent = Path(tempfile.mkdtemp(prefix="mnist_sweep-bench-soak-"))  # as own_stack's: postgres enters it
    parent.chmod(0o711)
    try:
        return soak_.soak(parent / "soak", plan, data, say=say)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def ten_minute_search(bench: Bench, sampler: str, prior: str, seed: int) -> dict:
    """The default search with ``sampler`` and ``prior`` (options of hydra/sweeper/sampler and /prior),
    its sampler seeded with ``seed``, for ``TEN_MINUTES`` (--quick: 2 trials on the tiny data), spawn
    to exit; with the seed, and its first trial at ``report.FLOOR``."""
    name = f"bench-{bench.stamp}-{sampler}-{prior}-{seed}"
    args = [f"hydra/sweeper/sampler={sampler}", f"hydra/sweeper/prior={prior}", f"hydra.sweeper.sampler.seed={seed}",
            f"hydra.sweeper.timeout={QUICK_BUDGET_S if bench.quick else TEN_MINUTES}", ENOUGH_TRIALS]
    say(f"the 10-minute search, sampler {sampler}, prior {prior}, seed {seed}")
    started = datetime.now()  # as Optuna stamps trials: local time
    run = time_sweep(name, args, bench.stores, bench.out, bench.user, 2 if bench.quick else None)
    return run | {"seed": seed} | first_reaching(name, bench.stores, started, report.FLOOR)


def first_reaching(study_name: str, stores: Stores, started: datetime, floor: float) -> dict:
    """The first trial to finish at ``floor`` or above (finished as ``trial.best_finished`` counts:
    completed, or stopped by the deadline and scored as it stood): its number and its seconds from
    ``started`` (the sweep's spawn); None for both when none did."""
    import optuna

    from mnist_sweep.trial import DEADLINE_ATTR

    trials = optuna.load_study(study_name=study_name, storage=stores.optuna_storage).get_trials(
        deepcopy=False, states=[optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED])
    reached = [t for t in trials if (t.state == optuna.trial.TrialState.COMPLETE or DEADLINE_ATTR in t.user_attrs)
               and t.value >= floor]
    first = min(reached, key=lambda t: t.datetime_complete, default=None)
    if first is None:
        return {"floor_trial": None, "to_floor_s": None}
    return {"floor_trial": first.number, "to_floor_s": (first.datetime_complete - started).total_seconds()}


def sampler_asks(bench: Bench) -> dict[str, dict[int, list[float]]]:
    """Each of ``report.SAMPLERS``' ask, in this process, on a study of synthetic finished trials of
    the default search (``growth.fill``, in a sqlite file of the bench's) at each of ``ASK_SIZES``:
    ``--repeats`` asks a size, seconds each."""
    import numpy as np
    import optuna
    from hydra.utils import instantiate

    from mnist_sweep.bench import growth
    from mnist_sweep.config import compose

    space, _, _, checks = growth.search_config()
    storage = f"sqlite:///{bench.out / f'asks-{bench.stamp}.db'}"
    asks: dict[str, dict[int, list[float]]] = {}
    for name in report.SAMPLERS:
        say(f"the {name} sampler's ask at {' and '.join(map(str, ASK_SIZES))} trials")
        sampler = instantiate(compose([f"hydra/sweeper/sampler={name}"], with_hydra=True).hydra.sweeper.sampler)
        study = optuna.create_study(study_name=f"asks-{name}", storage=storage, direction="maximize", sampler=sampler)
        rng, asks[name] = np.random.default_rng(0), {}
        for size in ASK_SIZES:
            growth.fill(study, size, space, checks, rng)
            asks[name][size] = [time_ask(study, space) for _ in range(bench.repeats)]
    return asks


def time_ask(study, space: dict) -> float:
    """Seconds of one ask as the sweeper makes it (the trial, then its params), the trial then failed:
    no sampler learns from a failed trial, so the next ask meets the same study."""
    import optuna

    start = time.perf_counter()
    trial = study.ask()
    for name, distribution in space.items():
        trial._suggest(name, distribution)  # as the plugin's _configure_trials does
    seconds = time.perf_counter() - start
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return seconds


def sampler_searches(bench: Bench) -> report.Rows:
    """``--search``: the 10-minute default search with each of ``report.SAMPLERS``, and the default
    sampler with ``report.PRIOR``, over ``--repeats`` seeds from search.yaml's (seed after seed, each
    seed's configurations one after the other, so drift on the machine reaches them alike). Without
    a prior, the default sampler's runs serve both its row and the prior's comparison."""
    from mnist_sweep.config import compose

    hydra = compose([*bench.stores.run_overrides, *bench.user], with_hydra=True).hydra
    default = (hydra.runtime.choices["hydra/sweeper/sampler"], hydra.runtime.choices["hydra/sweeper/prior"])
    samplers = [default[0]] if bench.quick else report.SAMPLERS  # --quick: proves the comparison, not each sampler
    configurations = dict.fromkeys([*((sampler, "none") for sampler in samplers), (default[0], report.PRIOR)])
    runs: dict[tuple[str, str], list[dict]] = {configuration: [] for configuration in configurations}
    asks = sampler_asks(bench)  # first: a minute, where a sampler that fails does so before hours of searches
    for seed in range(hydra.sweeper.sampler.seed, hydra.sweeper.sampler.seed + bench.repeats):
        for sampler, prior in configurations:
            runs[(sampler, prior)].append(ten_minute_search(bench, sampler, prior, seed))
    return report.search_rows(runs, default) | report.ask_rows(asks)


def search_targets(bench: Bench) -> report.Rows:
    """``--long-search``: each of ``report.SEARCHES``, one after the other, as its target row."""
    rows = {}
    for i, (name, (search, target)) in enumerate(report.SEARCHES.items()):
        if bench.quick:  # 2 trials of 1 epoch; the tiny data has 320 training images, not 60,000
            search = [a.replace("data.val_size=5000", "data.val_size=64") for a in search] + ["epochs=1"]
        say(f"search {' '.join(search)}")
        run = time_sweep(f"bench-{bench.stamp}-search-{i}", search, bench.stores, bench.out, bench.user,
                         2 if bench.quick else None)
        on_val = any(a.startswith("data.val_size=") for a in search)
        rows[f"search target: {name}"] = report.search_target_text(run, target, on_val)
    return rows


def shipping(bench: Bench) -> dict:
    """The model a user would ship: the default search against a deadline of each of ``DEADLINES``
    and, for the longest, with today's soft budget (``finish_running=true``); then a Pareto search
    of ``PARETO_S`` per cost (``sweep.cost``), beside the default model's own costs."""
    from hydra.utils import instantiate

    from mnist_sweep import costs
    from mnist_sweep.config import COSTS

    budgets, pareto_s = ((20,), 30) if bench.quick else (DEADLINES, PARETO_S)  # --quick: the tiny data
    runs = {}
    for budget, soft in [*((b, False) for b in budgets), (budgets[-1], True)]:
        name = f"{'soft' if soft else 'deadline'}-{budget}"
        say(f"the default search with a {'soft budget' if soft else 'deadline'} of {budget} s")
        args = [f"hydra.sweeper.timeout={budget}", ENOUGH_TRIALS, *(["hydra.sweeper.finish_running=true"] * soft)]
        runs[name] = time_sweep(f"bench-{bench.stamp}-{name}", args, bench.stores, bench.out,
                                bench.user) | {"budget": budget}
    for cost in COSTS:
        say(f"a Pareto search of test_acc against {cost} for {pareto_s} s")
        args = ["hydra/sweeper=pareto", f"sweep.cost={cost}", f"hydra.sweeper.timeout={pareto_s}", ENOUGH_TRIALS]
        runs[f"pareto-{cost}"] = time_sweep(f"bench-{bench.stamp}-pareto-{cost}", args, bench.stores, bench.out,
                                            bench.user) | {"budget": pareto_s}
    default = instantiate(bench.cfg.model).eval()  # its costs do not depend on its training
    runs["default"] = {"model": f"{bench.cfg.model.channels}", "param_count": costs.param_count(default),
                       "latency_ms": costs.latency_ms(default, torch.full((1, 1, 28, 28), 128.0)).median_ms}
    return runs
