"""The study sweeper (hydra_plugins.mnist_sweep): its pieces as plain functions, in-process, then
whole sweeps as a user runs them, in subprocesses on the tiny data (slow; CI runs them), on sqlite
and on the real shared stores (PostgreSQL and an MLflow server: the ``local_stack`` fixture)."""

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import requests
import torch
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from mlflow import MlflowClient
from omegaconf import OmegaConf
from optuna.distributions import (CategoricalDistribution, DiscreteUniformDistribution, FloatDistribution,
                                  IntDistribution, IntLogUniformDistribution, IntUniformDistribution,
                                  LogUniformDistribution, UniformDistribution)
from optuna.trial import TrialState

from conftest import (FINISHED, assert_each_job_ran_its_trial, assert_one_line_error, checkpoint_epoch,
                      ended_pid, finish, load_study, run_cli, server_args, shared, start, study_runs, sweep_here)
from hydra_plugins.mnist_sweep import sweeper
from mnist_sweep import registry, tracking
from mnist_sweep.config import PROJECT_ROOT, ConfigError
from mnist_sweep.stack import free_port
from mnist_sweep.registry import CHAMPION, REGISTERED_MODEL
from mnist_sweep.sweep_tracking import FAILURE_TAG
from mnist_sweep.tracking import STUDY_TAG
from mnist_sweep.trial import (DEADLINE_ATTR, FAILURE_ATTR, PARENT_ATTR, RUN_ID_ATTR, WORKER_ATTR, open_storage,
                               this_worker, trial_id)



# --------------------------------------------------------------------------- its pieces, in-process


@pytest.fixture
def storage(tmp_path) -> optuna.storages.RDBStorage:
    return open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")


def test_a_batch_is_the_smallest_of_what_is_left_n_jobs_and_the_study_wide_room():
    assert sweeper.next_batch(todo=5, n_jobs=2, room=math.inf, deadline=math.inf, now=0) == (2, "")
    assert sweeper.next_batch(todo=1, n_jobs=2, room=math.inf, deadline=math.inf, now=0) == (1, "")
    assert sweeper.next_batch(todo=5, n_jobs=4, room=3, deadline=math.inf, now=0) == (3, "")


def test_no_batch_past_a_budget_and_the_reason_names_it():
    size, why = sweeper.next_batch(todo=5, n_jobs=2, room=0, deadline=math.inf, now=0)
    assert size == 0 and why.format(max_trials=3, timeout=None).startswith("the study holds hydra.sweeper.max_trials=3")
    size, why = sweeper.next_batch(todo=5, n_jobs=2, room=math.inf, deadline=10.0, now=10.0)
    assert size == 0
    assert why.format(max_trials=None, timeout=0.5) == "hydra.sweeper.timeout=0.5s reached: no more trials start"


def test_the_study_wide_room_counts_finished_and_running_trials_of_every_worker(storage):
    study = optuna.create_study(study_name="s", storage=storage)
    assert sweeper.room(study, None) == math.inf
    done, failed = study.ask(), study.ask()
    study.tell(done, 0.5)
    study.tell(failed, state=TrialState.FAIL)  # a failed trial leaves its place to another
    study.ask()  # running, perhaps another worker's
    assert sweeper.room(study, 3) == 1 and sweeper.room(study, 2) == 0


def returns(*results: tuple[JobStatus, object]) -> list[JobReturn]:
    out = []
    for status, value in results:
        ret = JobReturn()
        ret.status = status
        ret._return_value = value
        out.append(ret)
    return out


def test_a_finished_job_is_recorded_once_and_a_crash_or_nan_fails_its_trial(storage):
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    told, untold, nan, crashed = (study.ask() for _ in range(4))
    study.tell(told.number, state=TrialState.PRUNED)  # its job said so: only the job knows
    sweeper.record_returns(study, storage, [told, untold, nan, crashed], returns(
        (JobStatus.COMPLETED, 0.9), (JobStatus.COMPLETED, 0.8), (JobStatus.COMPLETED, float("nan")),
        (JobStatus.FAILED, RuntimeError("boom"))), max_failure_rate=1.0)
    states = [(t.state, t.value) for t in study.get_trials()]
    assert states == [(TrialState.PRUNED, None), (TrialState.COMPLETE, 0.8), (TrialState.FAIL, None),
                      (TrialState.FAIL, None)]


def test_past_the_failure_rate_the_jobs_own_error_is_raised(storage):
    study = optuna.create_study(study_name="s", storage=storage)
    trials = [study.ask(), study.ask()]
    with pytest.raises(RuntimeError, match="boom"):
        sweeper.record_returns(study, storage, trials, returns(
            (JobStatus.COMPLETED, 0.5), (JobStatus.FAILED, RuntimeError("boom"))), max_failure_rate=0.4)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]


def test_exactly_one_worker_creates_the_study(storage):
    pruner = optuna.pruners.NopPruner()
    first, created = sweeper.open_study(storage, "s", ["maximize"], pruner)
    second, again = sweeper.open_study(storage, "s", ["maximize"], pruner)
    assert (created, again) == (True, False) and first._study_id == second._study_id


def test_a_job_is_told_its_trial_whatever_the_study_is_called():
    assert sweeper.handover("mnist_sweep", 7) == ("optuna.study='mnist_sweep'", "optuna.trial=7")
    assert sweeper.handover("it's a\\study", 0)[0] == "optuna.study='it\\'s a\\\\study'"
    # the deadline travels the same way, so a job in another process or on another machine has it
    assert sweeper.handover("s", 1, 1764547200.25)[2] == "optuna.deadline=1764547200.250"


SPACE = sweeper.parse_space(["model=choice(shallow, deep)", "epochs=choice(2, 4, 8)",
                             "optim.lr=tag(log, interval(0.02, 0.3))", "model.channels=range(8, 32, step=8)"])[0]


def test_enqueued_points_must_lie_in_the_search_space_or_it_is_one_line_naming_them():
    sweeper.check_points([{"model": "deep", "epochs": 4, "optim.lr": 0.1, "model.channels": 16}, {"epochs": 2}], SPACE)
    for point, why in (({"optim.lr": 0.5}, "optim.lr=0.5 is outside its search range"),
                       ({"model": "wide"}, "model=wide is outside its search range"),
                       ({"model.channels": 12}, "model.channels=12 is outside its search range"),
                       ({"epochs": "four"}, "epochs=four is outside its search range"),
                       ({"optim.momentum": 0.9}, "optim.momentum is not in the search space (model, epochs")):
        with pytest.raises(ConfigError) as error:
            sweeper.check_points([{"epochs": 2}, point], SPACE)
        assert str(error.value).startswith(f"enqueued point 1 ({point}): ") and why in str(error.value)
        assert "\n" not in str(error.value)


