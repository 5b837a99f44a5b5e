"""The soak (mnist_sweep.soak, make soak): its invariant checker on states built to break each
invariant, in-process, then a short soak on the real stores with one fault of each kind (slow)."""

import shutil
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from conftest import require
from mnist_sweep import soak, stack

SECRET = "s3cret-Pa55"
LR = {"optim.lr": FloatDistribution(0.01, 0.5)}
START = datetime(2026, 1, 1, 12, 0, 0)


def trial(number: int, state: TrialState = TrialState.COMPLETE, lr: float | None = None, value: float = 0.9,
          retry_of: int | None = None, run_id: str | None = None, minute: int = 1):
    done = state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    made = create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                        params={"optim.lr": 0.1 + number / 100 if lr is None else lr}, distributions=LR,
                        user_attrs={"mlflow_run_id": run_id or f"run{number}"},
                        system_attrs={} if retry_of is None else {"failed_trial": retry_of},
                        intermediate_values={100: value} if state == TrialState.PRUNED else {})
    made.number = number
    made.datetime_start = START
    made.datetime_complete = START + timedelta(minutes=minute) if done else None
    if state == TrialState.PRUNED:
        made.value = value  # what Optuna records for a pruned trial: its last report
    return made


def run(run_id: str, number: int | None, params: dict | None = None, status: str = "FINISHED", model: bool = False,
        tags: dict | None = None, metrics: dict | None = None):
    all_tags = {"optuna.study": "soak", **({} if number is None else {"trial": str(number),
                                                                      "mlflow.parentRunId": "parent"})}
    if model:
        all_tags["model_uri"] = f"models:/m-{run_id}"
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=run_id, status=status),
                           data=SimpleNamespace(params=params if params is not None else {}, tags={**all_tags,
                                                                                                  **(tags or {})},
                                                metrics=metrics or {}))


def healthy() -> tuple[list, list]:
    """Three finished trials, one failed by a fault and finished by its retry; their runs and the parent."""
    trials = [trial(0, value=0.8), trial(1, TrialState.FAIL), trial(2, value=0.95)]
    trials.append(trial(3, lr=trials[1].params["optim.lr"], retry_of=1, value=0.9))
    runs = [run("parent", None, status="FINISHED")]
    for t in trials:
        final = {"test_acc": t.value, "param_count": 1000.0} if t.state == TrialState.COMPLETE else {}
        runs.append(run(f"run{t.number}", t.number, {"optim.lr": str(t.params["optim.lr"]), "epochs": "1"},
                        "FAILED" if t.state == TrialState.FAIL else "FINISHED", model=t.number in (0, 2),
                        metrics=final))
    return trials, runs


