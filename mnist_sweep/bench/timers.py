"""Timing processes: the classic recipe, ``python -m mnist_sweep`` runs and sweeps, each spawn to exit.

Every sweep goes through :func:`time_sweep`, whatever it measures (throughput, shared stores, pruning,
the search targets): what differs is its arguments, where its stores are and how its trials run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mnist_sweep.bench import phases
from mnist_sweep.bench.classic import TARGET_ACC

EXPERIMENT = "bench"
# hydra-optuna-sweeper stores optuna 2's distributions; loading a study here warns, harmlessly
warnings.filterwarnings("ignore", category=FutureWarning, module=r"optuna\.")


@dataclass(frozen=True)
class Stores:
    """Where runs and studies go: what reads them back here, and what points a process at them."""

    tracking_uri: str
    optuna_storage: str
    run_overrides: tuple[str, ...]    # for a run: its MLflow store
    sweep_overrides: tuple[str, ...]  # for a sweep: its MLflow store and its study's
    env: Mapping[str, str] = field(default_factory=dict)  # what each process exports to reach them


def sqlite_stores(directory: Path) -> Stores:
    """Embedded stores in ``directory``: ``mlflow.db`` and its artifacts, ``optuna.db``."""
    tracking_uri, storage = f"sqlite:///{directory / 'mlflow.db'}", f"sqlite:///{directory / 'optuna.db'}"
    mlflow = (f"mlflow.tracking_uri={tracking_uri}", f"mlflow.artifact_root={directory / 'mlartifacts'}",
              f"mlflow.experiment={EXPERIMENT}")
    return Stores(tracking_uri, storage, mlflow, (*mlflow, f"hydra.sweeper.storage={storage}"))


def server_stores(stack) -> Stores:
    """The shared stores of a started ``mnist_sweep.stack``, as ``stores=server`` reaches them."""
    overrides = ("stores=server", f"mlflow.experiment={EXPERIMENT}")
    return Stores(stack.tracking_uri, stack.optuna_storage, overrides, overrides, stack.env())


def run_processes(commands: Sequence[Sequence[str]], what: str,
                  env: Mapping[str, str] | None = None) -> tuple[list[str], float, float]:
    """``python *command`` for each of ``commands``, all started together from the project root;
    returns their stdouts, the spawn instant (monotonic) and the seconds until the last one exited.
    Their output goes to files: a full pipe would stall a process while another is waited for."""
    from mnist_sweep.config import PROJECT_ROOT

    with tempfile.TemporaryDirectory(prefix="mnist_sweep-bench-") as tmp:
        logs = [(Path(tmp) / f"{i}.out", Path(tmp) / f"{i}.err") for i in range(len(commands))]
        spawned = time.monotonic()
        procs = []
        for command, (out, err) in zip(commands, logs):
            with out.open("w") as stdout, err.open("w") as stderr:
                procs.append(subprocess.Popen([sys.executable, *command], cwd=PROJECT_ROOT, stdout=stdout,
                                              stderr=stderr, env={**os.environ, **(env or {})}))
        codes = [proc.wait() for proc in procs]
        seconds = time.monotonic() - spawned
        outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    for code, (stdout, stderr) in zip(codes, outputs):
        if code != 0:
            sys.stderr.write(stdout[-2000:] + stderr[-4000:])
            raise SystemExit(f"error: {what} exited with {code}; its output is above")
    return [stdout for stdout, _ in outputs], spawned, seconds


def time_classic(root: str, max_epochs: int) -> dict:
    """The classic recipe spawn to exit; its time to the target ends when its first test pass reached it."""
    command = ["-m", "mnist_sweep.bench.classic", root, "--epochs", str(max_epochs)]
    (stdout,), spawned, _ = run_processes([command], "the classic recipe")
    epochs = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    last = epochs[-1]
    return {
        "to_target_s": last["at"] - spawned if last["acc"] >= TARGET_ACC else None,
        "acc": last["acc"],
        "epochs": len(epochs),
        "images_per_s": sum(e["images"] for e in epochs) / sum(e["train_s"] for e in epochs),
    }


def fit_seconds(client, run_id: str) -> float:
    """A run's own training and evaluation, as ``train.fit`` timed them: the rest of its time is overhead."""
    return sum(m.value for name in ("epoch_seconds", "eval_seconds") for m in client.get_metric_history(run_id, name))


