"""Optuna studies shared by many workers: the sweeper that hands each job its trial, and the job's
side of that trial (heartbeat, intermediate reports, pruning, its result).

The study, not one invocation, is the unit of a sweep. Every ``python -m mnist_sweep -m`` on the
same storage and study name is one more worker of it, on this machine or another:

- the sweeper asks the study for a trial and launches a job with ``optuna.study=<name>
  optuna.trial=<number>``; the job opens the study through its storage (``hydra.sweeper.storage``,
  recorded in its Hydra config), reports to the trial, and tells the trial its result itself;
- while a trial runs, its process and its sweeper record heartbeats; a live worker fails trials
  whose heartbeat stopped (``fail_stale_trials``), and can re-queue them (``max_retry``);
- the sampler's seed is ``seed + the number of this worker's first trial``: one worker replays
  the same search from the same seed, and workers starting together draw different points.

The Hydra plugin (``hydra_plugins.mnist_sweep``) subclasses :class:`StudySweeperImpl`, which extends
hydra-optuna-sweeper's own implementation: its search-space syntax and config keys stay.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Protocol

import optuna
import sqlalchemy
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.trial import TrialState

from mnist_sweep import stores

log = logging.getLogger(__name__)

RUN_ID_ATTR = "mlflow_run_id"  # trial user attribute: the MLflow run that trained it
# Trials that count against the study-wide budget (max_trials): finished, or on their way.
BUDGETED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class StudyError(RuntimeError):
    """The study or trial a job was handed cannot be used; the message says why."""


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int = 0) -> optuna.storages.RDBStorage:
    """The study's database. With ``heartbeat_interval``, a trial whose heartbeat is older than
    ``grace_period`` seconds is failed by the next worker, and re-queued up to ``max_retry`` times."""
    with stores.lock(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: stable since 2.9
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=stores.engine_kwargs(url),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=(
                    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry) if max_retry else None
                ),
            )
        except sqlalchemy.exc.OperationalError as err:
            raise stores.StoreError(f"cannot reach the study's database {stores.redact(url)}: "
                                    f"{stores.one_line(err.orig)}") from None


def trial_id(trial: optuna.trial.BaseTrial) -> int:
    # Optuna keeps a trial's storage id private; heartbeats and storage reads are keyed by it.
    return trial._trial_id  # type: ignore[attr-defined]


class Heartbeat:
    """Records a heartbeat for ``trials`` every ``interval`` seconds while the block runs
    (Optuna's own heartbeat thread only runs inside ``Study.optimize``). No interval: no thread."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_ids: Iterable[int], interval: int | None):
        self.storage, self.trial_ids, self.interval = storage, list(trial_ids), interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            for trial in self.trial_ids:
                self.storage.record_heartbeat(trial)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.interval:
            self.stop.set()
            self.thread.join()


class JobTrial:
    """One job's handle on its trial: what it reports, whether it should stop, how it ended.

    Used as a context manager around training: heartbeats while inside; an exception that
    escapes fails the trial (a pruned or finished trial stays as it is).
    """

    def __init__(self, study: optuna.Study, number: int, storage: optuna.storages.RDBStorage,
                 heartbeat_interval: int | None):
        found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not found:
            raise StudyError(f"study {study.study_name!r} has no trial {number}")
        if found[0].state != TrialState.RUNNING:
            raise StudyError(f"trial {number} of study {study.study_name!r} is already {found[0].state.name}")
        self.study, self.number = study, number
        self.trial = optuna.trial.Trial(study, trial_id(found[0]))
        self.prunes = not isinstance(study.pruner, optuna.pruners.NopPruner)
        self.heartbeat = Heartbeat(storage, [trial_id(found[0])], heartbeat_interval)
        self.last_value: float | None = None

    def __enter__(self) -> JobTrial:
        self.heartbeat.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.heartbeat.__exit__()
        if kind is not None and not issubclass(kind, optuna.TrialPruned):
            self.study.tell(self.number, state=TrialState.FAIL, skip_if_finished=True)

    def attach(self, key: str, value: Any) -> None:
        self.trial.set_user_attr(key, value)

    def report(self, step: int, value: float) -> None:
        """Record ``value`` at ``step``; raise :class:`optuna.TrialPruned` if the pruner says stop."""
        self.trial.report(value, step)
        self.last_value = value
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.number} pruned at step {step} ({value:.4f})")

    def leads(self, value: float) -> bool:
        """Whether ``value`` is at least as good as every completed trial's (true before any): such a
        trial may end as the study's best, so it needs a model the registry can serve."""
        try:
            best = self.study.best_value
        except ValueError:  # no trial has completed yet
            return True
        return value >= best if self.study.direction == optuna.study.StudyDirection.MAXIMIZE else value <= best

    def complete(self, value: float) -> float:
        self.study.tell(self.number, value, skip_if_finished=True)
        return value

    def prune(self) -> float:
        """End the trial PRUNED; returns its last reported value (what Optuna records for it)."""
        self.study.tell(self.number, state=TrialState.PRUNED, skip_if_finished=True)
        return self.last_value if self.last_value is not None else 0.0


