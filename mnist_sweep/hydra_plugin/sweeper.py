"""The study sweeper (``hydra/sweeper=study``, conf/hydra/sweeper/search.yaml): hydra-optuna-sweeper
with the study as the unit of a sweep.

Every ``python -m mnist_sweep -m`` on the same storage and study name is one more worker of the
study, on this machine or another. In batches of ``n_jobs`` it asks the study for trials, launches
a job for each (``optuna.study=<name> optuna.trial=<number>``, and with ``timeout`` the sweep's
deadline, ``optuna.deadline=<Unix time>``: the job reports to its trial itself and stops at the
deadline, see :mod:`mnist_sweep.trial`), and records what a job could not tell its trial. Between batches it
fails the trials of dead workers (no heartbeat) and keeps to the budgets. The sampler's seed is
``seed + the number of this worker's first trial``: one worker replays the same search from the same
seed, and workers starting together draw different points. Points given with ``enqueue`` or taken
from another study (``warm_start``) are evaluated first. Its search-space syntax and config keys
are hydra-optuna-sweeper's, plus the ones in :class:`mnist_sweep.config.StudySweeperConfig`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import optuna
import sqlalchemy.orm
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import OverrideParseException
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution,
                                  distribution_to_json, json_to_distribution)
from optuna.trial import TrialState

from mnist_sweep import stores
from mnist_sweep.cli import one_line_errors
from mnist_sweep.config import ConfigError
from mnist_sweep.registry import selection_metric
from mnist_sweep.trial import (FAILURE_ATTR, WORKER_ATTR, Heartbeat, JobEnded, PatientStorage, StudyError,
                               best_finished, ctrl_c_after_the_call, open_storage, trial_id, worker_gone)

log = logging.getLogger("mnist_sweep.sweeper")

# Trials that count against the study-wide budget (max_trials): finished, or on their way.
BUDGETED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class Tracker(Protocol):
    """Where a sweep's results are mirrored (MLflow): called by the sweeper, so a failure in it
    ends the invocation with an error instead of Hydra's warning for a failed callback."""

    def open(self, study: optuna.Study, created: bool) -> None: ...

    def check(self, study: optuna.Study) -> None: ...  # before each batch: raise to stop the sweep

    def close(self, study: optuna.Study, results_file: str, interrupted: bool) -> None: ...


