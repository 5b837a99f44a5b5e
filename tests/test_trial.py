"""A job's side of its trial, on a real study database (no sweep, no training): joining it, what it
reports and at which step, when it stops, and how it ends."""

import math
import os
import random
import signal
import threading
import time
import warnings

import optuna
import pytest
import requests
import sqlalchemy
from optuna.trial import TrialState

from conftest import ended_pid
from mnist_sweep import stack, trial
from mnist_sweep.trial import JobTrial, NoTrial, StudyError, open_storage


@pytest.fixture
def storage(tmp_path) -> optuna.storages.RDBStorage:
    return open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")


def job(study: optuna.Study, storage, epochs: int = 1, checks: int = 0) -> JobTrial:
    return JobTrial(study, study.ask().number, storage, None, "test_acc", epochs, checks)


def test_a_trial_leads_when_no_completed_trial_is_better(storage):
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    first = job(study, storage)
    assert first.leads(0.1)  # nothing completed yet: any value may end as the best
    first.complete(0.5)
    second = job(study, storage)
    assert second.leads(0.6) and second.leads(0.5)  # a tie may be the best Optuna reports
    assert not second.leads(0.4)
    study.ask()  # a running trial has no value yet: it does not count
    assert not job(study, storage).leads(0.49)


def test_reports_are_at_the_percent_of_training_done(storage):
    """Trials of 2 and 8 epochs meet at the same steps: each report's step is the percent done."""
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize",
                                pruner=optuna.pruners.MedianPruner())
    two, eight = job(study, storage, epochs=2, checks=1), job(study, storage, epochs=8, checks=1)
    two.report_check(1, 0.5)
    two.report_epoch(1, {"test_acc": 0.6, "train_loss": 1.0})
    two.report_epoch(2, {"test_acc": 0.7})
    for epoch in range(1, 9):
        eight.report_epoch(epoch, {"test_acc": epoch / 10})
    values = {t.number: t.intermediate_values for t in study.get_trials()}
    assert values[two.number] == {25: 0.5, 50: 0.6, 100: 0.7}
    assert set(values[eight.number]) == {round(100 * 2 * e / 16) for e in range(1, 9)} and 50 in values[eight.number]


def test_without_a_pruner_a_trial_makes_no_checks(storage):
    study = optuna.create_study(study_name="s", storage=storage, pruner=optuna.pruners.NopPruner())
    assert job(study, storage, checks=3).checks == 0  # checks only feed a pruner
    pruned = optuna.create_study(study_name="p", storage=storage, pruner=optuna.pruners.MedianPruner())
    assert job(pruned, storage, checks=3).checks == 3


def test_a_pruned_trial_ends_pruned_with_its_last_value(storage):
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    stopped = job(study, storage, epochs=4)
    with pytest.raises(optuna.TrialPruned, match=f"trial {stopped.number} pruned at 25% of its training"):
        with stopped:
            stopped.report_epoch(1, {"test_acc": 0.1})
    assert stopped.prune() == 0.1
    (record,) = study.get_trials()
    assert record.state == TrialState.PRUNED and record.value == 0.1  # a pruned trial's exit does not fail it


def test_an_error_inside_the_trial_fails_it_and_a_result_completes_it(storage):
    study = optuna.create_study(study_name="s", storage=storage)
    crashed, done = job(study, storage), job(study, storage)
    with pytest.raises(RuntimeError):
        with crashed:
            raise RuntimeError("boom")
    with done:
        done.attach_run("abc")
    assert done.complete(0.7) == 0.7
    states = {t.number: (t.state, t.value, t.user_attrs) for t in study.get_trials()}
    assert states[crashed.number][0] == TrialState.FAIL
    assert states[done.number] == (TrialState.COMPLETE, 0.7, {trial.RUN_ID_ATTR: "abc",
                                                              trial.WORKER_ATTR: trial.this_worker()})


def test_a_store_that_went_away_leaves_the_trial_running_for_its_sweeper_to_fail_and_requeue(storage):
    study = optuna.create_study(study_name="s", storage=storage)
    lost = job(study, storage)
    with pytest.raises(requests.ConnectionError):
        with lost:
            raise requests.ConnectionError("the tracking server refused the connection")
    assert study.get_trials()[0].state == TrialState.RUNNING  # the sweeper's record_returns fails it, with why