class Registry:
    """An MLflow client's registry with one champion (or none)."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id

    def get_model_version_by_alias(self, name: str, alias: str):
        if self.run_id is None:
            raise mlflow.exceptions.MlflowException("no such alias")
        return SimpleNamespace(run_id=self.run_id, version="3")


def violations(trials: list, runs: list, champion: str | None = "run2") -> list[str]:
    return [*soak.trial_violations(trials), *soak.run_violations("soak", trials, runs),
            *soak.champion_violations(Registry(champion), trials, runs, "mnist-cnn", "champion"),
            *(f"{number}: {why}" for number, why in soak.incomplete_runs("soak", trials, runs))]


def test_a_healthy_study_violates_nothing():
    assert violations(*healthy()) == []


@pytest.mark.parametrize("state", [TrialState.RUNNING, TrialState.WAITING])
def test_a_trial_left_running_or_waiting(state):
    trials, runs = healthy()
    trials.append(trial(4, state))
    assert violations(trials, runs) == [f"trial 4 is {state.name} at the end"]


def test_a_point_proposed_twice_or_a_retry_with_other_params_or_finished_twice():
    trials, runs = healthy()
    trials.append(trial(4, TrialState.FAIL, lr=trials[2].params["optim.lr"]))  # trial 2's point, freshly proposed
    assert violations(trials, runs) == ["trial 4 was proposed the params of trial 2 again"]
    trials, runs = healthy()
    trials[3] = trial(3, lr=0.5, retry_of=1, value=0.9)
    runs[4].data.params["optim.lr"] = "0.5"
    assert violations(trials, runs) == ["trial 3, a retry of trial 1, does not have its params"]
    trials, runs = healthy()
    trials.append(trial(4, lr=trials[1].params["optim.lr"], retry_of=1, value=0.9))  # a second retry, finished too
    runs.append(run("run4", 4, {"optim.lr": str(trials[1].params["optim.lr"])},
                    metrics={"test_acc": 0.9, "param_count": 1000.0}))
    assert violations(trials, runs) == ["trials 3 and 4 both finished the same params"]


def test_runs_missing_doubled_running_orphaned_or_without_the_trials_params():
    trials, runs = healthy()
    del runs[3]  # trial 2's
    assert "finished trial 2 has 0 MLflow runs, not one" in violations(trials, runs)
    trials, runs = healthy()
    runs.append(run("again", 2, {"optim.lr": str(trials[2].params["optim.lr"])}))
    assert violations(trials, runs) == ["finished trial 2 has 2 MLflow runs, not one"]
    trials, runs = healthy()
    runs[1].info.status = "RUNNING"
    runs[0].info.status = "RUNNING"
    assert violations(trials, runs) == ["run parent (parent) is RUNNING at the end",
                                        "run run0 (run0) is RUNNING at the end", "0: run0 is RUNNING"]
    trials, runs = healthy()
    runs.append(run("stray", 7, {}))
    assert violations(trials, runs) == ["run stray is tagged with trial 7, which the study does not hold"]
    trials, runs = healthy()
    runs[3].data.params["optim.lr"] = "0.3"
    assert violations(trials, runs) == ["the run of trial 2 lacks its params optim.lr (or has others)"]
    trials, runs = healthy()
    runs.append(run("parent2", None))
    assert violations(trials, runs) == ["the study has 2 parent runs, not one"]


def test_a_complete_trials_run_is_finished_with_its_final_metrics():
    """What a run whose last records fell into an outage looks like: not FINISHED, or without the
    value the study holds, or without its costs."""
    trials, runs = healthy()
    runs[3].info.status = "FAILED"  # trial 2's: its end was lost
    assert violations(trials, runs) == ["2: run2 is FAILED"]
    trials, runs = healthy()
    runs[3].data.metrics["test_acc"] = 0.9  # an earlier epoch's: the last one's was lost
    del runs[1].data.metrics["param_count"]  # trial 0's costs were lost
    assert violations(trials, runs) == [
        "0: run0 lacks its final metrics (test_acc 0.8, the study holds 0.8; costs False)",
        "2: run2 lacks its final metrics (test_acc 0.9, the study holds 0.95; costs True)"]
    trials, runs = healthy()
    for r in runs[1:]:  # with a validation split, the objective is val_acc
        r.data.params["data.val_size"] = "5000"
        r.data.metrics["val_acc"] = r.data.metrics.pop("test_acc", None)
    assert violations(trials, runs) == []


def test_the_champion_must_be_the_best_finished_trial_with_a_model():
    trials, runs = healthy()
    assert violations(trials, runs, champion="run0") == [
        "mnist-cnn@champion is trial 0's (0.8000), but a finished trial with a model reached 0.9500"]
    assert violations(trials, runs, champion=None) == ["no mnist-cnn@champion, though 2 finished trials have a model"]
    assert violations(trials, runs, champion="run1") == [
        "mnist-cnn@champion (v3) is the model of run run1, no finished trial's"]
    runs[4].data.tags["model_uri"] = "models:/m-run3"  # trial 3 (0.90) has a model too: 2 (0.95) still wins
    assert violations(trials, runs, champion="run2") == []


def test_a_password_in_a_param_a_tag_or_a_file_is_found(tmp_path):
    trials, runs = healthy()
    runs[1].data.tags["hydra.overrides"] = f"mlflow.tracking_uri=http://u:{SECRET}@host"
    runs[2].data.params["optuna.storage"] = f"postgresql://u:{SECRET}@host/optuna"
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "w0-1.log").write_text(f"connecting to postgresql://u:{SECRET}@host\n")
    (tmp_path / "logs" / "w1-1.log").write_text("postgresql://u:***@host\n")
    assert soak.secret_violations(SECRET, runs, [tmp_path / "logs"]) == [
        "run run0's tag hydra.overrides holds the password", "run run1's param optuna.storage holds the password",
        f"{tmp_path / 'logs' / 'w0-1.log'} holds the password"]


def test_a_worker_that_stopped_on_its_own_says_why_in_one_error_line():
    exits = [soak.Exit("w0-1", -9, True, "Epoch 1"), soak.Exit("w0-2", 0, False, "done"),
             soak.Exit("w1-1", 1, False, "error: the study's database ... stopped answering"),
             soak.Exit("w2-1", 1, False, "psycopg.OperationalError: connection refused")]
    assert soak.exit_violations(exits) == [
        "worker w2-1 ended with status 1 without an error: line (its last: 'psycopg.OperationalError: connection "
        "refused')"]


def test_figures_count_faults_survived_and_points_lost():
    trials, _ = healthy()
    trials.append(trial(4, TrialState.FAIL, lr=0.3, minute=3))  # failed, never retried: lost
    trials.append(trial(5, TrialState.PRUNED, value=0.5, minute=4))
    faults = [soak.Fault("kill_worker", START, START + timedelta(minutes=2), ""),
              soak.Fault("postgres", START, START + timedelta(minutes=9), "")]  # no trial finished after it
    trials[1].user_attrs["worker"] = {"host": "h", "pid": 41}  # its worker the soak killed: not an outage's
    trials[4].user_attrs["worker"] = {"host": "h", "pid": 42}  # its worker lost a store
    exits = [soak.Exit("w0-1", -9, True, ""), soak.Exit("w0-2", 0, False, ""),
             soak.Exit("w1-1", 1, False,
                       "error: the study's database postgresql://… stopped answering (…): this …"),
             soak.Exit("w2-1", 1, False, "error: MLflow stopped answering during the run (…); it trained to …"),
             soak.Exit("w2-2", 1, False, "error: cannot use the MLflow store http://…: API request … failed")]
    got = soak.figures(trials, faults, planned=3, minutes=2.0, restarts=4, exits=exits, killed={41}, incomplete=2)
    assert (got.started, got.failed, got.trials_lost, got.faults_injected, got.faults_survived) == (6, 2, 1, 2, 1)
    assert got.trials_per_min == 2.0 and got.states == {"COMPLETE": 3, "FAIL": 2, "PRUNED": 1}
    assert (got.outage_exits, got.refused_at_start, got.restarted, got.incomplete) == (2, 1, 1, 2)
    assert got.lines()[-1] == ("outages: 2 workers ended by one (1 more refused at their start), 1 trials restarted "
                               "(not a killed worker's), 2 complete trials whose run is incomplete")


def test_bad_arguments_are_one_line_each():
    assert soak.parse(["trials=7", "every=2.5", "server_workers=1", "data.root=/x"])[1:] == (
        soak.Plan(trials=7, every=2.5, server_workers=1), ["data.root=/x"])
    for argv, words in ((["trials=many"], "trials must be an integer"), (["workers=0"], "workers must be at least 1"),
                        (["server_workers=0"], "server_workers must be at least 1"),
                        (["stores=local"], "unknown argument 'stores=local'"), (["fast"], "unknown argument 'fast'")):
        with pytest.raises(ValueError, match=words):
            soak.parse(argv)


@pytest.mark.slow
def test_a_short_soak_with_one_fault_of_each_kind_loses_nothing(tiny_mnist):
    """Two workers through a kill -9, a tracking server restart and a PostgreSQL restart: nothing
    lost, and the outages cost nothing (no worker ended, no trial restarted, every complete trial's
    run whole). 60-120 s: the servers' start, and the tracking server's restart (10-40 s on a loaded
    2-core machine), which the workers wait out."""
    require(stack.postgres_bindir, "real servers")
    data_root, md5 = tiny_mnist
    parent = Path(tempfile.mkdtemp(prefix="mnist_sweep-soak-"))
    parent.chmod(0o711)  # as root, PostgreSQL runs as the user postgres, who must reach its data
    lines = []
    try:
        found, figures = soak.soak(parent / "soak", soak.Plan(trials=6, workers=2, minutes=8, rounds=1, first=5,
                                                              every=5, server_workers=1),
                                   [f"data.root={data_root}", *(f"data.md5.{k}={v}" for k, v in md5.items())],
                                   say=lines.append)
    finally:
        shutil.rmtree(parent)
    assert found == [], "\n".join([*lines, *found])
    assert figures.faults_injected == 3 and figures.trials_lost == 0
    assert (figures.outage_exits, figures.restarted, figures.incomplete) == (0, 0, 0), "\n".join(lines)
    assert figures.states.get("COMPLETE", 0) + figures.states.get("PRUNED", 0) == 6
    assert "(the tracking server's uvicorn workers: 1)" in next(line for line in lines if line.startswith("soak: "))
    assert [line.split(":")[1].split()[0] for line in lines if line.startswith("fault ")] == ["kill", "tracking",
                                                                                              "PostgreSQL"]