def join(study_name: str, number: int, storage_url: str | None, pruner: optuna.pruners.BasePruner,
         heartbeat_interval: int | None) -> JobTrial:
    """The job's handle on trial ``number`` of ``study_name``, as its sweeper handed it."""
    if not storage_url:
        raise StudyError("a study trial needs hydra.sweeper.storage: jobs reach the study through it")
    storage = open_storage(storage_url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
    except KeyError:
        raise StudyError(f"no study {study_name!r} in {stores.redact(storage_url)}") from None
    return JobTrial(study, number, storage, heartbeat_interval)


class Tracker(Protocol):
    """Where a sweep's results are mirrored (MLflow): called by the sweeper, so a failure in it
    ends the invocation with an error instead of Hydra's warning for a failed callback."""

    def open(self, study: optuna.Study, created: bool) -> None: ...

    def check(self, study: optuna.Study) -> None: ...  # before each batch: raise to stop the sweep

    def close(self, study: optuna.Study, results_file: str, interrupted: bool) -> None: ...


class StudySweeperImpl(OptunaSweeperImpl):
    """hydra-optuna-sweeper's sweeper, with the study as the unit of a sweep (see the module doc)."""

    def __init__(self, *, tracker: Tracker, pruner: optuna.pruners.BasePruner, heartbeat_interval: int | None,
                 grace_period: int | None, max_retry: int, max_trials: int | None, timeout: float | None,
                 **optuna_sweeper: Any) -> None:
        super().__init__(**optuna_sweeper)
        self.tracker, self.pruner = tracker, pruner
        self.heartbeat_interval, self.grace_period, self.max_retry = heartbeat_interval, grace_period, max_retry
        self.max_trials, self.timeout = max_trials, timeout
        self.seeded = False  # the sampler is rebuilt with this worker's seed at its first trial

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except (StudyError, stores.StoreError) as err:
            raise SystemExit(f"error: {err}") from None  # one line, as for a single run's errors

    def _sweep(self, arguments: list[str]) -> None:
        if not self.storage or not self.study_name:
            raise StudyError("a sweep needs hydra.sweeper.storage and hydra.sweeper.study_name: its jobs, and "
                             "other workers, reach the study through them (stores=server reads $OPTUNA_STORAGE)")
        space, fixed = self._search_space(arguments)
        storage = open_storage(self.storage, self.heartbeat_interval, self.grace_period, self.max_retry)
        study, created = self._open_study(storage)
        log.info("study %s in %s (%s, pruner %s)", study.study_name, stores.redact(self.storage),
                 "new" if created else f"{len(study.trials)} trials so far", type(self.pruner).__name__)
        self.tracker.open(study, created)
        results = f"{self.config.hydra.sweep.dir}/optimization_results.yaml"
        try:
            self._run_trials(study, storage, space, fixed)
        except BaseException:
            self._close_quietly(study, results)
            raise
        self._save_results(study, results)
        self.tracker.close(study, results, interrupted=False)

    def _close_quietly(self, study: optuna.Study, results: str) -> None:
        try:
            self.tracker.close(study, results, interrupted=True)
        except Exception as err:  # the error that stopped the sweep is the one to report
            log.error("could not close the sweep's tracking after the sweep stopped: %s", stores.one_line(err))

    def _search_space(self, arguments: list[str]) -> tuple[dict, dict]:
        """The distributions to search and the fixed overrides, as the plugin parses them."""
        self._process_searchspace_config()
        space, fixed = create_params_from_overrides([*self._parse_sweeper_params_config(), *arguments])
        space = {**(self.search_space_distributions or {}), **space}
        return {k: v for k, v in space.items() if k not in fixed}, fixed

    def _open_study(self, storage: optuna.storages.RDBStorage) -> tuple[optuna.Study, bool]:
        """The study, and whether this worker created it (exactly one worker does: the name is unique)."""
        kwargs = dict(study_name=self.study_name, storage=storage, pruner=self.pruner)
        try:
            return optuna.create_study(directions=self._get_directions(), **kwargs), True
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(**kwargs), False

    def _run_trials(self, study: optuna.Study, storage, space: dict, fixed: dict) -> None:
        with ctrl_c_remembered() as interrupted:
            self._run_batches(study, storage, space, fixed, interrupted)

    def _run_batches(self, study: optuna.Study, storage, space: dict, fixed: dict,
                     interrupted: threading.Event) -> None:
        deadline = time.monotonic() + self.timeout if self.timeout else math.inf
        todo = self.n_trials
        while todo > 0:
            if interrupted.is_set():  # a Ctrl-C that Python swallowed still stops the sweep, between trials
                raise KeyboardInterrupt
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since 2.9
                optuna.storages.fail_stale_trials(study)  # trials of dead workers: FAIL (and re-queued)
            self.tracker.check(study)
            size = min(todo, self.n_jobs, self._room(study))
            if size <= 0:
                log.info("the study holds hydra.sweeper.max_trials=%d trials: no more to start", self.max_trials)
                return
            if time.monotonic() >= deadline:
                log.info("hydra.sweeper.timeout=%ss reached: no more trials start", self.timeout)
                return
            trials = [self._ask(study, space, fixed) for _ in range(size)]
            overrides = [(*params, *_handover(study.study_name, trial.number)) for trial, params in trials]
            try:
                with Heartbeat(storage, [trial_id(t) for t, _ in trials], self.heartbeat_interval):
                    returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except BaseException:  # Ctrl-C or a launcher crash: these trials will not finish
                for trial, _ in trials:
                    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                raise
            self.job_idx += len(returns)
            self._record(study, storage, [t for t, _ in trials], returns)
            todo -= size

    def _room(self, study: optuna.Study) -> int | float:
        """How many more trials the study-wide budget allows (max_trials; unbounded without it)."""
        if self.max_trials is None:
            return math.inf
        return self.max_trials - len(study.get_trials(deepcopy=False, states=BUDGETED))

    def _ask(self, study: optuna.Study, space: dict, fixed: dict) -> tuple[optuna.trial.Trial, tuple[str, ...]]:
        """A new trial and its overrides. The first trial a worker asks for seeds its sampler with
        ``seed + that trial's number``: trial numbers are unique across workers, so no two workers
        share a seed, and a lone worker on a new study starts from ``seed`` itself."""
        with warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for Study.optimize; this loop records them itself
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trial = study.ask()
        if not self.seeded:
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

    def _record(self, study: optuna.Study, storage, trials: Sequence[optuna.trial.Trial],
                returns: Sequence[JobReturn]) -> None:
        """Tell each trial its result unless its job already did; stop past max_failure_rate."""
        failures = 0
        for trial, ret in zip(trials, returns):
            if storage.get_trial(trial_id(trial)).state != TrialState.RUNNING:
                pass  # its job told it (the usual case): the job knows whether it was pruned
            elif ret.status == JobStatus.COMPLETED and math.isfinite(float(ret.return_value)):
                study.tell(trial.number, float(ret.return_value), skip_if_finished=True)
            else:
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            if storage.get_trial(trial_id(trial)).state == TrialState.FAIL:
                failures += 1
                log.warning("trial %d failed: %s", trial.number, ret._return_value)
        if failures / len(returns) > self.max_failure_rate:
            log.error("%d of %d trials failed, above hydra.sweeper.max_failure_rate=%s",
                      failures, len(returns), self.max_failure_rate)
            for ret in returns:
                ret.return_value  # re-raises the job's own exception, with its traceback

    def _save_results(self, study: optuna.Study, path: str) -> None:
        """``optimization_results.yaml``, as the plugin writes it: the study's best so far."""
        try:
            best = study.best_trial
        except ValueError:  # no trial has completed yet
            results = {"name": "optuna", "best_params": {}, "best_value": None}
        else:
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info("best trial %d: %s = %s", best.number, best.params, best.value)
        OmegaConf.save(OmegaConf.create(results), path)


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


def _handover(study_name: str, number: int) -> tuple[str, str]:
    """The overrides that tell a job which trial it is (quoted: a study name may hold spaces)."""
    quoted = study_name.replace("\\", "\\\\").replace("'", "\\'")
    return f"optuna.study='{quoted}'", f"optuna.trial={number}"