def test_enqueued_points_are_the_first_trials_and_a_rerun_does_not_queue_them_again(storage):
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    points = [{"model": "deep", "epochs": 4, "optim.lr": 0.1, "model.channels": 16}, {"epochs": 8}]
    sweeper.enqueue(study, points)
    sweeper.enqueue(study, points)  # the same command again, or a second worker: queued once
    first, second = study.ask(), study.ask()
    for trial in (first, second):
        for name, distribution in SPACE.items():
            trial._suggest(name, distribution)  # as the sweeper suggests each trial's params
    assert first.params == points[0]
    assert second.params["epochs"] == 8 and set(second.params) == set(SPACE)  # the rest sampled
    assert len(study.trials) == 2


def test_a_warm_start_takes_another_studys_best_trials_best_first(storage):
    source = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    for lr, value in ((0.05, 0.97), (0.1, 0.99), (0.2, 0.98)):
        source.add_trial(optuna.trial.create_trial(params={"optim.lr": lr}, value=value,
                                                   distributions={"optim.lr": SPACE["optim.lr"]}))
    source.tell(source.ask(), state=TrialState.FAIL)
    assert sweeper.best_points(storage, "old", 2) == [{"optim.lr": 0.1}, {"optim.lr": 0.2}]
    assert sweeper.best_points(storage, None, 5) == []
    with pytest.raises(ConfigError, match="hydra.sweeper.warm_start.study=gone: no such study"):
        sweeper.best_points(storage, "gone", 5)


def test_the_results_file_holds_the_best_trial_so_far(storage, tmp_path):
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    sweeper.save_results(study, str(tmp_path / "empty.yaml"))
    assert OmegaConf.load(tmp_path / "empty.yaml") == {"name": "optuna", "best_params": {}, "best_value": None}
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    sweeper.save_results(study, str(tmp_path / "best.yaml"))
    assert OmegaConf.load(tmp_path / "best.yaml") == {"name": "optuna", "best_params": study.best_params,
                                                      "best_value": study.best_value}


def test_a_swallowed_ctrl_c_is_still_remembered():
    before = signal.getsignal(signal.SIGINT)
    with sweeper.ctrl_c_remembered() as interrupted:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            pass  # what Python does to one raised in a garbage-collector callback
        assert interrupted.is_set()  # so the sweep loop still stops before its next trial
    assert signal.getsignal(signal.SIGINT) is before


def test_a_ctrl_c_that_lands_while_a_trial_is_asked_fails_that_trial_and_stops_the_sweep(storage):
    """Here the Ctrl-C comes after the trial exists, where a sampler would still be drawing its
    params: raised there, it once left the trial RUNNING for good, and the study's parent run with it."""
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")

    def ask(study, storage, space, fixed):
        trial = study.ask()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler runs here
        return trial, ()

    def launch(overrides, initial_job_idx):
        raise AssertionError("a batch Ctrl-C stopped was launched")

    this = SimpleNamespace(finish_running=False, n_trials=3, n_jobs=1, max_trials=None, timeout=None, _ask=ask,
                           tracker=SimpleNamespace(check=lambda study: None), launcher=SimpleNamespace(launch=launch),
                           heartbeat_interval=None, job_idx=0, max_failure_rate=0.0)
    with sweeper.ctrl_c_remembered() as interrupted, pytest.raises(KeyboardInterrupt):
        sweeper.StudySweeper._run_batches(this, study, storage, {}, {}, interrupted, math.inf)
    assert [t.state for t in study.trials] == [TrialState.FAIL]


def test_the_search_space_is_the_plugins_and_a_range_optuna_rejects_is_one_line_naming_it():
    space = ["optim.lr=tag(log, interval(0.02, 0.3))", "model=deep", "optim.lr=tag(log, interval(0.01, 0.1))"]
    # the last of a key wins
    assert sweeper.parse_space(space) == ({"optim.lr": FloatDistribution(0.01, 0.1, log=True)}, {"model": "deep"})
    searched, fixed = sweeper.parse_space(["model.channels=[4,8]", "model.channels=choice(4, 8)", "epochs=choice(1, 2)",
                                           "epochs=3"])
    assert "model.channels" in searched and "model.channels" not in fixed  # searched, as its last override says
    assert fixed["epochs"] == "3" and "epochs" not in searched
    for bad, why in (("optim.lr=tag(log, interval(-1, 0.1))", "`low > 0` must hold for `log=True`"),
                     ("epochs=range(1, 5, step=0)", "`step > 0` must hold"),
                     ("epochs=choice()", "empty choice is not legal")):
        with pytest.raises(ConfigError) as error:
            sweeper.parse_space(["model=deep", bad])
        message = str(error.value)
        assert message.startswith(f"the search range {bad} is one Optuna cannot search") and why in message
        assert message.endswith("change it on the command line or in hydra.sweeper.params") and "\n" not in message


# Each range syntax of a search space, and the one of Optuna 5's classes the sweeper stores for it
RANGES = {
    "model=choice(shallow, deep)": CategoricalDistribution(["shallow", "deep"]),
    "model.dropout=interval(0.0, 0.4)": FloatDistribution(0.0, 0.4),
    "optim.lr=tag(log, interval(0.02, 0.3))": FloatDistribution(0.02, 0.3, log=True),
    "model.channels=range(8, 40, step=8)": IntDistribution(8, 40, step=8),  # (the plugin keeps the stop)
    "optim.weight_decay=range(0.0, 0.001, step=0.0005)": FloatDistribution(0.0, 0.001, step=0.0005),
}