def test_a_heartbeat_missed_while_the_database_restarts_does_not_stop_the_beats(storage, monkeypatch):
    study = optuna.create_study(study_name="s", storage=storage)
    number = study.ask().number
    beats = []

    def beat(trial_id: int) -> None:
        beats.append(trial_id)
        if len(beats) == 1:  # the first beat meets the restart
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("server closed the connection"))

    monkeypatch.setattr(storage, "record_heartbeat", beat)
    with trial.Heartbeat(storage, [number], interval=0.05):
        time.sleep(0.3)
    assert len(beats) >= 2  # the thread beat on after the failed one


def test_joining_names_what_is_wrong_in_one_line(storage, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    number = study.ask().number
    study.tell(number, 0.5)
    pruner = optuna.pruners.NopPruner()
    with pytest.raises(StudyError, match="needs hydra.sweeper.storage"):
        trial.join("s", number, None, pruner, None, "test_acc", 1, 0)
    with pytest.raises(StudyError, match="no study 'other'"):
        trial.join("other", number, url, pruner, None, "test_acc", 1, 0)
    with pytest.raises(StudyError, match=f"study 's' has no trial {number + 1}"):
        trial.join("s", number + 1, url, pruner, None, "test_acc", 1, 0)
    with pytest.raises(StudyError, match=f"trial {number} of study 's' is already COMPLETE"):
        trial.join("s", number, url, pruner, None, "test_acc", 1, 0)


def test_a_processs_jobs_open_the_study_database_once_and_each_joins_its_own_trial(storage, tmp_path,
                                                                                  monkeypatch):
    """A one-process sweep's trials, a joblib worker's: opening the database was ~20-40 ms a trial."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    first, second = study.ask().number, study.ask().number
    opened = []
    monkeypatch.setattr(trial, "open_storage", lambda url, **kwargs: opened.append(url) or storage)
    jobs = [trial.join("s", number, url, optuna.pruners.NopPruner(), None, "test_acc", 1, 0, outage_s=7)
            for number in (first, second)]
    assert opened == [url] and [job.number for job in jobs] == [first, second]
    trial.join("s", first, url, optuna.pruners.NopPruner(), None, "test_acc", 1, 0, outage_s=0)
    assert opened == [url, url]  # a job that rides out outages differently has its own


def test_a_run_outside_a_study_has_a_trial_that_asks_nothing(storage):
    alone = trial.join(None, None, None, None, None, "test_acc", 1, 3)
    assert isinstance(alone, NoTrial) and alone.checks == 0 and alone.number is None
    with alone:
        alone.report_epoch(1, {"test_acc": 0.0})  # no pruner to stop it
    assert alone.leads(0.0) and alone.complete(0.3) == 0.3  # a run of its own always keeps its model


def test_a_trial_beats_while_it_runs_and_goes_stale_once_it_stops(tmp_path):
    """Its heartbeat is what lets a live worker fail it when its process dies."""
    import time
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=1)
        study = optuna.create_study(study_name="s", storage=storage)
        silent, beating = study.ask().number, study.ask().number
        with JobTrial(study, beating, storage, 1, "test_acc", 1, 0):
            pass
        time.sleep(2.5)  # past the grace period (heartbeats are stored to the second)
        optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {silent: TrialState.RUNNING, beating: TrialState.FAIL}  # no beat at all: never stale


def test_a_trial_records_its_job_so_a_worker_on_its_host_knows_at_once_when_the_job_is_gone(storage):
    study = optuna.create_study(study_name="s", storage=storage)
    held = job(study, storage)

    def frozen() -> optuna.trial.FrozenTrial:
        return storage.get_trial(trial.trial_id(held.trial))

    assert frozen().user_attrs[trial.WORKER_ATTR] == trial.this_worker()
    assert not trial.worker_gone(frozen())  # this process: alive
    storage.set_trial_user_attr(trial.trial_id(held.trial), trial.WORKER_ATTR, {**trial.this_worker(),
                                                                                "pid": ended_pid()})
    assert trial.worker_gone(frozen())
    storage.set_trial_user_attr(trial.trial_id(held.trial), trial.WORKER_ATTR, {"host": "elsewhere", "pid": 1})
    assert not trial.worker_gone(frozen())  # another host's: only its heartbeat can tell


def test_past_its_deadline_a_trial_stops_at_its_next_step_and_ends_pruned_with_its_score(storage):
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    before = JobTrial(study, study.ask().number, storage, None, "test_acc", 4, 0, deadline=time.time() + 3600)
    before.check_deadline(1.5)  # an hour left: nothing happens
    late = JobTrial(study, study.ask().number, storage, None, "test_acc", 4, 0, deadline=time.time() - 1)
    late.report_epoch(1, {"test_acc": 0.5})
    with pytest.raises(trial.DeadlineReached, match=f"trial {late.number} stopped by the sweep's deadline .* at 62%"
                       ) as reached:
        late.check_deadline(2.5)
    assert reached.value.done == 2.5 and isinstance(reached.value, optuna.TrialPruned)  # ends as a pruned run
    assert late.stopped_at_deadline(reached.value.done, 0.7) == 0.7
    (ended,) = [t for t in study.get_trials() if t.number == late.number]
    assert ended.state == TrialState.PRUNED and ended.value == 0.7  # the score as it stood, not the last check's
    assert ended.intermediate_values == {25: 0.5, 62: 0.7}
    assert ended.user_attrs[trial.DEADLINE_ATTR] == "stopped at 62% of its training"


def test_a_deadline_right_after_a_report_still_keeps_the_final_score(storage):
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    late = JobTrial(study, study.ask().number, storage, None, "test_acc", 4, 0, deadline=time.time() - 1)
    late.report_epoch(1, {"test_acc": 0.5})  # at 25%
    late.stopped_at_deadline(1.0, 0.6)  # also 25% of its training: the next step, so Optuna keeps it
    assert study.trials[0].intermediate_values == {25: 0.5, 26: 0.6} and study.trials[0].value == 0.6


def test_the_best_finished_trial_counts_those_the_deadline_stopped_but_not_pruned_ones(storage):
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    assert trial.best_finished(study) is None
    study.tell(study.ask(), 0.6)
    pruned = study.ask()
    pruned.report(0.9, 10)
    study.tell(pruned, state=TrialState.PRUNED)  # a laggard the pruner stopped: never the best
    assert trial.best_finished(study).value == 0.6
    cut = JobTrial(study, study.ask().number, storage, None, "test_acc", 1, 0, deadline=time.time() - 1)
    cut.stopped_at_deadline(0.5, 0.8)
    assert trial.best_finished(study).number == cut.number  # scored as it stood, and exported: it leads


def finished_trials(study: optuna.Study, n: int, rng: random.Random) -> None:
    """``n`` trials of every end, reporting at a random subset of the steps 0..9 (a NaN or an inf now and then)."""
    for _ in range(n):
        asked = study.ask()
        for step in sorted(rng.sample(range(10), rng.randint(0, 10))):
            asked.report(rng.choice([float("nan"), float("inf"), rng.random()]) if rng.random() < 0.05
                         else rng.random(), step)
        end = rng.choice([TrialState.COMPLETE] * 3 + [TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING])
        if end != TrialState.RUNNING:
            study.tell(asked, rng.random() if end == TrialState.COMPLETE else None, state=end)


@pytest.mark.parametrize("settings", [dict(n_startup_trials=4, n_warmup_steps=3, interval_steps=1, n_min_trials=1),
                                      dict(n_startup_trials=0, n_warmup_steps=0, interval_steps=2, n_min_trials=3)])
@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_the_median_pruner_decides_as_optunas_from_the_values_at_the_step_alone(storage, settings, direction):
    rng = random.Random(f"{settings}{direction}")
    study = optuna.create_study(study_name="s", storage=storage, direction=direction)
    ours, optunas = trial.MedianPruner(**settings), optuna.pruners.MedianPruner(**settings)
    decisions = []
    for _ in range(4):  # the study grows between rounds: the startup count, then the medians, decide
        finished_trials(study, 5, rng)
        for _ in range(5):
            running, level = study.ask(), rng.random()  # above the medians, or below them
            for step in sorted(rng.sample(range(10), 6)):
                running.report(level, step)
                frozen = storage.get_trial(trial.trial_id(running))
                decisions.append(ours.prune(study, frozen))
                assert decisions[-1] == optunas.prune(study, frozen), (step, frozen.intermediate_values)
    assert True in decisions and False in decisions  # both ways, or the comparison proved little


def test_a_job_reads_its_own_trial_never_the_studys_trials(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    for value in (0.5, 0.6, 0.7):  # completed trials of 2 epochs and a check each, as jobs report
        done = study.ask()
        for percent in (25, 50, 75, 100):
            done.report(value, percent)
        study.tell(done, value)
    finished_trials(study, 20, random.Random(0))
    number = study.ask().number
    reads = []
    read = optuna.storages.RDBStorage._get_trials

    def counted(self, *args, **kwargs):
        reads.append(args)
        return read(self, *args, **kwargs)

    monkeypatch.setattr(optuna.storages.RDBStorage, "_get_trials", counted)  # every read of a study's trials
    job = trial.join("s", number, url, trial.MedianPruner(n_startup_trials=1, n_warmup_steps=0), None,
                     "test_acc", 2, 1)
    with pytest.raises(optuna.TrialPruned):  # the pruner did decide, on the completed trials' values
        for step in range(1, 5):
            job.report_check(step, 0.0)
    assert job.leads(0.0) is False
    assert reads == []
    monkeypatch.undo()
    with pytest.raises(StudyError, match="has no trial 99"):
        trial.join("s", 99, url, optuna.pruners.NopPruner(), None, "test_acc", 2, 1)
    with pytest.raises(StudyError, match="trial 0 of study 's' is already COMPLETE"):
        trial.join("s", 0, url, optuna.pruners.NopPruner(), None, "test_acc", 2, 1)


def test_a_pareto_trial_returns_accuracy_and_cost_infeasible_below_the_floor_and_never_reports(storage):
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"],
                                pruner=optuna.pruners.MedianPruner())
    accurate = job(study, storage, checks=3)
    assert accurate.pareto and accurate.checks == 0  # Optuna's pruners judge one objective
    accurate.report_epoch(1, {"test_acc": 0.9})  # nothing to report to: a no-op, not an error
    assert accurate.leads(0.995, 30000, floor=0.99)  # the first feasible trial may be the champion
    assert accurate.complete(0.995, 30000, floor=0.99) == [0.995, 30000]
    small, tiny = job(study, storage), job(study, storage)
    assert not tiny.leads(0.95, 1000, floor=0.99)  # infeasible: never the champion
    assert tiny.complete(0.95, 1000, floor=0.99) == [0.95, 1000]
    assert small.leads(0.991, 3000, floor=0.99) and not small.leads(0.991, 40000, floor=0.99)
    small.complete(0.991, 3000, floor=0.99)
    ended = {t.number: t for t in study.get_trials()}
    assert ended[tiny.number].constraints == {trial.FLOOR: pytest.approx(0.04)}  # > 0: infeasible
    assert not trial.feasible(ended[tiny.number]) and trial.feasible(ended[small.number])
    # the champion: the cheapest feasible model, not the most accurate nor the cheapest of all
    assert trial.best_finished(study).number == small.number


def test_a_pareto_trials_floor_is_optunas_own_constraint_which_its_sampler_and_front_read(storage):
    """Trial.set_constraint, Optuna 5's constraint API (its samplers' constraints_func is deprecated
    since 5.0): no deprecation warning, and Optuna's front and TPE sampler tell the infeasible apart."""
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"],
                                sampler=optuna.samplers.TPESampler(n_startup_trials=2, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        for accuracy, cost in ((0.995, 30000), (0.95, 1000), (0.991, 3000), (0.98, 500)):
            done = job(study, storage)
            done.trial.suggest_float("x", 0, 1)
            done.complete(accuracy, cost, floor=0.99)
        study.ask().suggest_float("x", 0, 1)  # TPE past its startup trials: it splits them by their constraints
    ended = study.get_trials(states=[TrialState.COMPLETE])
    assert [t.constraints for t in ended] == [{trial.FLOOR: pytest.approx(0.99 - a)}
                                              for a in (0.995, 0.95, 0.991, 0.98)]
    # the cheap infeasible trials (1000, 500) would lead the front on cost; Optuna's front is feasible only
    assert sorted(t.number for t in study.best_trials) == [0, 2]


class Outage:
    """The next ``statements`` statements on ``engine`` fail as a database that went away fails them."""

    def __init__(self, engine: sqlalchemy.Engine, statements: float):
        self.left = statements
        sqlalchemy.event.listen(engine, "before_cursor_execute", self.refuse)

    def refuse(self, *args: object) -> None:
        if self.left > 0:
            self.left -= 1
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))


