"""``python -m mnist_sweep.soak [trials=60] [workers=3] [minutes=20] [rounds=2] [first=30] [every=45]
[server_workers=N] [root=DIR] [override ...]``: the soak behind ``make soak``. Many tiny trials on
the shared stores while faults are injected, then a check that nothing was lost or left half-done.

It starts a stack of its own (PostgreSQL + an MLflow tracking server, :mod:`mnist_sweep.stack`,
under ``root``: outputs/soak, wiped first) and ``workers`` worker processes of one study
(``python -m mnist_sweep -m stores=server``, one thread each, tiny 1-epoch trials of a narrow CNN),
whose store URIs carry the database's password, so that its redaction is checked too. A supervisor
restarts every worker that exits with an error, as a cluster's scheduler would. Every ``every``
seconds after the ``first``, one fault, in turn: a worker killed with ``kill -9`` (one that runs a
trial), the tracking server stopped and started again, PostgreSQL restarted; ``rounds`` of the three.
The study's budget is ``trials`` (``hydra.sweeper.max_trials``); the soak ends when every worker has
ended on its own, or at ``minutes`` (a violation). The other arguments are Hydra overrides for every
worker (``data.root=DIR data.md5.<file>=<md5>``: other digits).

Then :func:`check` reads the study, the tracking server, the artifacts and every log, and
:func:`figures` counts; both are printed, and any violated invariant makes the exit status 1.
What a worker does when a store goes away: docs/scaling-out.md.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from mnist_sweep import cli, stack
from mnist_sweep.config import PROJECT_ROOT, split_args

DEFAULT_ROOT = PROJECT_ROOT / "outputs" / "soak"
STUDY = "soak"  # the study, and the MLflow experiment, in the soak's own stores
FAULTS = ("kill_worker", "tracking_server", "postgres")  # injected in this order, round after round
OUTAGE_S = 3  # how long a stopped server stays down before it starts again
RESTART_DELAY_S = 2  # before a worker that ended with an error starts again (a scheduler's requeue)
POLL_S = 0.5
# Tiny trials: one epoch of a narrow CNN, one thread each; the rest of the default space is searched
# (dropout, learning rate, weight decay, batch size: continuous values, so no point comes twice)
TRIAL = ("model=shallow", "model.channels=[4,8]", "epochs=1", "augment=none", "threads=1", "device=cpu",
         "pruning.checks_per_epoch=1", "data.eval_batch_size=1000")
MAX_RETRY = 3  # a trial a fault cut short runs again, with the same params, up to this often
# How a worker's last line tells an outage past outage_s (stores.answering, MlflowStudy.check, run.finish)
# from a start while a store was down (stores.opening's: a store that never answered this worker)
OUTAGE_LINE = "stopped answering"
REFUSED_LINES = ("error: cannot use ", "error: cannot reach ")


@dataclass(frozen=True)
class Plan:
    trials: int = 60  # the study's budget: finished (or running) trials
    workers: int = 3
    minutes: float = 20  # the time bound
    rounds: int = 2  # of the three faults
    first: float = 30  # seconds before the first fault
    every: float = 45  # seconds between faults
    # The tracking server's uvicorn workers (make services' count: one a core, at most 4). A short
    # soak runs one: each more is an MLflow process to start, at the soak's start and at each restart
    server_workers: int = stack.MLFLOW_WORKERS

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds after the start, fault kind) for every fault, in order."""
        return [(self.first + k * self.every, FAULTS[k % len(FAULTS)]) for k in range(self.rounds * len(FAULTS))]


@dataclass
class Fault:
    kind: str
    at: datetime  # when it was injected
    back: datetime  # when what it broke was back (a killed worker: at once; its supervisor restarts it)
    detail: str


@dataclass
class Exit:
    """How one worker process ended."""
    name: str  # w<slot>-<start>: its log is logs/<name>.log
    status: int
    killed: bool  # by the soak (a fault, or the time bound), not on its own
    last_line: str


@dataclass
class Slot:
    """One worker: the process now running it, and how many times it started."""
    number: int
    proc: subprocess.Popen | None = None
    starts: int = 0
    name: str = ""
    done: bool = False  # ended on its own with status 0: the study needs no more from it
    killed: set[int] = field(default_factory=set)  # pids the soak killed


