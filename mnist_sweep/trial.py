"""A job's side of its study trial: which trial it is, what it reports, whether it should stop,
how it ends.

The study, not one invocation, is the unit of a sweep (the sweeper: ``hydra_plugins.mnist_sweep``).
The sweeper asks the study for a trial and launches a job with ``optuna.study=<name>
optuna.trial=<number>``; the job opens the study through its storage (``hydra.sweeper.storage``, in
its Hydra config), reports to the trial, and tells the trial its result itself. While a trial runs,
its process and its sweeper record heartbeats, so a live worker can fail the trials of dead ones.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from types import SimpleNamespace, TracebackType
from typing import TypeVar

import optuna
import sqlalchemy
import sqlalchemy.orm
from optuna.trial import TrialState

from mnist_sweep import stores

log = logging.getLogger(__name__)
T = TypeVar("T")

RUN_ID_ATTR = "mlflow_run_id"  # trial user attribute: the MLflow run that trained it
PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute: the study's MLflow parent run
FAILURE_ATTR = "failure"  # trial user attribute: why it failed, where its job could not say (it was ended)
WORKER_ATTR = "worker"  # trial user attribute: the host and process id of the job that runs it
DEADLINE_ATTR = "deadline"  # trial user attribute: where the sweep's deadline stopped it (a PRUNED trial)


class StudyError(RuntimeError):
    """The study or trial a job was handed cannot be used; the message says why."""


class DeadlineReached(optuna.TrialPruned):
    """The sweep's deadline (``hydra.sweeper.timeout``) passed while the trial trained: it stops
    where it is and ends as a pruned trial does. ``done``: the epochs it trained (2.5: half of the third)."""

    def __init__(self, message: str, done: float):
        super().__init__(message)
        self.done = done


class Requeued(SystemExit):
    """The scheduler signalled the job to stop before its time limit or a pre-emption, and requeued it
    (hydra/launcher=slurm): the job ends here, its run KILLED, its trial still RUNNING; the requeued
    job joins the same trial and continues its run from the last epoch's checkpoint."""


class JobEnded(RuntimeError):
    """A scheduler ended a trial's job before the job could tell its trial (cancelled, out of
    time, its node lost); the message says why. The launcher returns it as the job's failure."""


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int = 0, outage_s: float = 0, answered: bool = False) -> PatientStorage:
    """The study's database. With ``heartbeat_interval``, a trial whose heartbeat is older than
    ``grace_period`` seconds is failed by the next worker, and re-queued up to ``max_retry`` times.
    Its calls ride out an outage of a database server shorter than ``outage_s``; opening it does too
    if it ``answered`` this worker before (a job's sweeper reached it), where a database that never
    answered is an error at once."""

    def connect() -> PatientStorage:
        with stores.lock(url):
            stores.write_ahead(url)
            return PatientStorage(
                url,
                engine_kwargs=stores.engine_kwargs(url),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=functools.partial(requeue, max_retry=max_retry) if max_retry else None,
                outage_s=outage_s,
            )

    with stores.opening("the study's database", url, "optuna.storage"), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: stable since 2.9
        return stores.ride_out(connect, "the study's database", url, outage_s if answered else 0)


_CALLING = threading.local()  # a call made inside a patient call (Optuna's calls nest) waits in the outer one only


@contextlib.contextmanager
def ctrl_c_after_the_call() -> Iterator[None]:
    """Ctrl-C during a call to the study's database is raised when the call has ended. Raised inside
    SQLAlchemy's commit, or its return of the connection to the pool, it once left SQLite's write lock
    held: every later call of the process (the interrupted trial's FAIL, the sweeper's) met "database
    is locked", and the trial stayed RUNNING. Only the main thread receives Ctrl-C."""
    previous = signal.getsignal(signal.SIGINT)  # Python's KeyboardInterrupt, or the sweeper's own handler
    if (threading.current_thread() is not threading.main_thread() or getattr(_CALLING, "holding", False)
            or not callable(previous)):  # ignored, or the system's default: nothing to hold
        yield
        return
    pressed: list[object] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(frame))
    _CALLING.holding = True
    try:
        yield
    finally:
        _CALLING.holding = False
        signal.signal(signal.SIGINT, previous)
        if pressed:
            previous(signal.SIGINT, pressed[0])


class PatientStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose every call rides out an outage of its database shorter than
    ``outage_s`` (:func:`stores.ride_out`): a restart of the database server costs the sweeper and
    its jobs a wait, not their trials. Optuna's calls each read or write in one transaction, which a
    database that went away rolled back: a call tried again does its work once."""

    def __init__(self, url: str, *, outage_s: float = 0, **kwargs: object):
        self.outage_s = outage_s
        self.back_at = -math.inf  # (monotonic) when it last answered again after an outage
        super().__init__(url, **kwargs)

    def patiently(self, call: Callable[..., T], *args: object, **kwargs: object) -> T:
        """``call(*args, **kwargs)``, riding out an outage of this database (any query on its engine)."""
        if getattr(_CALLING, "now", False) or not self.outage_s:
            with ctrl_c_after_the_call():
                return call(*args, **kwargs)
        failed = []

        def attempt() -> T:
            try:
                with ctrl_c_after_the_call():  # not its waits: Ctrl-C ends a wait for the database at once
                    return call(*args, **kwargs)
            except Exception as err:
                if stores.gone(err):
                    failed.append(err)
                raise

        _CALLING.now = True
        try:
            return stores.ride_out(attempt, "the study's database", self.url, self.outage_s)
        finally:
            _CALLING.now = False
            if failed:
                self.back_at = time.monotonic()

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # A live trial's heartbeat that an outage held up, as it held up this worker's calls, lands
        # within an interval (and a pause of its own patience) after the database answers again:
        # until then (this very read may have waited for it), a trial whose heartbeat looks stale may be alive
        stale = self.patiently(super()._get_stale_trial_ids, study_id)
        return [] if time.monotonic() - self.back_at < (self.heartbeat_interval or 0) + stores.MAX_PAUSE_S else stale


def _patient(name: str) -> Callable[..., object]:
    call = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(call)
    def patient(self: PatientStorage, *args: object, **kwargs: object) -> object:
        return self.patiently(call, self, *args, **kwargs)

    return patient


# Every call of Optuna's storage API that reaches the database (the rest only read the storage's settings)
for _name in [*(n for n in vars(optuna.storages.BaseStorage) if not n.startswith("_")), "record_heartbeat"]:
    if _name not in ("remove_session", "check_trial_is_updatable"):
        setattr(PatientStorage, _name, _patient(_name))


def requeue(study: optuna.Study, failed: optuna.trial.FrozenTrial, max_retry: int) -> None:
    """Queue a failed trial's params again, at most ``max_retry`` times for one set of params,
    with Optuna's retry history (``failed_trial``, ``retry_history``). The retry is asked as an
    enqueued trial is: its params fixed, suggested with the sweeper's distributions. Optuna's own
    RetryHeartbeatStaleTrialCallback would record the params now that the study holds Optuna 5's
    distribution classes, but it copies the failed trial's user attributes onto the retry: its
    worker's host and pid (a worker on that host would fail the retry at once, its "job" gone,
    before the retry's own job records itself), its MLflow run and why it failed."""
    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    if len(history) > max_retry:
        return
    attrs = {"fixed_params": failed.params, "failed_trial": history[0], "retry_history": history}
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs=attrs))


def trial_id(trial: optuna.trial.BaseTrial) -> int:
    # Optuna keeps a trial's storage id private; heartbeats and storage reads are keyed by it.
    return trial._trial_id  # type: ignore[attr-defined]


def this_worker() -> dict[str, str | int]:
    """This process, as a trial records the job that runs it (:data:`WORKER_ATTR`)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def worker_gone(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the job that ran ``trial`` ran on this host and its process is gone (killed, crashed):
    a worker on the same host knows at once, where one elsewhere waits for the heartbeat to go stale.
    A host name is taken to name one machine; a reused process id only delays this to the heartbeat."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname():
        return False
    try:
        os.kill(worker["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        pass
    return False


def retried_run(storage: optuna.storages.RDBStorage, study_name: str, trial: optuna.trial.FrozenTrial) -> str | None:
    """The MLflow run of the last failed trial that ``trial`` retries (its ``retry_history``), if any."""
    history = trial.system_attrs.get("retry_history")
    if not history:
        return None
    study_id = storage.get_study_id_from_name(study_name)
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, history[-1])).user_attrs.get(
        RUN_ID_ATTR)


FLOOR = "min_accuracy"  # the constraint a Pareto search's trials carry: sweep.min_accuracy - accuracy


def is_pareto(study: optuna.Study) -> bool:
    """A Pareto search (``hydra/sweeper=pareto``): accuracy, then a cost."""
    return len(study.directions) > 1


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial meets its constraints (Optuna's rule: every value <= 0; none: feasible)."""
    return all(value <= 0 for value in trial.constraints.values())