def test_every_range_syntax_is_stored_in_optuna_5s_classes_and_the_study_loads_without_a_warning(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # optuna 2's classes warn (FutureWarning: removed in v6.0.0)
        space, _ = sweeper.parse_space(list(RANGES))
        assert space == {override.split("=")[0]: distribution for override, distribution in RANGES.items()}
        study = optuna.create_study(study_name="s", storage=open_storage(url))
        trial = study.ask()
        for name, distribution in space.items():  # as the sweeper suggests each trial's params
            trial._suggest(name, distribution)
        study.tell(trial, 0.5)
        (stored,) = optuna.load_study(study_name="s", storage=open_storage(url)).get_trials()
    assert stored.distributions == space


def test_optuna_2s_classes_become_the_equivalent_of_optuna_5s(tmp_path):
    """Those the plugin builds (the deprecated hydra.sweeper.search_space also makes IntLogUniform),
    each as Optuna converts it itself, and a grid sampler's values the plugin's for them."""
    from optuna.distributions import _convert_old_distribution_to_new_distribution as optunas

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = [UniformDistribution(0.0, 0.4), LogUniformDistribution(0.02, 0.3),
               DiscreteUniformDistribution(0, 1, 0.25), IntUniformDistribution(8, 32, step=8),
               IntLogUniformDistribution(1, 64)]
        grid = OptunaSweeperImpl._to_grid_sampler_choices(None, old[3]), OptunaSweeperImpl._to_grid_sampler_choices(
            None, old[2])
    for distribution in old:
        new = sweeper.current(distribution)
        assert new == optunas(distribution, suppress_warning=True) and type(new) in (FloatDistribution, IntDistribution)
    choice = CategoricalDistribution(["a", "b"])
    assert sweeper.current(choice) is choice
    ours = sweeper.StudySweeper._to_grid_sampler_choices
    assert (ours(None, sweeper.current(old[3])), ours(None, sweeper.current(old[2]))) == grid
    assert ours(None, choice) == ["a", "b"]
    with pytest.raises(ValueError, match="only supports discrete"):
        ours(None, sweeper.current(old[0]))


def old_study(url: str, space: dict) -> optuna.Study:
    """A study as this sweeper wrote one before: each param suggested with the plugin's optuna 2
    classes (UniformDistribution, LogUniformDistribution, IntUniformDistribution, ...); two trials
    completed, a third running, a fourth failed by a store that went away and re-queued."""
    storage = open_storage(url, max_retry=1)
    study = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for end in (0.6, 0.7, "running", None):
            trial = study.ask()
            for name, distribution in space.items():
                trial._suggest(name, distribution)
            if end == "running":
                continue
            if end is None:
                sweeper.fail_ended_job(study, storage, trial, "its job lost a store: Connection refused")
            else:
                study.tell(trial, end)
    return study


def test_a_study_written_in_optuna_2s_classes_is_upgraded_and_goes_on_with_its_retry(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = [override for override in RANGES if not override.startswith("optim.weight_decay")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old_space = create_params_from_overrides(overrides)[0]  # what the plugin built
    old_study(url, old_space)
    storage = open_storage(url, max_retry=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        space, _ = sweeper.parse_space(overrides)
        study, created = sweeper.open_study(storage, "old", ["maximize"], optuna.pruners.NopPruner())
        assert not created and sweeper.upgrade_distributions(storage, "old") == 0  # all done the first time
        study.sampler = optuna.samplers.TPESampler(n_startup_trials=2, seed=0)  # modelling the old trials too
        asked = []
        for value in (0.8, 0.9):
            trial = study.ask()
            for name, distribution in space.items():
                trial._suggest(name, distribution)
            study.tell(trial, value)
            asked.append(trial.number)
        trials = optuna.load_study(study_name="old", storage=open_storage(url)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING, TrialState.FAIL] + [
        TrialState.COMPLETE] * 2
    retry = trials[asked[0]]  # the re-queued trial came first, with its failed trial's params
    assert retry.system_attrs["failed_trial"] == 3 and retry.params == trials[3].params
    assert all(t.distributions == {k: space[k] for k in t.distributions} for t in trials)  # old and new alike
    assert all(type(d) in (FloatDistribution, IntDistribution, CategoricalDistribution)
               for t in trials for d in t.distributions.values())


def test_a_trial_whose_job_on_this_host_is_gone_fails_at_once_with_why(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", max_retry=1)
    study = optuna.create_study(study_name="s", storage=storage)
    gone, alive, elsewhere, unknown = (study.ask() for _ in range(4))
    pid = ended_pid()
    for trial, worker in ((gone, {**this_worker(), "pid": pid}), (alive, this_worker()),
                          (elsewhere, {"host": "elsewhere", "pid": pid})):  # unknown: asked, its job not started
        storage.set_trial_user_attr(trial_id(trial), WORKER_ATTR, worker)
    sweeper.fail_abandoned(study, storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, *[TrialState.RUNNING] * 3, TrialState.WAITING]  # re-queued
    assert trials[0].user_attrs[FAILURE_ATTR] == (f"its job (process {pid} on {socket.gethostname()}) ended "
                                                  "mid-trial: killed, or crashed")
    # the retry carries none of the failed trial's user attributes: with its worker's host and pid,
    # it would look gone too, before its own job records itself
    assert trials[4].user_attrs == {} and trials[4].system_attrs["fixed_params"] == trials[0].params



def test_a_job_that_lost_a_store_fails_its_trial_with_why_and_it_is_requeued_once(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", max_retry=2)
    study = optuna.create_study(study_name="s", storage=storage)
    lost, crashed = study.ask(), study.ask()
    down = requests.ConnectionError("Connection refused")  # what MLflow's client meets when its server is down
    sweeper.record_returns(study, storage, [lost, crashed], returns(
        (JobStatus.FAILED, down), (JobStatus.FAILED, RuntimeError("boom"))), max_failure_rate=1.0)
    # two workers failing the same trial at once (fail_abandoned on one host): the second finds it
    # failed already and re-queues nothing
    sweeper.fail_ended_job(study, storage, lost, "again")
    trials = study.get_trials()
    # one retry, of the trial that lost a store; none of the crash
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs[FAILURE_ATTR] == "its job lost a store: Connection refused"
    assert trials[2].system_attrs["fixed_params"] == trials[0].params

# --------------------------------------------------------------------------- whole sweeps, in subprocesses


def sweep(overrides: list[str], *args: str) -> None:
    sweep_here(*overrides, *args)


def study(tmp_path, name="mnist_sweep") -> optuna.Study:
    # Through open_storage: it takes the store's lock, so a test polling a sweep that is still
    # creating the database's schema waits for it instead of racing it.
    storage = open_storage(f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}")
    return optuna.load_study(study_name=name, storage=storage)


def assert_runs_match_trials(kids, trials) -> None:
    """Each run carries its trial's number, and trained that trial's params; the trial points back."""
    by_number = {t.number: t for t in trials}
    for kid in kids:
        trial = by_number[int(kid.data.tags["trial"])]
        assert kid.data.tags[STUDY_TAG] == "mnist_sweep"
        assert float(kid.data.params["optim.lr"]) == pytest.approx(trial.params["optim.lr"])
        assert kid.data.params["model"] == trial.params["model"]
        assert trial.user_attrs[RUN_ID_ATTR] == kid.info.run_id
        if trial.state == optuna.trial.TrialState.COMPLETE and "test_acc" in kid.data.metrics:
            assert kid.data.metrics["test_acc"] == pytest.approx(trial.value)


def assert_ended_as_their_trials(kids, trials) -> None:
    """A completed trial's run FINISHED; a pruned trial's run KILLED, tagged ``pruned``."""
    by_number = {t.number: t for t in trials}
    for kid in kids:
        if by_number[int(kid.data.tags["trial"])].state == optuna.trial.TrialState.PRUNED:
            assert kid.info.status == "KILLED" and "pruned" in kid.data.tags
        else:
            assert kid.info.status == "FINISHED"


def assert_models_only_for_leaders(client: MlflowClient, kids, trials) -> None:
    """mlflow.log_models=best: every run keeps its weights; the full model only for a trial that
    led the study when it ended (completed trials in the order they ended)."""
    best, leaders = float("-inf"), set()
    for trial in sorted(trials, key=lambda t: t.datetime_complete):
        if trial.state == optuna.trial.TrialState.COMPLETE and trial.value >= best:
            best, leaders = trial.value, leaders | {trial.user_attrs[RUN_ID_ATTR]}
    completed = {t.user_attrs[RUN_ID_ATTR] for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    for kid in kids:
        if kid.info.run_id in completed:  # a pruned trial stops before its outputs
            assert [a.path for a in client.list_artifacts(kid.info.run_id, "weights")] == ["weights/state_dict.pt"]
        assert (tracking.MODEL_URI_TAG in kid.data.tags) == (kid.info.run_id in leaders), kid.data.tags["trial"]


def runs(tmp_path) -> tuple[MlflowClient, list, dict]:
    """The client, the parent runs, and each parent's children."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    client = MlflowClient()
    everything = client.search_runs([client.get_experiment_by_name("mnist_sweep").experiment_id])
    parents = [r for r in everything if "mlflow.parentRunId" not in r.data.tags]
    children = {p.info.run_id: [r for r in everything if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
                for p in parents}
    return client, parents, children


@pytest.mark.slow
def test_sweep_records_study_parent_children_plots_and_champion_then_resumes(overrides, tmp_path):
    """~25 s: five trials in-process, each leader exporting a pt2 model (the champion must be one)."""
    overrides = [*overrides, "mlflow.model_format=pt2"]  # the champion the registry serves: a pt2 model
    sweep(overrides, "hydra.sweeper.n_trials=3", "mlflow.study_plots=true")
    trials = study(tmp_path).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3

    client, parents, children = runs(tmp_path)
    (parent,) = parents
    kids = children[parent.info.run_id]
    assert parent.info.run_name == "mnist_sweep" and parent.info.status == "FINISHED"
    assert parent.data.tags[STUDY_TAG] == "mnist_sweep"
    assert study(tmp_path).user_attrs[PARENT_ATTR] == parent.info.run_id
    assert len(kids) == 3 and {k.info.status for k in kids} == {"FINISHED"}
    assert sorted(k.data.tags["trial"] for k in kids) == ["0", "1", "2"]
    assert_runs_match_trials(kids, trials)
    assert {r.data.tags["mlflow.source.name"] for r in [parent, *kids]} == {"python -m mnist_sweep -m"}
    assert all(sorted(i.dataset.name for i in k.inputs.dataset_inputs) == ["mnist-test", "mnist-train"] for k in kids)
    for kid in kids:
        # data.batch_size=32 is fixed by the overrides: Optuna keeps fixed values as user attributes
        assert kid.data.params["data.batch_size"] == trials[0].user_attrs["data.batch_size"] == "32"
        assert "optuna.trial" not in kid.data.params  # the trial's identity is a tag

    best = max(trials, key=lambda t: t.value)
    assert parent.data.metrics["best_test_acc"] == pytest.approx(best.value)
    best_kid = client.get_run(parent.data.tags["best_run_id"])
    assert best_kid.data.tags["trial"] == str(best.number) == parent.data.tags["best.trial"]
    assert parent.data.tags["best.model"] == best.params["model"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "optimization_results.yaml" in artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {f"plots/{p}.png" for p in ("optimization_history", "param_importances", "parallel_coordinate")}
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    assert champion.run_id == best_kid.info.run_id
    assert_models_only_for_leaders(client, kids, trials)
    images = torch.zeros(3, 1, 28, 28)
    with torch.inference_mode():  # the champion is a pt2 model that loads without a pickle
        assert registry.load_model(f"models:/{REGISTERED_MODEL}@{CHAMPION}")(images).shape == (3, 10)

    sweep(overrides, "hydra.sweeper.n_trials=2")  # same study name: continues it, under the same parent
    trials = study(tmp_path).get_trials()
    assert len(trials) == 5 and {t.state for t in trials} <= FINISHED
    first_points = [t.params for t in trials[:2]]
    assert all(t.params not in first_points for t in trials[3:])  # not a replay of the first trials
    client, parents, children = runs(tmp_path)
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert sorted(k.data.tags["trial"] for k in children[parent.info.run_id]) == ["0", "1", "2", "3", "4"]
    assert_runs_match_trials(children[parent.info.run_id], trials)
    assert_ended_as_their_trials(children[parent.info.run_id], trials)
    history = client.get_metric_history(parent.info.run_id, "best_test_acc")
    assert sorted(m.step for m in history) == [3, 5]  # refreshed by each invocation, step = finished trials
    assert_models_only_for_leaders(client, children[parent.info.run_id], trials)


@pytest.mark.slow
def test_a_diverging_trial_does_not_stop_the_sweep(overrides, tmp_path):
    sweep(overrides, "hydra.sweeper.n_trials=4", "optim.lr=choice(0.05, 1e8)")
    trials = study(tmp_path).get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials) and len(trials) == 4
    diverged = [t for t in trials if t.params["optim.lr"] == 1e8]
    assert diverged and all(t.value == 0.0 for t in diverged)
    client, (parent,), children = runs(tmp_path)
    statuses = sorted(k.info.status for k in children[parent.info.run_id])
    assert "FAILED" in statuses and "FINISHED" in statuses and parent.info.status == "FINISHED"
    assert client.list_artifacts(parent.info.run_id, "plots") == []  # mlflow.study_plots=false (the tests')


@pytest.mark.slow
def test_two_joblib_workers_record_every_trial_in_both_stores(overrides, tmp_path):
    """~30 s: joblib's two worker processes, each importing torch and MLflow."""
    sweep(overrides, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
          "hydra.sweeper.n_trials=4", "threads=0")
    trials = study(tmp_path).get_trials()
    assert len(trials) == 4 and {t.state for t in trials} <= FINISHED
    _, (parent,), children = runs(tmp_path)
    kids = children[parent.info.run_id]
    assert sorted(k.data.tags["trial"] for k in kids) == ["0", "1", "2", "3"]
    assert_ended_as_their_trials(kids, trials)
    assert_runs_match_trials(kids, trials)
    # threads=0 (auto) splits the cores between the two workers
    assert {k.data.tags["torch.threads"] for k in kids} == {str(max(1, len(os.sched_getaffinity(0)) // 2))}


@pytest.mark.slow
def test_ctrl_c_ends_the_sweep_cleanly(overrides, tmp_path):
    """~30 s: a sweep process, interrupted once its trials run, then waited on to the end of its cleanup."""
    args = [sys.executable, "-m", "mnist_sweep", "-m", *overrides, "hydra.sweeper.n_trials=20", "epochs=5"]
    log = tmp_path / "sweep.log"
    # faulthandler: if the sweep ever hangs after Ctrl-C, SIGABRT makes it print every thread's stack
    with log.open("w") as output:
        proc = subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until one trial is done and the next is running
            time.sleep(1)
            if not (tmp_path / "outputs" / "optuna.db").exists():
                continue
            try:
                done = study(tmp_path).get_trials(states=[optuna.trial.TrialState.COMPLETE])
            except KeyError:  # the study is not created yet
                continue
            if done:
                break
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=300)  # ~1 s; over 120 s were a Ctrl-C inside a store write (trial.ctrl_c_after_the_call)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=60)
            pytest.fail("the sweep did not end within 300 s of Ctrl-C; its log and stacks:\n" + log.read_text()[-8000:])
    finally:
        proc.kill()
    trials = study(tmp_path).get_trials()
    states = {t.state for t in trials}
    assert optuna.trial.TrialState.COMPLETE in states and optuna.trial.TrialState.RUNNING not in states
    _, (parent,), children = runs(tmp_path)
    assert parent.info.status == "KILLED", log.read_text()[-6000:]
    assert "RUNNING" not in {k.info.status for k in children[parent.info.run_id]}


@pytest.mark.slow
def test_two_workers_started_together_share_one_study_and_one_parent(overrides, tmp_path):
    """~30-40 s: two sweep processes started at once, which is the point."""
    workers = [start(["-m", *overrides, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / f'w{i}'}"])
               for i in range(2)]
    for proc in workers:
        finish(proc)
    trials = study(tmp_path).get_trials()
    assert len(trials) == 4 and {t.state for t in trials} <= FINISHED  # the default median pruner may stop some
    points = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(points)) == 4  # different seeds: no duplicate proposals

    client, parents, children = runs(tmp_path)
    (parent,) = parents  # one parent, though both workers found a fresh store
    kids = children[parent.info.run_id]
    assert sorted(int(k.data.tags["trial"]) for k in kids) == list(range(4))
    assert_runs_match_trials(kids, trials)
    assert_ended_as_their_trials(kids, trials)
    assert parent.info.status == "FINISHED"
    best = max((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    assert client.get_run(champion.run_id).data.metrics["test_acc"] == pytest.approx(best.value)
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert len({v.run_id for v in versions}) == len(versions)  # never two versions of one run


@pytest.mark.slow
def test_a_lone_worker_replays_its_search_from_the_seed(overrides, tmp_path):
    """~25-30 s: three 2-trial sweeps in-process: two seeded alike, one after a queued point."""
    for name in ("a", "b"):  # the shortest trials: only the points they draw matter here
        sweep(overrides, "hydra.sweeper.n_trials=2", f"hydra.sweeper.study_name={name}", "mlflow.model_format=null")
    first = [t.params for t in study(tmp_path, "a").get_trials()]
    assert first == [t.params for t in study(tmp_path, "b").get_trials()]
    # a queued point that fixes every param samples nothing: the sampler seeds at the next trial, whose
    # draw is not the point again (a prior's points are the searches' first draws, from seed 0)
    point = ",".join(f"{key}:{value}" for key, value in first[0].items())
    sweep(overrides, "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=c", "mlflow.model_format=null",
          f"hydra.sweeper.enqueue=[{{{point}}}]")
    queued, sampled = [t.params for t in study(tmp_path, "c").get_trials()]
    assert queued == first[0] and sampled != first[0]


@pytest.mark.slow
def test_a_killed_workers_trial_fails_at_once_and_its_retry_takes_up_its_run_from_the_checkpoint(overrides, tmp_path):
    """kill -9 of a worker inside the second epoch of a 3-epoch trial, after a completed one. The next
    worker on this machine fails the trial at once (its process is gone: no grace period to wait;
    another machine's worker waits for the heartbeat: the PostgreSQL test), re-queues it
    (max_retry), and the retry continues the killed trial's MLflow run after its checkpointed epoch."""
    args = [*overrides, "epochs=3", "data.batch_size=4", "hydra/sweeper/pruner=none", "hydra.sweeper.max_retry=1"]
    proc = start(["-m", *args, "hydra.sweeper.n_trials=10"])
    try:
        deadline = time.monotonic() + 300
        while True:  # a completed trial, and the next one's epoch 1 checkpointed: epoch 2 is training
            assert proc.poll() is None and time.monotonic() < deadline, "no trial reached its second epoch"
            time.sleep(0.01)
            with contextlib.suppress(Exception):  # the store or the study is not there yet
                trials = study(tmp_path).get_trials()
                if TrialState.COMPLETE in {t.state for t in trials} and trials[-1].state == TrialState.RUNNING \
                        and checkpoint_epoch(tmp_path / "outputs", trials[-1].user_attrs.get(RUN_ID_ATTR)) == 1:
                    break
        proc.kill()  # SIGKILL: no handler runs
        proc.wait(timeout=60)
    finally:
        proc.kill()
    before = study(tmp_path).get_trials()
    killed = before[-1]
    assert killed.state == TrialState.RUNNING  # what a dead worker leaves behind

    sweep(args, "hydra.sweeper.n_trials=1")
    after = study(tmp_path).get_trials()
    assert after[killed.number].state == TrialState.FAIL and "ended mid-trial" in after[killed.number].user_attrs[
        FAILURE_ATTR]
    completed = [t.number for t in before if t.state == TrialState.COMPLETE]
    assert all(after[n].state == TrialState.COMPLETE for n in completed)
    (retry,) = after[len(before):]
    assert retry.system_attrs["retry_history"] == [killed.number] and retry.state == TrialState.COMPLETE
    assert retry.user_attrs[RUN_ID_ATTR] == killed.user_attrs[RUN_ID_ATTR]  # the same run, taken up again
    client, (parent,), children = runs(tmp_path)
    continued = client.get_run(retry.user_attrs[RUN_ID_ATTR])
    assert continued.info.status == "FINISHED" and continued.data.tags["trial"] == str(retry.number)
    assert continued.data.tags[tracking.RESUMED_TAG] == "after epoch 1"
    assert [m.step for m in client.get_metric_history(continued.info.run_id, "test_acc")] == [1, 2, 3]
    assert continued.data.metrics["test_acc"] == pytest.approx(retry.value)
    assert "RUNNING" not in {k.info.status for k in children[parent.info.run_id]} | {parent.info.status}


@pytest.mark.slow  # two processes
def test_a_search_range_optuna_rejects_or_a_study_file_that_is_no_database_is_one_line(overrides, tmp_path):
    """~30 s: three sweep processes, each ending in its one line as a user meets it."""
    bad = "optim.lr=tag(log, interval(-1, 0.1))"
    assert_one_line_error(run_cli("mnist_sweep", "-m", *overrides, bad), f"the search range {bad}", "`low > 0`")
    notes = tmp_path / "outputs" / "optuna.db"
    notes.write_text("my notes, not a database")
    assert_one_line_error(run_cli("mnist_sweep", "-m", *overrides), f"{notes} is not an SQLite database",
                          "move it away")
    assert notes.read_text() == "my notes, not a database"
    notes.unlink()
    assert_one_line_error(run_cli("mnist_sweep", "-m", *overrides, "hydra.sweeper.enqueue=[{optim.lr:5}]"),
                          "enqueued point 0 ({'optim.lr': 5}): optim.lr=5 is outside its search range")
    assert optuna.get_all_study_names(open_storage(f"sqlite:///{notes}")) == []  # refused before the study was made


@pytest.mark.slow
def test_the_median_pruner_stops_hopeless_trials_early(overrides, tmp_path):
    sweep(overrides, "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=1",
          "hydra.sweeper.n_trials=6", "epochs=3", "model=shallow", "augment=none", "model.dropout=0",
          "optim.weight_decay=0", "optim.lr=choice(0.05, 1e-6)")  # the learning rate alone decides
    trials = study(tmp_path).get_trials()
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    # once a good trial has set the median, every hopeless one stops at its first check past the warm-up
    first_good = min(t.number for t in trials if t.params["optim.lr"] == 0.05)
    hopeless = [t for t in trials if t.params["optim.lr"] == 1e-6 and t.number > first_good]
    assert hopeless and all(t.state == optuna.trial.TrialState.PRUNED for t in hopeless)
    # the pruner's steps are the percent of its training a trial has done: 3 epochs of 4 reports each
    assert all(set(t.intermediate_values) <= {round(100 * k / 12) for k in range(1, 13)} for t in trials)
    assert all(max(t.intermediate_values) < 100 for t in pruned)
    warmup = 25  # hydra.sweeper.pruner.n_warmup_steps: no trial stops before a quarter of its training
    assert all(max(t.intermediate_values) >= warmup for t in pruned)
    client, (parent,), _ = runs(tmp_path)
    for trial in pruned:
        run = client.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert run.info.status == "KILLED" and f"trial {trial.number} pruned" in run.data.tags["pruned"]
        assert len(client.get_metric_history(run.info.run_id, "check_acc")) >= 1  # it keeps its metrics
        assert len(client.get_metric_history(run.info.run_id, "test_acc")) < 3  # fewer epochs trained
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_budgets_study_wide_cap_and_wall_clock(overrides, tmp_path, capsys):
    """~30 s: two sweeps in-process; the soft budget's trial runs past its 6 s budget, which is the point."""
    # another worker's trials count against the study-wide cap: one finished, one still running
    other = optuna.create_study(study_name="mnist_sweep", direction="maximize",
                                storage=open_storage(f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}"))
    other.tell(other.ask(), 0.5)
    other.ask()
    sweep(overrides, "hydra.sweeper.n_trials=4", "hydra.sweeper.max_trials=3")
    assert len(study(tmp_path).get_trials()) == 3 and "hydra.sweeper.max_trials=3 trials" in capsys.readouterr().out
    # finish_running: today's soft budget, the running trial trains to its end, past the budget (the
    # deadline's own stop: the joblib test below and tests/test_run.py's in-process one)
    started = datetime.now()  # as Optuna stamps its trials: local time
    sweep(overrides, "hydra.sweeper.n_trials=5", "hydra.sweeper.timeout=6", "hydra.sweeper.study_name=soft",
          "hydra.sweeper.finish_running=true", "epochs=25", "data.batch_size=4", "hydra/sweeper/pruner=none")
    (kept,) = study(tmp_path, "soft").get_trials()
    assert kept.state == TrialState.COMPLETE and max(kept.intermediate_values) == 100  # all 25 epochs
    assert (kept.datetime_complete - started).total_seconds() > 6  # it ended after the budget did


@pytest.mark.slow
def test_two_workers_share_the_deadline_and_run_the_enqueued_points_first(overrides, tmp_path):
    """Jobs in processes of their own (joblib) read the sweep's deadline from their config."""
    sweep(overrides, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
          "hydra.sweeper.n_trials=4", "hydra.sweeper.timeout=10", "epochs=2000",
          "hydra.sweeper.enqueue=[{optim.lr:0.05,model:deep},{optim.lr:0.1}]")
    trials = study(tmp_path).get_trials()
    assert len(trials) == 2  # one batch, started before the deadline; none after it
    assert [t.params["optim.lr"] for t in trials] == [0.05, 0.1] and trials[0].params["model"] == "deep"
    assert all(t.state == TrialState.PRUNED and DEADLINE_ATTR in t.user_attrs for t in trials)
    _, (parent,), children = runs(tmp_path)
    assert {k.info.status for k in children[parent.info.run_id]} == {"KILLED"} and parent.info.status == "FINISHED"
    assert all(tracking.DEADLINE_TAG in k.data.tags for k in children[parent.info.run_id])
    by_run = {k.info.run_id: k for k in children[parent.info.run_id]}
    assert all(by_run[t.user_attrs[RUN_ID_ATTR]].data.metrics["test_acc"] == t.value for t in trials)  # kept
    best = max(trials, key=lambda t: t.value)  # a search cut short by its deadline still has its best
    assert parent.data.tags["best_run_id"] == best.user_attrs[RUN_ID_ATTR]


@pytest.mark.slow
def test_with_a_validation_split_the_study_maximises_val_acc_and_the_champion_is_chosen_by_it(overrides, tmp_path):
    # one short epoch at low learning rates: accuracies in between, where validation and test disagree
    sweep(overrides, "hydra.sweeper.n_trials=3", "data.val_size=64", "hydra/sweeper/pruner=none",
          "optim.lr=tag(log, interval(1e-4, 3e-3))")
    trials = study(tmp_path).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    client, (parent,), children = runs(tmp_path)
    kids = children[parent.info.run_id]
    by_run = {k.info.run_id: k for k in kids}
    for trial in trials:  # each trial's value is its run's validation accuracy, not its test accuracy
        assert trial.value == pytest.approx(by_run[trial.user_attrs[RUN_ID_ATTR]].data.metrics["val_acc"])
    assert any(k.data.metrics["val_acc"] != k.data.metrics["test_acc"] for k in kids)  # they can tell apart
    best_val = max(k.data.metrics["val_acc"] for k in kids)
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    assert by_run[champion.run_id].data.metrics["val_acc"] == best_val
    assert parent.data.metrics["best_val_acc"] == best_val
    assert parent.data.metrics["best_test_acc"] == by_run[champion.run_id].data.metrics["test_acc"]  # its report


# ------------------------------------------------------------- on the shared stores (PostgreSQL, MLflow server)


@pytest.fixture
def name() -> str:
    """A study and experiment of this test's own: the servers are shared by the whole session."""
    return f"t{uuid.uuid4().hex[:10]}"


def with_password(uri: str, user: str, password: str) -> str:
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest.split('@')[-1]}"


@pytest.mark.slow
def test_two_workers_on_postgres_and_a_tracking_server(local_stack, overrides, name, tmp_path):
    """~40-60 s: two worker processes on the session's PostgreSQL and tracking server, each exporting models."""
    # The password in both URIs, as a careless user would put it: it must not leak into MLflow.
    # (This loopback MLflow server has no auth: it ignores the basic-auth credentials.)
    # The study's URI comes from the environment; the tracking URI is typed on the command line, so
    # it is in every job's overrides, config files and flattened params.
    study_uri = with_password(local_stack.optuna_storage, "mnist_sweep", local_stack.password)
    env = {**local_stack.env(), "OPTUNA_STORAGE": study_uri}
    typed = f"mlflow.tracking_uri={with_password(local_stack.tracking_uri, 'alice', local_stack.password)}"
    workers = [start(["-m", *server_args(overrides, name), typed, "hydra.sweeper.n_trials=2",
                      f"hydra.sweep.dir={tmp_path / f'w{i}'}"], env) for i in range(2)]
    outputs = [finish(proc) for proc in workers]
    assert all(local_stack.password not in output for output in outputs)  # log lines are redacted

    trials = load_study(local_stack, name).get_trials()
    assert len(trials) == 4 and {t.state for t in trials} <= FINISHED
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # no duplicate proposals

    client, (parent,), kids = study_runs(local_stack, name)
    assert parent.info.run_name == name and parent.info.status == "FINISHED"
    assert load_study(local_stack, name).user_attrs[PARENT_ATTR] == parent.info.run_id
    assert sorted(int(k.data.tags["trial"]) for k in kids) == list(range(4))
    assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parent.info.run_id}
    for kid in kids:
        trial = trials[int(kid.data.tags["trial"])]
        assert kid.data.tags[STUDY_TAG] == name and trial.user_attrs[RUN_ID_ATTR] == kid.info.run_id
        assert kid.info.artifact_uri.startswith("mlflow-artifacts:")  # through the server, not a local folder

    # The champion is a registered model any machine can load through the server
    best = max((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    best_run = client.get_run(best.user_attrs[RUN_ID_ATTR])
    assert parent.data.tags["best_run_id"] == best_run.info.run_id
    # other tests' sweeps share this registry: the study's best is registered unless a champion at
    # least as good was there first (the tiny digits often score 1.0)
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    acc = {v.run_id: client.get_run(v.run_id).data.metrics["test_acc"] for v in versions}
    assert acc[champion.run_id] == max(acc.values()) >= best.value
    elsewhere = tmp_path / "another-machine"
    elsewhere.mkdir()
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, mlflow; print(type(mlflow.pytorch.load_model(sys.argv[1])).__name__)",
         best_run.data.tags[tracking.MODEL_URI_TAG]],
        cwd=elsewhere, env={**os.environ, "MLFLOW_TRACKING_URI": local_stack.tracking_uri},
        capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]

    # The password appears nowhere in the tracking server: params, tags, artifacts
    mlflow.set_tracking_uri(local_stack.tracking_uri)
    files = []
    for run in [parent, *kids]:
        assert all(local_stack.password not in str(v) for v in (*run.data.params.values(), *run.data.tags.values()))
        # a run's own artifacts (a pruned run has none), and its logged model's (MLflow 3 keeps them apart)
        where = [dict(run_id=run.info.run_id)]
        if tracking.MODEL_URI_TAG in run.data.tags:
            where.append(dict(artifact_uri=run.data.tags[tracking.MODEL_URI_TAG]))
        for i, source in enumerate(where):
            dst = tmp_path / run.info.run_id / str(i)
            root = Path(mlflow.artifacts.download_artifacts(**source, dst_path=str(dst)))
            files += [p for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "hydra.yaml", "overrides.yaml", "state_dict.pt", "MLmodel",
            "optimization_results.yaml"} <= names
    assert not [p for p in files if local_stack.password.encode() in p.read_bytes()]


@pytest.mark.slow
def test_a_killed_worker_is_recovered_by_another(local_stack, overrides, name, monkeypatch):
    """~30-45 s: a worker process killed mid-trial, the heartbeat's grace period (3 s), then a second worker."""
    heartbeat = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    doomed = start(["-m", *server_args(overrides, name), *heartbeat, "hydra.sweeper.n_trials=5", "epochs=30"],
                   local_stack.env())
    try:
        deadline = time.monotonic() + 300
        while True:  # until its first trial runs and has its MLflow run
            assert doomed.poll() is None and time.monotonic() < deadline, "no trial started"
            time.sleep(0.5)
            try:
                trials = load_study(local_stack, name).get_trials()
            except KeyError:  # no study yet
                continue
            if trials and RUN_ID_ATTR in trials[0].user_attrs:
                break
        doomed.send_signal(signal.SIGKILL)  # no handler runs
        doomed.wait(timeout=60)
    finally:
        doomed.kill()
    assert load_study(local_stack, name).get_trials()[0].state == optuna.trial.TrialState.RUNNING
    time.sleep(4)  # past the grace period
    for key, value in local_stack.env().items():  # the other worker: in this process, on the same stores
        monkeypatch.setenv(key, value)
    sweep(server_args(overrides, name), *heartbeat, "hydra.sweeper.n_trials=1")

    trials = load_study(local_stack, name).get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL and trials[1].state in FINISHED
    client, (parent,), _ = study_runs(local_stack, name)
    dead = client.get_run(trials[0].user_attrs[RUN_ID_ATTR])
    assert dead.info.status == "FAILED" and "no heartbeat" in dead.data.tags[FAILURE_TAG]  # past its grace period
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_a_submitit_local_sweep_keeps_the_trial_handover_and_pruning(local_stack, overrides, name, tmp_path):
    """~50-60 s: submitit starts each trial as a job process of its own, and polls for it to end."""
    finish(start(["-m", *server_args(overrides, name), "hydra/launcher=submitit_local", "hydra.sweeper.n_trials=2",
                  f"hydra.launcher.submitit_folder='{tmp_path / 'submitit'}/%j'"], local_stack.env()))
    assert_each_job_ran_its_trial(local_stack, name, 2)
    logs = list((tmp_path / "submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # each trial was its own submitit job


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:  # refused, or not up yet (URLError is an OSError)
        return False


@pytest.mark.slow
def test_a_tracking_server_gone_longer_than_outage_s_stops_the_sweep_and_keeps_the_study(
        local_stack, overrides, name, tmp_path):
    """~60 s: a tracking server of its own, stopped for longer than outage_s while a sweep process waits."""
    port = free_port()
    shutil.copy(shared("mlflow_schema"), tmp_path / "mlflow.db")  # the server starts without making its tables
    server = subprocess.Popen(  # a tracking server of this test's own, to stop; as light as make ui's
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        env = {**local_stack.env(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
        deadline = time.monotonic() + 120
        while not answers(f"http://127.0.0.1:{port}/health"):
            assert time.monotonic() < deadline, "the test's tracking server did not start"
            time.sleep(0.5)
        # gone for good: past outage_s the worker stops, with today's one line
        proc = start(["-m", *server_args(overrides, name), "hydra.sweeper.n_trials=3", "epochs=4",
                      "hydra/sweeper/pruner=none", "outage_s=5"], env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until trial 0 has logged its first epoch
            time.sleep(0.5)
            try:
                trials = load_study(local_stack, name).get_trials()
            except KeyError:
                continue
            if trials and trials[0].intermediate_values:
                break
        os.killpg(server.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    trials = load_study(local_stack, name).get_trials()
    assert trials[0].state == optuna.trial.TrialState.COMPLETE  # trained to the end: the study has its result
    assert len(trials) == 1  # no trial started without a place to record it
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopped answering" in errors[0], output[-3000:]


@pytest.mark.slow
def test_a_pareto_search_weighs_accuracy_against_cost_logs_its_front_and_crowns_the_cheapest_feasible(
        overrides, tmp_path, capsys):
    sweep(overrides, "hydra/sweeper=pareto", "hydra.sweeper.n_trials=3", "sweep.min_accuracy=0.3",
                 "mlflow.study_plots=true", "model=shallow", "model.channels=choice(4, 8)",
                 "optim.lr=choice(0.05, 1e-6)",
                 "hydra.sweeper.enqueue=[{optim.lr:1e-6,model.channels:4},{optim.lr:0.05,model.channels:4},"
                 "{optim.lr:0.05,model.channels:8}]")
    assert "a Pareto search (test_acc, then param_count): pruning is off" in capsys.readouterr().out
    pareto = study(tmp_path, "mnist_sweep-pareto-param_count")
    assert pareto.metric_names == ["test_acc", "param_count"]  # what the dashboard and plots show
    trials = pareto.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 and all(len(t.values) == 2 for t in trials)
    client, (parent,), children = runs(tmp_path)
    kids = {int(k.data.tags["trial"]): k for k in children[parent.info.run_id]}
    for t in trials:  # each run logs both values, and its costs
        assert kids[t.number].data.metrics["test_acc"] == pytest.approx(t.values[0])
        assert kids[t.number].data.metrics["param_count"] == t.values[1]
        assert {"latency_ms", "model_bytes"} <= set(kids[t.number].data.metrics)
    slow = trials[0]  # lr 1e-6 learns nothing in an epoch: below the floor, kept and marked
    assert slow.constraints["min_accuracy"] > 0 and kids[0].data.tags[tracking.FEASIBLE_TAG].startswith(
        "false: test_acc")
    feasible = [t for t in trials if all(v <= 0 for v in t.constraints.values())]
    cheapest = min(feasible, key=lambda t: (t.values[1], -t.values[0]))
    assert parent.data.tags["best_run_id"] == kids[cheapest.number].info.run_id
    assert client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).run_id == kids[cheapest.number].info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "pareto.csv" in artifacts and "plots/pareto_front.png" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    rows = Path(client.download_artifacts(parent.info.run_id, "pareto.csv", str(tmp_path))).read_text().splitlines()
    assert rows[0] == "trial,run_id,test_acc,param_count,feasible"
    assert f"{cheapest.number},{kids[cheapest.number].info.run_id}," in "\n".join(rows)