@dataclass
class Figures:
    minutes: float
    started: int
    states: dict[str, int]
    trials_per_min: float
    faults_planned: int
    faults_injected: int
    faults_survived: int
    failed: int
    trials_lost: int
    restarts: int
    outage_exits: int = 0  # workers a store's outage ended mid-sweep: one longer than outage_s
    refused_at_start: int = 0  # workers that started while a store was down: an error at once, by design
    restarted: int = 0  # trials failed and run again whose worker the soak did not kill (a store went away)
    incomplete: int = 0  # COMPLETE trials whose run is not FINISHED with its final metrics (an invariant: 0)

    def lines(self) -> list[str]:
        states = " + ".join(f"{self.states.get(s, 0)} {s}" for s in ("COMPLETE", "PRUNED", "FAIL"))
        return [f"trials started: {self.started} = {states} "
                f"({self.states.get('RUNNING', 0)} RUNNING, {self.states.get('WAITING', 0)} WAITING)",
                f"trials/min: {self.trials_per_min:.1f} "
                f"({self.states.get('COMPLETE', 0) + self.states.get('PRUNED', 0)} finished in {self.minutes:.1f} min)",
                f"faults injected: {self.faults_injected} of {self.faults_planned} planned; survived: "
                f"{self.faults_survived}; worker restarts: {self.restarts}",
                f"trials lost: {self.trials_lost} (of {self.failed} failed trials; the others ran again to the end)",
                f"outages: {self.outage_exits} workers ended by one ({self.refused_at_start} more refused at their "
                f"start), {self.restarted} trials restarted (not a killed worker's), {self.incomplete} complete "
                "trials whose run is incomplete"]


# --------------------------------------------------------------------------- the invariants


def check(study, client, experiment_id: str, secret: str, files: Iterable[Path], exits: Iterable[Exit] = (),
          champion: tuple[str, str] = ("mnist-cnn", "champion")) -> list[str]:
    """Every invariant of a soak (or any study on these stores) that does not hold, one line each:
    the trials, their MLflow runs (a complete trial's FINISHED with its final metrics), the champion,
    the password ``secret`` (in no param, tag, or file among ``files``: artifacts, logs), and the
    workers' ``exits`` (one that ended on its own with an error ends with one ``error:`` line)."""
    trials = study.get_trials(deepcopy=False)
    runs = study_runs(client, experiment_id)
    return [*trial_violations(trials), *run_violations(study.study_name, trials, runs),
            *(f"complete trial {number}'s run {why}"
              for number, why in incomplete_runs(study.study_name, trials, runs)),
            *champion_violations(client, trials, runs, *champion),
            *secret_violations(secret, runs, files), *exit_violations(exits)]