def best_finished(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The study's best finished trial, the one the champion comes from: of those completed, and
    those the sweep's deadline stopped (scored as they stood, and exported if they led), so a search
    cut short by its deadline still has a champion. In a Pareto search, the cheapest feasible trial
    (the most accurate among equals): the cheapest model on the feasible front. None before any."""
    if is_pareto(study):
        done = [t for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]) if feasible(t)]
        return min(done, key=lambda t: (t.values[1], -t.values[0]), default=None)
    finished = [t for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE, TrialState.PRUNED])
                if t.state == TrialState.COMPLETE or DEADLINE_ATTR in t.user_attrs]
    if not finished:
        return None
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(finished, key=lambda t: t.value)


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
                try:
                    self.storage.record_heartbeat(trial)
                except Exception as err:  # noqa: BLE001 - the thread must outlive a database restart
                    if not stores.database_gone(err):
                        raise
                    log.warning("no heartbeat for a trial (%s): the next one in %s s", stores.one_line(err),
                                self.interval)
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
    escapes fails the trial (a pruned or finished trial stays as it is). With a ``deadline`` (Unix
    time: the sweep's, handed over like the trial number), training stops at the first step past it.

    The pruner's step is the percent of its training a trial has done: trials of 2 and 8 epochs
    meet at 25%, 50%, ..., each at the same point of its learning-rate schedule (at "epoch 1" an
    8-epoch trial still warming up would lose to a 2-epoch trial at its peak, and be pruned).
    """

    def __init__(self, study: optuna.Study, number: int, storage: optuna.storages.RDBStorage,
                 heartbeat_interval: int | None, objective: str, epochs: int, checks_per_epoch: int,
                 deadline: float | None = None):
        # its trial alone, by number: reading the study's trials to find it took seconds at thousands
        try:
            found = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(
                storage.get_study_id_from_name(study.study_name), number))
        except KeyError:
            raise StudyError(f"study {study.study_name!r} has no trial {number}") from None
        if found.state != TrialState.RUNNING:
            raise StudyError(f"trial {number} of study {study.study_name!r} is already {found.state.name}")
        self.study, self.number, self.study_name = study, number, study.study_name
        self.trial = optuna.trial.Trial(study, trial_id(found))
        self.heartbeat = Heartbeat(storage, [trial_id(found)], heartbeat_interval)
        if found.user_attrs.get(WORKER_ATTR) != this_worker():  # a job in its sweeper's process: already there
            storage.set_trial_user_attr(trial_id(found), WORKER_ATTR, this_worker())
        self.objective, self.epochs, self.deadline = objective, epochs, deadline
        # the MLflow run whose training this trial continues (from its checkpoint): its own, when its job
        # ran before (a scheduler requeued it), else that of the trial it retries (max_retry), if any
        self.earlier_run = found.user_attrs.get(RUN_ID_ATTR) or retried_run(storage, study.study_name, found)
        # intermediate checks only feed a pruner: without one they would cost time for nothing (a
        # Pareto search has none: Optuna's pruners, and its intermediate values, are for one objective)
        self.pareto = is_pareto(study)
        no_pruner = self.pareto or isinstance(study.pruner, optuna.pruners.NopPruner)
        self.checks = 0 if no_pruner else checks_per_epoch
        self.last_value: float | None = None
        self.last_percent = -1  # the step of its last report

    def __enter__(self) -> JobTrial:
        self.heartbeat.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.heartbeat.__exit__()
        # A store that went away leaves the trial RUNNING: its sweeper (or, were it gone too, the next
        # worker) fails it with the reason and re-queues it (max_retry), as a killed job's trial; a job
        # its scheduler requeued leaves it RUNNING for the requeued job, which continues it
        if kind is not None and not issubclass(kind, (optuna.TrialPruned, Requeued)) and not stores.gone(error):
            self.study.tell(self.number, state=TrialState.FAIL, skip_if_finished=True)

    @property
    def parent_run_id(self) -> str | None:
        """The study's MLflow parent run, which this trial's run nests under."""
        return self.study.user_attrs.get(PARENT_ATTR)

    def attach_run(self, run_id: str) -> None:
        """Record the trial's MLflow run on it: the study's way back to MLflow."""
        self.trial.set_user_attr(RUN_ID_ATTR, run_id)

    def report_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Report an epoch's objective; raises :class:`optuna.TrialPruned` if the pruner says stop."""
        self._report(epoch * (self.checks + 1), metrics[self.objective])

    def report_check(self, step: int, accuracy: float) -> None:
        """Report a check inside an epoch (``step`` counts checks and epoch ends alike, as train.fit does)."""
        self._report(step, accuracy)

    def _report(self, step: int, value: float) -> None:
        if self.pareto:
            return
        percent = round(100 * step / (self.epochs * (self.checks + 1)))
        self.trial.report(value, percent)
        self.last_value, self.last_percent = value, percent
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.number} pruned at {percent}% of its training ({value:.4f})")

    def check_deadline(self, done: float) -> None:
        """After each training step (``done``: epochs trained): raises :class:`DeadlineReached` once
        the sweep's deadline has passed."""
        if self.deadline is not None and time.time() >= self.deadline:
            percent = int(100 * done / self.epochs)
            raise DeadlineReached(f"trial {self.number} stopped by the sweep's deadline (hydra.sweeper.timeout) "
                                  f"at {percent}% of its training", done)

    def stopped_at_deadline(self, done: float, value: float) -> float:
        """End a trial the deadline stopped: PRUNED, with ``value`` (its model scored as it stands)
        as its last report, and :data:`DEADLINE_ATTR` on it. Returns the value."""
        # a later step than any check's, so this value is the one Optuna keeps for the trial
        percent = max(int(100 * done / self.epochs), self.last_percent + 1)
        if not self.pareto:  # (a Pareto trial cut short has no values: it is off the front)
            self.trial.report(value, percent)
        self.last_value = value
        self.trial.set_user_attr(DEADLINE_ATTR, f"stopped at {percent}% of its training")
        return self.prune()

    def leads(self, value: float, cost: float | None = None, floor: float | None = None) -> bool:
        """Whether ``value`` is at least as good as every completed trial's (true before any): such a
        trial may end as the study's best, so it needs a model the registry can serve. In a Pareto
        search: whether the trial is feasible (``value`` >= ``floor``) and at most as costly as the
        cheapest feasible trial so far."""
        if self.pareto:
            if floor is not None and value < floor:
                return False
            best = best_finished(self.study)
            return best is None or (cost, -value) <= (best.values[1], -best.values[0])
        try:
            best = self.study.best_value
        except ValueError:  # no trial has completed yet
            return True
        return value >= best if self.study.direction == optuna.study.StudyDirection.MAXIMIZE else value <= best

    def complete(self, value: float, cost: float | None = None, floor: float | None = None) -> float | list[float]:
        """Tell the trial its result: ``value``; in a Pareto search, ``[value, cost]``, infeasible
        below ``floor`` (an Optuna constraint, so the sampler learns where feasible models are)."""
        if not self.pareto:
            self.study.tell(self.number, value, skip_if_finished=True)
            return value
        if floor is not None:
            self.trial.set_constraint(FLOOR, floor - value)
        self.study.tell(self.number, [value, cost], skip_if_finished=True)
        return [value, cost]

    def prune(self) -> float:
        """End the trial PRUNED; returns its last reported value (what Optuna records for it)."""
        self.study.tell(self.number, state=TrialState.PRUNED, skip_if_finished=True)
        return self.last_value if self.last_value is not None else 0.0