def time_run(overrides: list[str], stores: Stores, experiment: str) -> dict:
    """``python -m mnist_sweep`` spawn to exit, and what its MLflow run (in ``experiment``) recorded."""
    from mlflow import MlflowClient

    since_ms = int(time.time() * 1000)
    _, _, seconds = run_processes([["-m", "mnist_sweep", *stores.run_overrides, *overrides]], "python -m mnist_sweep")
    client = MlflowClient(stores.tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (run,) = client.search_runs([experiment_id], f"attributes.start_time >= {since_ms}",
                                order_by=["attributes.start_time DESC"], max_results=1)
    acc = run.data.metrics.get("test_acc", 0.0)  # absent if the run diverged
    return {
        "process_s": seconds,
        "fit_s": fit_seconds(client, run.info.run_id),
        "to_target_s": seconds if acc >= TARGET_ACC else None,
        "acc": acc,
        "epochs": run.data.params["epochs"],
        "images_per_s": run.data.metrics.get("images_per_second", math.nan),
    }


def time_imports() -> dict[str, float]:
    """The floor of a run, ``import torch``, and ``python -m mnist_sweep --help``, each spawn to exit."""
    return {"torch": run_processes([["-c", "import torch"]], "import torch")[2],
            "main": run_processes([["-m", "mnist_sweep", "--help"]], "python -m mnist_sweep --help")[2]}


def profile_run(overrides: list[str], stores: Stores, profile: Path, keys: Mapping[str, phases.Key]) -> dict:
    """``python -m mnist_sweep`` under cProfile, split into the overhead's phases."""
    run_processes([["-m", "cProfile", "-o", str(profile), "-m", "mnist_sweep", *stores.run_overrides, *overrides]],
                  "python -m cProfile -m mnist_sweep")
    return phases.read(profile, keys)


def time_sweep(study: str, args: Sequence[str], stores: Stores, out: Path, overrides: Sequence[str],
               n_trials: int | None = None, launcher: Sequence[str] = (), processes: int = 1) -> dict:
    """``python -m mnist_sweep -m *args`` spawn to exit: ``processes`` workers started together share
    the study (``n_trials`` split between them), each running its trials with ``launcher``'s overrides
    (none: one at a time). Returns its seconds, trials (all, completed, pruned), and its best trial:
    value (what the study maximised), params and test accuracy."""
    share = [f"hydra.sweeper.n_trials={n_trials // processes}"] if n_trials else []
    command = ["-m", "mnist_sweep", "-m", *stores.sweep_overrides, *launcher, *args, *share,
               f"hydra.sweeper.study_name={study}"]
    _, _, seconds = run_processes(
        [[*command, f"hydra.sweep.dir={out / 'sweeps' / study / str(i)}", *overrides] for i in range(processes)],
        f"the sweep {study}", stores.env)
    return {"seconds": seconds, "asked": n_trials} | study_result(study, stores)


def study_result(study: str, stores: Stores) -> dict:
    import optuna
    from mlflow import MlflowClient

    from mnist_sweep.trial import DEADLINE_ATTR, RUN_ID_ATTR, best_finished

    if "PGPASSFILE" in stores.env:
        os.environ["PGPASSFILE"] = stores.env["PGPASSFILE"]  # how libpq finds the password, here too
    loaded = optuna.load_study(study_name=study, storage=stores.optuna_storage)
    trials = loaded.get_trials(deepcopy=False)
    # a crashed trial is recorded and the sweep goes on: only completed trials count
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    counts = {"trials": len(trials), "completed": len(complete),
              "stopped": sum(DEADLINE_ATTR in t.user_attrs for t in trials)}  # by the deadline
    if len(loaded.directions) > 1:  # a Pareto search: every completed trial's (accuracy, cost)
        return counts | {"points": [tuple(t.values) for t in complete]}
    best = best_finished(loaded)  # the product's choice: completed, or stopped by the deadline
    # with a validation split the value is val_acc; the test accuracy is the best run's report
    best_test = best and MlflowClient(stores.tracking_uri).get_run(best.user_attrs[RUN_ID_ATTR]).data.metrics.get(
        "test_acc")
    return counts | {"pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
            "best": best.value if best else None, "best_test": best_test, "best_params": best.params if best else {}}


def trial_overheads(study: str, stores: Stores) -> list[dict]:
    """Per trial of a one-process sweep, but the first and the last: the seconds from its start to the
    next trial's start, and its training's and evaluation's (its ``epoch_seconds`` and ``eval_seconds``)."""
    import optuna
    from mlflow import MlflowClient

    from mnist_sweep import tracking
    from mnist_sweep.trial import RUN_ID_ATTR

    trials = sorted(optuna.load_study(study_name=study, storage=stores.optuna_storage).get_trials(deepcopy=False),
                    key=lambda trial: trial.number)
    client = MlflowClient(stores.tracking_uri)
    spans = []
    for trial, after in zip(trials[1:-1], trials[2:]):
        run_id = trial.user_attrs[RUN_ID_ATTR]
        spans.append({
            "span_s": (after.datetime_start - trial.datetime_start).total_seconds(),
            "fit_s": fit_seconds(client, run_id),
            "model": tracking.MODEL_URI_TAG in client.get_run(run_id).data.tags,  # a full model, not only weights
        })
    return spans