def study_runs(client, experiment_id: str) -> list:
    """Every run of the experiment, deleted ones too."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def params_key(params: dict) -> tuple:
    return tuple(sorted((key, repr(value)) for key, value in params.items()))


def trial_violations(trials: list) -> list[str]:
    """None RUNNING or WAITING at the end; no point proposed twice (a retry repeats its failed
    trial's point, as it must); no point finished twice."""
    from optuna.trial import TrialState

    found = [f"trial {t.number} is {t.state.name} at the end" for t in trials
             if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    by_number = {t.number: t for t in trials}
    proposed: dict[tuple, int] = {}
    finished: dict[tuple, int] = {}
    for t in trials:
        key = params_key(t.params)
        failed = t.system_attrs.get("failed_trial")
        if failed is None:
            if key in proposed:
                found.append(f"trial {t.number} was proposed the params of trial {proposed[key]} again")
            proposed.setdefault(key, t.number)
        elif failed not in by_number or params_key(by_number[failed].params) != key:
            found.append(f"trial {t.number}, a retry of trial {failed}, does not have its params")
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            if key in finished:
                found.append(f"trials {finished[key]} and {t.number} both finished the same params")
            finished.setdefault(key, t.number)
    return found


def _same(run_value: str | None, value) -> bool:
    if run_value == str(value):
        return True
    try:
        return math.isclose(float(run_value), float(value), rel_tol=1e-9)
    except (TypeError, ValueError):
        return False


def run_violations(study_name: str, trials: list, runs: list) -> list[str]:
    """One parent, not RUNNING; every finished trial has exactly one run, with its params, tagged
    with its trial (and linked from it); no run RUNNING; no run of a trial the study does not hold."""
    from optuna.trial import TrialState

    from mnist_sweep.tracking import STUDY_TAG, TRIAL_TAG
    from mnist_sweep.trial import RUN_ID_ATTR

    ours = [r for r in runs if r.data.tags.get(STUDY_TAG) == study_name]
    parents = [r for r in ours if TRIAL_TAG not in r.data.tags]
    found = [f"run {r.info.run_id} ({r.info.run_name}) is RUNNING at the end" for r in runs
             if r.info.status == "RUNNING"]
    if len(parents) != 1:
        found.append(f"the study has {len(parents)} parent runs, not one")
    kids: dict[int, list] = {}
    numbers = {t.number for t in trials}
    for run in ours:
        if TRIAL_TAG in run.data.tags:
            number = int(run.data.tags[TRIAL_TAG])
            kids.setdefault(number, []).append(run)
            if number not in numbers:
                found.append(f"run {run.info.run_id} is tagged with trial {number}, which the study does not hold")
    found += [f"run {r.info.run_id} ({r.info.run_name}) belongs to no study" for r in runs
              if STUDY_TAG not in r.data.tags and "mlflow.parentRunId" in r.data.tags]
    for t in trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        its = kids.get(t.number, [])
        if len(its) != 1:
            found.append(f"finished trial {t.number} has {len(its)} MLflow runs, not one")
            continue
        run = its[0]
        if t.user_attrs.get(RUN_ID_ATTR) != run.info.run_id:
            found.append(f"trial {t.number} links run {t.user_attrs.get(RUN_ID_ATTR)}, not its run {run.info.run_id}")
        wrong = [key for key, value in t.params.items() if not _same(run.data.params.get(key), value)]
        if wrong:
            found.append(f"the run of trial {t.number} lacks its params {', '.join(wrong)} (or has others)")
    return found


def incomplete_runs(study_name: str, trials: list, runs: list) -> list[tuple[int, str]]:
    """The COMPLETE trials whose one run is not FINISHED with its final metrics (the value the study
    holds as its objective metric's latest, and its costs, logged last), as (trial number, why): its
    last records were lost, or it could not be ended. A trial without exactly one run is
    :func:`run_violations`' to report."""
    from optuna.trial import TrialState

    from mnist_sweep.registry import selection_metric
    from mnist_sweep.tracking import STUDY_TAG, TRIAL_TAG

    by_trial: dict[str, list] = {}
    for run in runs:
        if run.data.tags.get(STUDY_TAG) == study_name and TRIAL_TAG in run.data.tags:
            by_trial.setdefault(run.data.tags[TRIAL_TAG], []).append(run)
    found = []
    for t in trials:
        its = by_trial.get(str(t.number), [])
        if t.state != TrialState.COMPLETE or len(its) != 1:
            continue
        run, objective = its[0], selection_metric(int(its[0].data.params.get("data.val_size", 0)) > 0)
        metric = run.data.metrics.get(objective)
        if run.info.status != "FINISHED":
            found.append((t.number, f"{run.info.run_id} is {run.info.status}"))
        elif metric is None or not math.isclose(metric, t.values[0], rel_tol=1e-6) or "param_count" not in (
                run.data.metrics):
            found.append((t.number, f"{run.info.run_id} lacks its final metrics ({objective} {metric}, the study "
                                    f"holds {t.values[0]}; costs {'param_count' in run.data.metrics})"))
    return found


def champion_violations(client, trials: list, runs: list, name: str, alias: str) -> list[str]:
    """The champion is the run of the best finished trial that has a model (equal values are equally good)."""
    import mlflow
    from optuna.trial import TrialState

    from mnist_sweep.tracking import MODEL_URI_TAG, TRIAL_TAG

    by_id = {r.info.run_id: r for r in runs}
    value = {t.number: t.value for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    with_model = [r for r in runs if MODEL_URI_TAG in r.data.tags and int(r.data.tags.get(TRIAL_TAG, -1)) in value]
    try:
        champion = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return [f"no {name}@{alias}, though {len(with_model)} finished trials have a model"] if with_model else []
    run = by_id.get(champion.run_id)
    if run is None or int(run.data.tags.get(TRIAL_TAG, -1)) not in value:
        return [f"{name}@{alias} (v{champion.version}) is the model of run {champion.run_id}, no finished trial's"]
    best = max(value[int(r.data.tags[TRIAL_TAG])] for r in with_model)
    mine = value[int(run.data.tags[TRIAL_TAG])]
    if mine < best:
        return [f"{name}@{alias} is trial {run.data.tags[TRIAL_TAG]}'s ({mine:.4f}), but a finished trial with a "
                f"model reached {best:.4f}"]
    return []


def secret_violations(secret: str, runs: list, files: Iterable[Path]) -> list[str]:
    """The password appears in no run's param or tag, and in no file among ``files`` (folders: every
    file in them)."""
    found = [f"run {r.info.run_id}'s {kind} {key} holds the password" for r in runs
             for kind, values in (("param", r.data.params), ("tag", r.data.tags))
             for key, value in values.items() if secret in str(value)]
    needle = secret.encode()
    for place in files:
        for path in ([place] if place.is_file() else sorted(p for p in place.rglob("*") if p.is_file())):
            if needle in path.read_bytes():
                found.append(f"{path} holds the password")
    return found


def exit_violations(exits: Iterable[Exit]) -> list[str]:
    """A worker that ended on its own with an error said why in one ``error:`` line, its last."""
    return [f"worker {e.name} ended with status {e.status} without an error: line (its last: {e.last_line!r})"
            for e in exits if not e.killed and e.status != 0 and not e.last_line.startswith("error: ")]


def figures(trials: list, faults: list[Fault], planned: int, minutes: float, restarts: int,
            exits: Iterable[Exit] = (), killed: Iterable[int] = (), incomplete: int = 0) -> Figures:
    """What the soak did: its trials by state, trials/min, the faults injected and survived (after
    which the study finished a trial), the trials lost (points whose trial failed and that no retry
    finished), and what outages cost: the workers they ended mid-sweep (among ``exits``; those
    refused at their start are counted apart), the trials restarted whose worker was not ``killed``
    (pids) by the soak, and the ``incomplete`` count of :func:`incomplete_runs`."""
    from optuna.trial import TrialState

    from mnist_sweep.trial import WORKER_ATTR

    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    done_points = {params_key(t.params) for t in finished}
    failed = [t for t in trials if t.state == TrialState.FAIL]
    lost = {params_key(t.params) for t in failed} - done_points
    survived = sum(any(t.datetime_complete and t.datetime_complete > f.back for t in finished) for f in faults)
    killed, ended = set(killed), [e for e in exits if not e.killed and e.status != 0]
    restarted = [t for t in failed if t.user_attrs.get(WORKER_ATTR, {}).get("pid") not in killed]
    return Figures(minutes=minutes, started=sum(states.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL")),
                   states=states, trials_per_min=len(finished) / minutes if minutes else 0.0, faults_planned=planned,
                   faults_injected=len(faults), faults_survived=survived, failed=len(failed), trials_lost=len(lost),
                   restarts=restarts, outage_exits=sum(OUTAGE_LINE in e.last_line for e in ended),
                   refused_at_start=sum(e.last_line.startswith(REFUSED_LINES) for e in ended),
                   restarted=len(restarted), incomplete=incomplete)


# --------------------------------------------------------------------------- the soak


def with_password(uri: str, user: str, password: str) -> str:
    """``uri`` with ``user:password@`` in it, as a careless user would type it."""
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest.split('@')[-1]}"


def worker_command(root: Path, plan: Plan, name: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "mnist_sweep", "-m", "stores=server", f"hydra.sweeper.study_name={STUDY}",
            f"mlflow.experiment={STUDY}", f"paths.outputs={root / 'outputs'}",
            f"hydra.sweep.dir={root / 'sweeps' / name}",
            f"hydra.sweeper.n_trials={plan.trials}", f"hydra.sweeper.max_trials={plan.trials}",
            f"hydra.sweeper.max_retry={MAX_RETRY}", *TRIAL, *overrides]


class Soak:
    """The running soak: its stack, its workers, the faults so far."""

    def __init__(self, root: Path, plan: Plan, overrides: list[str], say: Callable[[str], None]):
        self.root, self.plan, self.overrides, self.say = root, plan, overrides, say
        self.slots = [Slot(i) for i in range(plan.workers)]
        self.faults: list[Fault] = []
        self.exits: list[Exit] = []
        self.stack: stack.Stack | None = None

    def start_stack(self) -> None:
        self.root.mkdir(parents=True)
        self.root.chmod(0o711)  # as root, PostgreSQL runs as the user postgres, who must reach its data
        (self.root / "logs").mkdir()
        pg_port = stack.free_port()
        mlflow_port = next(port for port in iter(stack.free_port, None) if port != pg_port)
        self.stack = stack.start(self.root, pg_port=pg_port, mlflow_port=mlflow_port,
                                 mlflow_workers=self.plan.server_workers)
        password = self.stack.password
        self.env = {**os.environ, "PGPASSFILE": str(self.stack.pgpass),
                    "OPTUNA_STORAGE": with_password(self.stack.optuna_storage, stack.ROLE, password),
                    # the server has no auth: it ignores these credentials, which must be redacted all the same
                    "MLFLOW_TRACKING_URI": with_password(self.stack.tracking_uri, "soak", password)}

    def restart_stack(self) -> None:
        stack.start(self.root, self.stack.host, self.stack.pg_port, self.stack.mlflow_port)

    def launch(self, slot: Slot) -> None:
        slot.starts += 1
        slot.name = f"w{slot.number}-{slot.starts}"
        with (self.root / "logs" / f"{slot.name}.log").open("w") as log:
            slot.proc = subprocess.Popen(worker_command(self.root, self.plan, slot.name, self.overrides),
                                         cwd=PROJECT_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

    def reap(self, slot: Slot) -> bool:
        """Record the slot's process if it ended; True if it did."""
        if slot.proc is None or slot.proc.poll() is None:
            return False
        lines = (self.root / "logs" / f"{slot.name}.log").read_text(errors="replace").strip().splitlines()
        killed = slot.proc.pid in slot.killed
        self.exits.append(Exit(slot.name, slot.proc.returncode, killed, lines[-1] if lines else ""))
        slot.done = slot.proc.returncode == 0
        if not killed:
            self.say(f"  worker {slot.name} ended with status {slot.proc.returncode}"
                     + (f": {lines[-1]}" if slot.proc.returncode and lines else ""))
        slot.proc = None
        return True

    def inject(self, kind: str) -> bool:
        """Inject a fault of ``kind``; False if it must wait (no worker runs a trial to kill yet)."""
        at = datetime.now()
        if kind == "kill_worker":
            slot = self.busiest()
            if slot is None:
                return False
            slot.killed.add(slot.proc.pid)
            slot.proc.send_signal(signal.SIGKILL)
            detail = f"kill -9 worker {slot.name} (pid {slot.proc.pid})"
        elif kind == "tracking_server":
            stack.stop_mlflow(self.root)
            time.sleep(OUTAGE_S)
            self.restart_stack()
            detail = "tracking server stopped, started again"
        else:
            stack.stop_postgres(self.root)
            time.sleep(OUTAGE_S)
            self.restart_stack()
            detail = "PostgreSQL stopped (fast: sessions ended), started again"
        self.faults.append(Fault(kind, at, datetime.now(), detail))
        self.say(f"fault {len(self.faults)} at {self.elapsed():.0f} s: {detail} ({(datetime.now() - at).seconds} s)")
        return True

    def busiest(self) -> Slot | None:
        """A worker that is running a trial and has its MLflow run; None while there is none."""
        import optuna

        from mnist_sweep.trial import RUN_ID_ATTR, WORKER_ATTR

        try:
            running = optuna.load_study(study_name=STUDY, storage=self.env["OPTUNA_STORAGE"]).get_trials(
                deepcopy=False, states=[optuna.trial.TrialState.RUNNING])
        except KeyError:  # no study yet
            return None
        pids = {t.user_attrs.get(WORKER_ATTR, {}).get("pid") for t in running if RUN_ID_ATTR in t.user_attrs}
        return next((s for s in self.slots if s.proc is not None and s.proc.poll() is None and s.proc.pid in pids),
                    None)

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def run(self) -> bool:
        """Run the workers and the faults until every worker ended on its own with status 0;
        False if the time bound came first (the workers are then stopped)."""
        self.began = time.monotonic()
        schedule = self.plan.schedule()
        for slot in self.slots:
            self.launch(slot)
        ended_at: dict[int, float] = {}
        while self.elapsed() < self.plan.minutes * 60:
            if schedule and self.elapsed() >= schedule[0][0] and self.inject(schedule[0][1]):
                schedule.pop(0)
            for slot in self.slots:
                if self.reap(slot):
                    ended_at[slot.number] = time.monotonic()
                if (slot.proc is None and not slot.done
                        and time.monotonic() - ended_at.get(slot.number, 0) >= RESTART_DELAY_S):
                    self.launch(slot)
            if all(slot.done for slot in self.slots):
                if schedule:
                    self.say(f"the study finished before {len(schedule)} of the faults: not injected")
                return True
            time.sleep(POLL_S)
        self.say(f"the time bound ({self.plan.minutes} min) came first: stopping the workers")
        self.stop_workers()
        return False

    def stop_workers(self) -> None:
        """Ctrl-C to every worker (a sweep ends cleanly), then kill -9 after a minute."""
        live = [s for s in self.slots if s.proc is not None]
        for slot in live:
            slot.killed.add(slot.proc.pid)
            slot.proc.send_signal(signal.SIGINT)
        for slot in live:
            try:
                slot.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                slot.proc.wait()
            self.reap(slot)


def prepare_data(overrides: list[str]) -> None:
    """The digits the workers train on, fetched and verified once, here: else every worker would."""
    from mnist_sweep import data
    from mnist_sweep.config import compose

    cfg = compose([o for o in overrides if o.startswith(("data.", "paths."))])
    data.prepare(Path(cfg.data.root), dict(cfg.data.md5), log=print)


def say_now(line: str) -> None:
    print(line, flush=True)  # as it happens, into a log file too


def soak(root: Path, plan: Plan, overrides: list[str],
         say: Callable[[str], None] = say_now) -> tuple[list[str], Figures]:
    """Run a soak under ``root`` (wiped first); return its violations and figures."""
    import optuna
    from mlflow import MlflowClient

    prepare_data(overrides)
    if root.exists():
        stack.stop(root)  # a soak stopped midway may have left its servers running
        shutil.rmtree(root)
    run = Soak(root, plan, overrides, say)
    try:
        run.start_stack()
        say(f"soak: {plan.workers} workers, {plan.trials} trials, {len(plan.schedule())} faults, at most "
            f"{plan.minutes} min; stores under {root} (the tracking server's uvicorn workers: "
            f"{run.stack.mlflow_workers}), worker logs in {root / 'logs'}")
        in_time = run.run()
        minutes = run.elapsed() / 60
        run.restart_stack()  # a fault's server is up again (it is, unless its restart failed)
        study = optuna.load_study(study_name=STUDY, storage=run.env["OPTUNA_STORAGE"])
        client = MlflowClient(run.stack.tracking_uri)
        experiment = client.get_experiment_by_name(STUDY).experiment_id
        files = [root / "mlartifacts", root / "logs", root / "sweeps", root / "mlflow.log", root / "postgres.log"]
        violations = check(study, client, experiment, run.stack.password, files, run.exits)
        if not in_time:
            violations.insert(0, f"the time bound ({plan.minutes} min) came before the study's {plan.trials} trials")
        if len(run.faults) < len(plan.schedule()):
            violations.append(f"only {len(run.faults)} of {len(plan.schedule())} planned faults were injected before "
                              "the study finished: more trials=, or a shorter every=")
        restarts = sum(slot.starts for slot in run.slots) - plan.workers
        trials = study.get_trials(deepcopy=False)
        incomplete = incomplete_runs(STUDY, trials, study_runs(client, experiment))
        killed = set().union(*(slot.killed for slot in run.slots))
        return violations, figures(trials, run.faults, len(plan.schedule()), minutes, restarts, run.exits, killed,
                                   len(incomplete))
    finally:
        for slot in run.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()
                slot.proc.wait()
        stack.stop(root)


KEYS = ("trials", "workers", "minutes", "rounds", "first", "every", "server_workers", "root")


def parse(argv: list[str]) -> tuple[Path, Plan, list[str]]:
    args, overrides = split_args(argv, KEYS)
    values = {}
    for key in KEYS[:-1]:
        if args[key]:
            kind = int if key in ("trials", "workers", "rounds", "server_workers") else float
            try:
                values[key] = kind(args[key][-1])
            except ValueError:
                raise ValueError(f"{key} must be a{'n integer' if kind is int else ' number'} "
                                 f"(got {args[key][-1]!r})") from None
            if values[key] < (0 if key in ("rounds", "first") else 1):
                raise ValueError(f"{key} must be at least {0 if key in ('rounds', 'first') else 1} "
                                 f"(got {args[key][-1]})")
    bad = [o for o in overrides if "=" not in o or o.startswith(("hydra.sweeper.study_name", "stores="))]
    if bad:
        raise ValueError(f"unknown argument {bad[0]!r}: the arguments are {'=, '.join(KEYS)}= and Hydra overrides "
                         "(key=value) for the workers")
    root = Path(args["root"][-1]).resolve() if args["root"] else DEFAULT_ROOT
    return root, Plan(**values), overrides


def main(argv: list[str]) -> int:
    root, plan, overrides = parse(argv)
    violations, figures_ = soak(root, plan, overrides)
    for line in figures_.lines():
        print(line)
    if violations:
        print(f"invariants: {len(violations)} violated")
        for line in violations:
            print(f"  - {line}")
        return 1
    print("invariants: all hold")
    return 0


if __name__ == "__main__":
    cli.run(main)