class NoTrial:
    """A run that is no study trial (a single run, a plain grid's job): the same interface as
    :class:`JobTrial`, with nothing to report to and nothing to stop it."""

    number = study_name = parent_run_id = earlier_run = None
    checks = 0
    pareto = False

    def __enter__(self) -> NoTrial:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def attach_run(self, run_id: str) -> None:
        pass

    def report_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def report_check(self, step: int, accuracy: float) -> None:
        pass

    def check_deadline(self, done: float) -> None:
        pass

    def leads(self, value: float, cost: float | None = None, floor: float | None = None) -> bool:
        return True  # a run of its own always keeps its model

    def complete(self, value: float, cost: float | None = None, floor: float | None = None) -> float:
        return value


@functools.lru_cache(maxsize=4)
def job_storage(url: str, outage_s: float) -> PatientStorage:
    """The study's database as a process's jobs reach it: opened by its first job and kept for the
    next ones (a one-process sweep's trials, a joblib worker's): opening it, an engine and a check
    of its schema, was ~20-40 ms of each trial (docs/benchmark.md). A database that went away and
    came back is met as any call meets it: its pool reconnects, and each call rides out the outage."""
    return open_storage(url, outage_s=outage_s, answered=True)


def join(study_name: str | None, number: int | None, storage_url: str | None, pruner: optuna.pruners.BasePruner,
         heartbeat_interval: int | None, objective: str, epochs: int, checks_per_epoch: int,
         deadline: float | None = None, outage_s: float = 0) -> JobTrial | NoTrial:
    """The job's handle on trial ``number`` of ``study_name``, as its sweeper handed it (both None:
    no study trial), with the sweep's ``deadline`` (Unix time; None: none). The study's database
    answered the sweeper that asked this trial: an outage of it shorter than ``outage_s``, now or
    later, is waited out."""
    if number is None:
        return NoTrial()
    if not storage_url:
        raise StudyError("a study trial needs hydra.sweeper.storage: jobs reach the study through it")
    storage = job_storage(storage_url, outage_s)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
    except KeyError:
        raise StudyError(f"no study {study_name!r} in {stores.redact(storage_url)}") from None
    return JobTrial(study, number, storage, heartbeat_interval, objective, epochs, checks_per_epoch, deadline)