def test_a_database_outage_shorter_than_outage_s_costs_a_trial_a_wait_and_a_longer_one_is_one_line(tmp_path,
                                                                                                    monkeypatch):
    monkeypatch.setattr(trial.stores, "FIRST_PAUSE_S", 0.01)
    monkeypatch.setattr(trial.stores, "can_go_away", lambda uri: True)  # a database server, on a local file
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = trial.open_storage(url, outage_s=60)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize",
                                pruner=trial.MedianPruner(n_startup_trials=0, n_warmup_steps=0))
    done = job(study, storage, epochs=2, checks=1)
    done.report_epoch(1, {"test_acc": 0.5})
    outage = Outage(storage.engine, 5)
    done.report_epoch(2, {"test_acc": 0.6})  # its report and the pruner's read meet the outage, and wait
    done.complete(0.6)
    assert outage.left == 0
    (ended,) = study.get_trials()
    assert ended.state == TrialState.COMPLETE and ended.intermediate_values == {50: 0.5, 100: 0.6}  # each once

    short = trial.open_storage(url, outage_s=0.2)
    Outage(short.engine, math.inf)
    with pytest.raises(trial.stores.StoreError, match="the study's database .* stopped answering .* this worker stops"):
        with trial.stores.answering("the study's database", url):  # as the sweeper and its jobs run
            optuna.load_study(study_name="s", storage=short).ask()
    assert len(study.get_trials()) == 1