class StudySweeper(OptunaSweeperImpl):
    """``hydra/sweeper=study``: hydra-optuna-sweeper's sweeper, with the study as the unit of a sweep."""

    def __init__(self, *, tracker: Tracker, pruner: optuna.pruners.BasePruner, heartbeat_interval: int | None,
                 grace_period: int | None, max_retry: int, max_trials: int | None, timeout: float | None,
                 finish_running: bool, enqueue: Sequence[Any], warm_start: Any, **optuna_sweeper: Any) -> None:
        super().__init__(**optuna_sweeper)
        self.tracker, self.pruner = tracker, pruner
        self.heartbeat_interval, self.grace_period, self.max_retry = heartbeat_interval, grace_period, max_retry
        self.max_trials, self.timeout, self.finish_running = max_trials, timeout, finish_running
        self.enqueue = [OmegaConf.to_container(point) if OmegaConf.is_config(point) else point for point in enqueue]
        self.warm_start = warm_start
        self.seeded = False  # the sampler is rebuilt with this worker's seed at its first trial

    def sweep(self, arguments: list[str]) -> None:
        config = self.config
        writes = stores.written(config.paths.outputs, config.mlflow.tracking_uri, config.mlflow.artifact_root,
                                self.storage, config.hydra.sweep.dir)
        with (one_line_errors(StudyError, stores.StoreError, ConfigError, writes=writes),
              stores.answering("the study's database", self.storage or "")):  # a restart mid-sweep: one line
            if not self.storage or not self.study_name:
                raise StudyError("a sweep needs hydra.sweeper.storage and hydra.sweeper.study_name: its jobs, and "
                                 "other workers, reach the study through them (stores=server reads $OPTUNA_STORAGE)")
            deadline = time.time() + self.timeout if self.timeout else math.inf  # wall clock: jobs elsewhere read it
            space, fixed = self._search_space(arguments)
            storage = open_storage(self.storage, self.heartbeat_interval, self.grace_period, self.max_retry,
                                   config.outage_s)
            points = [*self.enqueue, *best_points(storage, self.warm_start.study, self.warm_start.top)]
            check_points(points, space)  # before the study exists or any trial starts
            directions, pruner = self._get_directions(), self.pruner
            if len(directions) > 1:
                log.info("a Pareto search (%s, then %s): pruning is off, as Optuna's pruners judge one objective",
                         selection_metric(config.data.val_size > 0), config.sweep.cost)
                pruner = optuna.pruners.NopPruner()
            study, created = open_study(storage, self.study_name, directions, pruner)
            if created:  # the dashboard and the plots name them, not "Objective 0"
                name_metrics(study, [selection_metric(config.data.val_size > 0), config.sweep.cost])
            log.info("study %s in %s (%s, sampler %s, pruner %s)", study.study_name, stores.redact(self.storage),
                     "new" if created else f"{len(study.trials)} trials so far", type(self.sampler).__name__,
                     type(self.pruner).__name__)
            with stores.lock(self.storage):  # two workers starting together enqueue each point once
                enqueue(study, points)
            self.tracker.open(study, created)
            results = f"{self.config.hydra.sweep.dir}/optimization_results.yaml"
            try:
                with ctrl_c_remembered() as interrupted:
                    self._run_batches(study, storage, space, fixed, interrupted, deadline)
            except BaseException:
                close_quietly(self.tracker, study, results)
                raise
            fail_abandoned(study, storage)  # the last worker to end leaves no trial of this host RUNNING
            save_results(study, results)
            self.tracker.close(study, results, interrupted=False)

    def _search_space(self, arguments: list[str]) -> tuple[dict, dict]:
        """The distributions to search (Optuna 5's classes) and the fixed overrides, as the plugin parses them."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the plugin's optuna 2 classes: converted below
            self._process_searchspace_config()  # (the deprecated hydra.sweeper.search_space's, if any)
        space, fixed = parse_space([*self._parse_sweeper_params_config(), *arguments])
        space = {**{k: current(v) for k, v in (self.search_space_distributions or {}).items()}, **space}
        return {k: v for k, v in space.items() if k not in fixed}, fixed

    def _to_grid_sampler_choices(self, distribution: BaseDistribution) -> Any:
        """The values a grid sampler tries for ``distribution``: the plugin's, for Optuna 5's classes
        (the plugin knows only optuna 2's)."""
        if isinstance(distribution, CategoricalDistribution):
            return list(distribution.choices)
        stepped = isinstance(distribution, (FloatDistribution, IntDistribution)) and distribution.step
        if stepped and not distribution.log:
            steps = int((distribution.high - distribution.low) // distribution.step)
            return [distribution.low + i * distribution.step for i in range(steps)]
        raise ValueError("GridSampler only supports discrete distributions.")

    def _run_batches(self, study: optuna.Study, storage: optuna.storages.RDBStorage, space: dict, fixed: dict,
                     interrupted: threading.Event, deadline: float) -> None:
        # the jobs stop where they are at the deadline, unless finish_running keeps them to their end
        job_deadline = None if self.finish_running or math.isinf(deadline) else deadline
        todo = self.n_trials
        while todo > 0:
            if interrupted.is_set():  # a Ctrl-C that Python swallowed still stops the sweep, between trials
                raise KeyboardInterrupt
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since 2.9
                optuna.storages.fail_stale_trials(study)  # trials of dead workers: FAIL (and re-queued)
            fail_abandoned(study, storage)  # those whose job on this host is gone: at once
            self.tracker.check(study)
            size, why_none = next_batch(todo, self.n_jobs, room(study, self.max_trials), deadline, time.time())
            if not size:
                log.info("%s", why_none.format(max_trials=self.max_trials, timeout=self.timeout))
                return
            trials: list[tuple[optuna.trial.Trial, tuple[str, ...]]] = []
            try:
                # Ctrl-C while the batch is asked lands once it is (a sampler's milliseconds; in a
                # database outage, up to outage_s): every trial asked is then failed below. Raised inside
                # an ask, it left that trial RUNNING for good, and the study's parent run with it
                with ctrl_c_after_the_call():
                    trials.extend(self._ask(study, storage, space, fixed) for _ in range(size))
                overrides = [(*params, *handover(study.study_name, trial.number, job_deadline))
                             for trial, params in trials]
                with Heartbeat(storage, [trial_id(t) for t, _ in trials], self.heartbeat_interval):
                    returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except BaseException as stop:  # Ctrl-C, a launcher crash, a job's one-line error: these trials end
                for trial, _ in trials:
                    if isinstance(stop, SystemExit) and storage.get_trial(trial_id(trial)).state == TrialState.RUNNING:
                        # its job stopped the sweep (a store gone, most likely): the trial may run again
                        fail_ended_job(study, storage, trial, f"its job stopped the sweep ({stop.code})")
                    else:
                        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                raise
            self.job_idx += len(returns)
            record_returns(study, storage, [t for t, _ in trials], returns, self.max_failure_rate)
            todo -= size

    def _ask(self, study: optuna.Study, storage: optuna.storages.BaseStorage, space: dict,
             fixed: dict) -> tuple[optuna.trial.Trial, tuple[str, ...]]:
        """A new trial and its overrides. The first trial a worker samples seeds its sampler with
        ``seed + that trial's number``: trial numbers are unique across workers, so no two workers
        share a seed, and a lone worker on a new study starts from ``seed`` itself. A queued point
        that fixes every param (``enqueue``, a prior, a retry) samples nothing: the trial after it
        seeds, so the sampler's first draw is not the one a prior's point already took."""
        with warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for Study.optimize; this loop records them itself
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trial = study.ask()
        queued = storage.get_trial_system_attrs(trial_id(trial)).get("fixed_params", {})
        if not self.seeded and not set(space) <= set(queued):
            study.sampler = self._sampler(trial.number, space)
            self.seeded = True
        (params,) = self._configure_trials([trial], space, fixed)
        return trial, params

    def _sampler(self, first_trial: int, space: dict) -> optuna.samplers.BaseSampler:
        config = self.config.hydra.sweeper.sampler
        if config.get("_partial_"):  # the grid sampler takes the search space
            return self.sampler({name: self._to_grid_sampler_choices(dist) for name, dist in space.items()})
        seed = config.get("seed")
        return instantiate(config) if seed is None else instantiate(config, seed=seed + first_trial)


def parse_space(overrides: list[str]) -> tuple[dict, dict]:
    """The distributions and the fixed values of ``overrides``, as the plugin parses them (the last
    override of a key wins), one at a time, each distribution as Optuna 5's class (:func:`current`):
    a range that Optuna or Hydra's grammar rejects is a :class:`ConfigError` that names it."""
    space, fixed = {}, {}
    for override in overrides:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the plugin's optuna 2 classes: converted below
                its_space, its_fixed = create_params_from_overrides([override])
        except (ValueError, OverrideParseException) as err:
            raise ConfigError(f"the search range {override} is one Optuna cannot search ({stores.one_line(err)}): "
                              "change it on the command line or in hydra.sweeper.params") from None
        its_space = {key: current(distribution) for key, distribution in its_space.items()}
        space = {k: v for k, v in space.items() if k not in its_fixed} | its_space  # a key is searched or fixed,
        fixed = {k: v for k, v in fixed.items() if k not in its_space} | its_fixed  # as its last override says
    return space, fixed


def current(distribution: BaseDistribution) -> BaseDistribution:
    """``distribution`` as Optuna 5 keeps it: FloatDistribution, IntDistribution or
    CategoricalDistribution. hydra-optuna-sweeper builds optuna 2's classes (UniformDistribution,
    IntUniformDistribution, ...: deprecated, gone in Optuna 6), each a subclass of one of the first
    two with the same range, log and step; a study that stored them warned at every load."""
    for kind in (FloatDistribution, IntDistribution):
        if isinstance(distribution, kind) and type(distribution) is not kind:
            return kind(distribution.low, distribution.high, log=distribution.log, step=distribution.step)
    return distribution


def upgrade_distributions(storage: PatientStorage, study_name: str) -> int:
    """Rewrite in Optuna 5's classes (:func:`current`) the params that study ``study_name`` holds in
    optuna 2's, as this sweeper wrote them through the plugin before: Optuna records no param of one
    class where the study holds another of the same name (``check_distribution_compatibility``), so
    the study could not continue otherwise. Each param's range, log and step stay as they were.
    Returns how many it rewrote."""
    from optuna.storages._rdb import models  # Optuna's tables: one query finds the study's old params

    def rewrite() -> int:
        with sqlalchemy.orm.Session(storage.engine) as session, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # reading the old classes, to convert them
            params = (session.query(models.TrialParamModel).join(models.TrialModel).join(models.StudyModel)
                      .filter(models.StudyModel.study_name == study_name,
                              models.TrialParamModel.distribution_json.like("%UniformDistribution%")).all())
            for param in params:
                param.distribution_json = distribution_to_json(current(json_to_distribution(param.distribution_json)))
            session.commit()
            return len(params)

    rewritten = storage.patiently(rewrite)
    if rewritten:
        log.info("study %s: %d params upgraded from optuna 2's distribution classes to Optuna 5's", study_name,
                 rewritten)
    return rewritten


def best_points(storage: PatientStorage, study_name: str | None, top: int) -> list[dict[str, Any]]:
    """The params of the ``top`` best completed trials of study ``study_name`` (``warm_start``; None:
    none), best first; a multi-objective study gives its Pareto front's first ``top``. A study that
    holds optuna 2's distribution classes is upgraded (:func:`upgrade_distributions`), as any this
    sweeper opens."""
    if study_name is None:
        return []
    try:
        upgrade_distributions(storage, study_name)
        source = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ConfigError(f"hydra.sweeper.warm_start.study={study_name}: no such study in the study's database; "
                          "name one on the same hydra.sweeper.storage") from None
    if len(source.directions) > 1:
        return [dict(t.params) for t in source.best_trials[:top]]
    done = source.get_trials(deepcopy=False, states=[TrialState.COMPLETE])
    best_first = sorted(done, key=lambda t: t.value, reverse=source.direction == optuna.study.StudyDirection.MAXIMIZE)
    return [dict(t.params) for t in best_first[:top]]


def check_points(points: Sequence[dict[str, Any]], space: dict[str, Any]) -> None:
    """Every point's keys are searched by ``space`` and its values lie in their ranges: else a
    :class:`ConfigError` that names the point and the key (Optuna would warn, and train it anyway)."""
    for number, point in enumerate(points):
        for key, value in point.items():
            where = f"enqueued point {number} ({point})"
            if key not in space:
                raise ConfigError(f"{where}: {key} is not in the search space ({', '.join(space)}): "
                                  "fix the point or hydra.sweeper.params")
            distribution = space[key]
            try:
                inside = distribution._contains(distribution.to_internal_repr(value))
            except (ValueError, TypeError):
                inside = False
            if not inside:
                raise ConfigError(f"{where}: {key}={value} is outside its search range {distribution}: fix the point "
                                  "or widen hydra.sweeper.params")


def enqueue(study: optuna.Study, points: Sequence[dict[str, Any]]) -> None:
    """Queue ``points`` to be the next trials asked (keys a point leaves out are sampled); a point the
    study already holds, finished or queued, is not queued again (a rerun of the same command)."""
    for point in points:
        study.enqueue_trial(point, skip_if_exists=True)
    if points:
        log.info("%d points queued first (hydra.sweeper.enqueue, hydra.sweeper.warm_start)", len(points))


def open_study(storage: PatientStorage, name: str, directions: list[str],
               pruner: optuna.pruners.BasePruner) -> tuple[optuna.Study, bool]:
    """The study, and whether this worker created it (exactly one worker does: the name is unique).
    A study that holds optuna 2's distribution classes is upgraded to Optuna 5's first."""
    try:
        return optuna.create_study(study_name=name, storage=storage, pruner=pruner, directions=directions), True
    except optuna.exceptions.DuplicatedStudyError:
        upgrade_distributions(storage, name)
        return optuna.load_study(study_name=name, storage=storage, pruner=pruner), False


def name_metrics(study: optuna.Study, names: list[str]) -> None:
    """The study's objectives by name: the objective accuracy, and in a Pareto search its cost."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # set_metric_names: since 3.2
        study.set_metric_names(names[:len(study.directions)])


def room(study: optuna.Study, max_trials: int | None) -> int | float:
    """How many more trials the study-wide budget allows: ``max_trials`` less the study's finished
    and running trials, whoever started them (unbounded without it)."""
    if max_trials is None:
        return math.inf
    return max_trials - len(study.get_trials(deepcopy=False, states=BUDGETED))


def next_batch(todo: int, n_jobs: int, room: int | float, deadline: float, now: float) -> tuple[int, str]:
    """How many trials the next batch starts, and when none, why (a template naming the budget)."""
    if room <= 0:
        return 0, "the study holds hydra.sweeper.max_trials={max_trials} trials: no more to start"
    if now >= deadline:
        return 0, "hydra.sweeper.timeout={timeout}s reached: no more trials start"
    return int(min(todo, n_jobs, room)), ""


def record_returns(study: optuna.Study, storage: optuna.storages.RDBStorage, trials: Sequence[optuna.trial.Trial],
                   returns: Sequence[JobReturn], max_failure_rate: float) -> None:
    """Tell each trial its job's result unless the job already did (the usual case: only the job
    knows whether it was pruned); a job that crashed, was ended by its scheduler, lost a store or
    returned no finite value fails its trial (the second and third re-queued). Past
    ``max_failure_rate`` of the batch, re-raise the first failed job's own exception."""
    failures = 0
    for trial, ret in zip(trials, returns):
        if storage.get_trial(trial_id(trial)).state != TrialState.RUNNING:
            pass
        elif ret.status == JobStatus.COMPLETED and all(map(math.isfinite, values(ret.return_value))):
            study.tell(trial.number, values(ret.return_value), skip_if_finished=True)
        elif isinstance(ret._return_value, JobEnded):
            fail_ended_job(study, storage, trial, str(ret._return_value))
        elif isinstance(ret._return_value, BaseException) and stores.gone(ret._return_value):
            # its job left it RUNNING (trial.JobTrial): another run may well succeed once the store is back
            fail_ended_job(study, storage, trial, f"its job lost a store: {stores.one_line(ret._return_value)}")
        else:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        if storage.get_trial(trial_id(trial)).state == TrialState.FAIL:
            failures += 1
            log.warning("trial %d failed: %s", trial.number, ret._return_value)
    if failures / len(returns) > max_failure_rate:
        log.error("%d of %d trials failed, above hydra.sweeper.max_failure_rate=%s",
                  failures, len(returns), max_failure_rate)
        for ret in returns:
            ret.return_value  # re-raises the job's own exception, with its traceback


def values(returned: Any) -> list[float]:
    """A job's return as the study's values: one float, or a Pareto search's [accuracy, cost]."""
    return [float(v) for v in returned] if isinstance(returned, (list, tuple)) else [float(returned)]


def fail_ended_job(study: optuna.Study, storage: optuna.storages.RDBStorage, trial: optuna.trial.Trial,
                   reason: str) -> None:
    """Fail a trial whose job its scheduler ended (or that lost a store), with the reason on the
    trial (its MLflow run takes it when the sweep's tracking closes), and re-queue it as a dead
    worker's trial is re-queued, up to ``hydra.sweeper.max_retry`` times."""
    try:
        storage.set_trial_user_attr(trial_id(trial), FAILURE_ATTR, reason)
        # the row is locked while its state changes: of two workers failing it at once, one does
        storage.set_trial_state_values(trial_id(trial), TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it, and re-queued it, first
        return
    retry = storage.get_heartbeat_stale_trial_callback()  # trial.requeue, with max_retry
    if retry is not None:
        retry(study, storage.get_trial(trial_id(trial)))


def fail_abandoned(study: optuna.Study, storage: optuna.storages.RDBStorage) -> None:
    """Fail at once the running trials whose job ran on this host and is gone (killed with kill -9,
    crashed), with the reason on the trial, and re-queue them as a dead worker's trials are; a trial
    whose job ran elsewhere waits for its heartbeat to go stale (``hydra.sweeper.grace_period``)."""
    for trial in study.get_trials(deepcopy=False, states=[TrialState.RUNNING]):
        if worker_gone(trial):
            worker = trial.user_attrs[WORKER_ATTR]
            reason = f"its job (process {worker['pid']} on {worker['host']}) ended mid-trial: killed, or crashed"
            log.warning("trial %d: %s; the study fails it", trial.number, reason)
            fail_ended_job(study, storage, trial, reason)


def save_results(study: optuna.Study, path: str) -> None:
    """``optimization_results.yaml``, as the plugin writes it: the study's best so far."""
    best = best_finished(study)
    if best is None:
        results = {"name": "optuna", "best_params": {}, "best_value": None}
    else:
        value = best.values if len(best.values) > 1 else best.value  # a Pareto search's: [accuracy, cost]
        results = {"name": "optuna", "best_params": best.params, "best_value": value}
        log.info("best trial %d: %s = %s", best.number, best.params, value)
    OmegaConf.save(OmegaConf.create(results), path)


def close_quietly(tracker: Tracker, study: optuna.Study, results: str) -> None:
    """Close the tracking of a sweep that stopped: the error that stopped it is the one to report."""
    try:
        tracker.close(study, results, interrupted=True)
    except Exception as err:  # noqa: BLE001 - logged, then the stopping error goes on
        log.error("could not close the sweep's tracking after the sweep stopped: %s", stores.one_line(err))


@contextlib.contextmanager
def ctrl_c_remembered() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt as usual, and is also remembered: Python drops the exception
    when it lands in a garbage-collector callback ("Exception ignored in ..."), which a long sweep
    meets sooner or later, and the sweep must stop anyway."""
    interrupted = threading.Event()

    def on_ctrl_c(signum: int, frame: object) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def handover(study_name: str, number: int, deadline: float | None = None) -> tuple[str, ...]:
    """The overrides that tell a job which trial it is (quoted: a study name may hold spaces), and
    the sweep's deadline (Unix time: a job on another machine reads the same clock, NTP-synchronised)."""
    quoted = study_name.replace("\\", "\\\\").replace("'", "\\'")
    return (f"optuna.study='{quoted}'", f"optuna.trial={number}",
            *([f"optuna.deadline={deadline:.3f}"] if deadline is not None else []))