class MedianPruner(optuna.pruners.MedianPruner):
    """Optuna's median pruner (hydra/sweeper/pruner=median), its decision unchanged, reading only what
    it decides on: the completed trials' values at the step being checked, one row each. Optuna's
    reads every trial whole (params, attributes, every report), and a job's study starts with an
    empty cache: at thousands of trials its first report took seconds (``bench --growth``)."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        storage = getattr(study._storage, "_backend", study._storage)  # Optuna wraps an RDBStorage in a cache
        if not isinstance(storage, optuna.storages.RDBStorage) or trial.last_step is None:
            return super().prune(study, trial)
        at_step = functools.partial(CompletedAtStep, study, storage, trial.last_step)
        return super().prune(storage.patiently(at_step) if isinstance(storage, PatientStorage) else at_step(), trial)


class CompletedAtStep:
    """What Optuna's percentile pruner reads of a study, for one step: the study's direction, and
    its completed trials, each with its value at ``step`` alone (none where it made no report there)."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.RDBStorage, step: int):
        from optuna.storages._rdb import models  # Optuna's tables; the pruner's one query reads two of them

        self.direction, self.step = study.direction, step
        trials, values = models.TrialModel, models.TrialIntermediateValueModel
        with sqlalchemy.orm.Session(storage.engine) as session:
            rows = (session.query(values.intermediate_value, values.intermediate_value_type)
                    .select_from(trials)
                    .outerjoin(values, sqlalchemy.and_(values.trial_id == trials.trial_id, values.step == step))
                    .join(models.StudyModel, models.StudyModel.study_id == trials.study_id)
                    .filter(models.StudyModel.study_name == study.study_name, trials.state == TrialState.COMPLETE)
                    .all())
        self.trials = [SimpleNamespace(intermediate_values={} if kind is None else
                                       {step: values.stored_repr_to_intermediate_value(value, kind)})
                       for value, kind in rows]

    def get_trials(self, deepcopy: bool = False, states: Iterable[TrialState] | None = None) -> list[SimpleNamespace]:
        if states is None or set(states) != {TrialState.COMPLETE}:
            raise NotImplementedError("only the completed trials are read for a step")
        return self.trials