def test_no_trial_looks_stale_until_an_interval_after_the_database_answered_again(tmp_path, monkeypatch):
    """Its heartbeat, held up by the outage, lands within that interval: until then it may be alive."""
    monkeypatch.setattr(trial.stores, "FIRST_PAUSE_S", 0.01)
    monkeypatch.setattr(trial.stores, "can_go_away", lambda uri: True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = trial.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=1,
                                     outage_s=60)
        study = optuna.create_study(study_name="s", storage=storage)
        silent = study.ask()
        storage.record_heartbeat(trial.trial_id(silent))
        time.sleep(2.5)  # past the grace period (heartbeats are stored to the second)
        Outage(storage.engine, 2)
        optuna.storages.fail_stale_trials(study)  # its first read meets the outage, then the database is back
        assert study.get_trials()[0].state == TrialState.RUNNING
        storage.back_at -= 1 + trial.stores.MAX_PAUSE_S  # an interval (and a pause) later
        optuna.storages.fail_stale_trials(study)
    assert study.get_trials()[0].state == TrialState.FAIL


@pytest.mark.slow  # the real PostgreSQL, stopped while no other test uses it
def test_a_trial_rides_out_a_real_restart_of_its_database(stack_alone, monkeypatch, caplog):
    """PostgreSQL stopped (its sessions ended) and started again 3 s later, mid-trial: the job's
    next report waits for it and lands once, and the trial completes. About 10 s."""
    monkeypatch.setenv("PGPASSFILE", str(stack_alone.pgpass))
    storage = open_storage(stack_alone.optuna_storage, outage_s=60)
    study = optuna.create_study(study_name=f"restart-{time.time_ns()}", storage=storage, direction="maximize")
    running = job(study, storage, epochs=2)
    running.report_epoch(1, {"test_acc": 0.5})
    stack.stop_postgres(stack_alone.root)
    restart = threading.Timer(3, stack.start, (stack_alone.root, stack_alone.host, stack_alone.pg_port,
                                               stack_alone.mlflow_port))
    restart.start()
    try:
        running.report_epoch(2, {"test_acc": 0.6})  # while the database is down
        running.complete(0.6)
    finally:
        restart.join()
    (ended,) = study.get_trials()
    assert ended.state == TrialState.COMPLETE and ended.intermediate_values == {50: 0.5, 100: 0.6}
    assert "the study's database answers again" in caplog.text  # it did wait


@pytest.mark.parametrize("outage_s", [0, 5])
def test_ctrl_c_inside_a_call_to_the_study_database_is_raised_once_the_call_has_ended(tmp_path, outage_s):
    """Raised mid-call (inside SQLAlchemy's commit), Ctrl-C once left SQLite's write lock held and the
    interrupted trial RUNNING: the call's write lands first, then the KeyboardInterrupt."""
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", outage_s=outage_s)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    asked = study.ask()

    def interrupted() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, while the call runs
        time.sleep(0.2)  # a Python signal handler would raise here
        optuna.storages.RDBStorage.set_trial_user_attr(storage, asked._trial_id, "written", True)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with pytest.raises(KeyboardInterrupt):
            storage.patiently(interrupted)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert storage.get_trial(asked._trial_id).user_attrs == {"written": True}
    study.tell(asked, 0.5)  # the database's write lock is free
