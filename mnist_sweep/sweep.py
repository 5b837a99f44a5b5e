"""Sweeps: one MLflow parent run per sweep, the study's results on it, and the champion model.

Hydra calls :class:`MlflowSweepCallback` around every ``-m`` run (``hydra.callbacks`` in
``conf/config.yaml``); each trial is an ordinary training run nested under the parent.
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from omegaconf import DictConfig

from mnist_sweep import tracking

log = logging.getLogger(__name__)

REGISTERED_MODEL = "mnist-cnn"
CHAMPION = "champion"
STUDY_TAG = "optuna.study"


def continuing_seed(seed: int, storage: str | None, study_name: str | None) -> int:
    """The sampler seed: ``seed`` plus the trials the study already has.

    A seeded sampler replays the same first points every time it starts; offsetting the seed by
    the study's size makes a resumed sweep propose new points while staying reproducible.
    """
    if not storage or not study_name:
        return seed
    return seed + len(_study_trials(storage, study_name))


def _study_trials(storage: str, study_name: str) -> list:
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # no such study yet
        return []


class MlflowSweepCallback(Callback):
    """Opens the parent run before the first trial and fills it in after the last."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str) -> None:
        self.tracking_uri, self.experiment, self.artifact_root = tracking_uri, experiment, artifact_root
        self.parent_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        self.storage, self.study_name = sweeper.get("storage"), sweeper.get("study_name")
        # Created here, before any worker starts, so parallel trials never race to create them.
        experiment_id = tracking.use_store(self.tracking_uri, self.experiment, self.artifact_root)
        self.first_trial = len(_study_trials(self.storage, self.study_name)) if self.study_name else 0
        name = self.study_name or f"sweep-{Path(config.hydra.sweep.dir).name}"
        tags = {"sweep.dir": str(config.hydra.sweep.dir), **tracking.source_tags("python -m mnist_sweep -m")}
        if self.study_name:
            tags[STUDY_TAG] = self.study_name
        # A client run, not mlflow.start_run: trials in this process start their own active run.
        self.parent_id = MlflowClient().create_run(experiment_id, run_name=name, tags=tags).info.run_id
        os.environ[tracking.PARENT_RUN_ENV] = self.parent_id
        os.environ[tracking.FIRST_TRIAL_ENV] = str(self.first_trial)
        atexit.register(self._stopped_early)
        log.info("MLflow parent run %s (%s)", name, self.parent_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self._stopped_early)
        for var in (tracking.PARENT_RUN_ENV, tracking.FIRST_TRIAL_ENV):
            os.environ.pop(var, None)
        client = MlflowClient()
        status = RunStatus.FAILED  # unless everything below succeeds
        try:
            self._summarize(client, Path(config.hydra.sweep.dir))
            status = RunStatus.FINISHED
        finally:
            client.set_terminated(self.parent_id, RunStatus.to_string(status))

    def _summarize(self, client: MlflowClient, sweep_dir: Path) -> None:
        best = self._best_run(client)
        if best is not None:
            client.log_metric(self.parent_id, "best_test_acc", best.data.metrics["test_acc"])
            client.set_tag(self.parent_id, "best_run_id", best.info.run_id)
            for key in ("model", "optim.lr", "data.batch_size"):
                client.log_param(self.parent_id, f"best.{key}", best.data.params.get(key))
            promote(client, best)
        results = sweep_dir / "optimization_results.yaml"
        if results.exists():
            client.log_artifact(self.parent_id, str(results))
        if self.study_name:
            log_study_plots(client, self.parent_id, self.storage, self.study_name)

    def _best_run(self, client: MlflowClient):
        """The best trial's run: the study's best (which may come from an earlier invocation),
        or for a grid sweep the best child of this parent."""
        experiment = client.get_experiment_by_name(self.experiment).experiment_id
        if self.study_name:
            trials = [t for t in _study_trials(self.storage, self.study_name) if t.value is not None]
            if not trials:
                return None
            best = max(trials, key=lambda t: t.value)
            study_runs = client.search_runs([experiment], f"tags.`{STUDY_TAG}` = '{self.study_name}'")
            parents = {run.info.run_id for run in study_runs}
            # a diverged run has no test_acc metric: it can only be "best" if every trial diverged
            runs = client.search_runs([experiment], f"tags.trial = '{best.number}' and metrics.test_acc >= 0")
            runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents]
        else:
            query = f"tags.mlflow.parentRunId = '{self.parent_id}' and metrics.test_acc >= 0"
            runs = client.search_runs([experiment], query, order_by=["metrics.test_acc DESC"], max_results=1)
        return runs[0] if runs else None

    def _stopped_early(self) -> None:
        """At exit after Ctrl-C or a crash: end what this sweep left running."""
        client = MlflowClient()
        experiment = client.get_experiment_by_name(self.experiment).experiment_id
        query = f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'RUNNING'"
        for child in client.search_runs([experiment], query):
            client.set_terminated(child.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        client.set_terminated(self.parent_id, RunStatus.to_string(RunStatus.KILLED))
        if self.study_name:
            import optuna

            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
            for trial in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
                if trial.number >= self.first_trial:
                    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def promote(client: MlflowClient, best) -> None:
    """Register the best run's model; point ``champion`` at it if it beats the current champion."""
    acc = best.data.metrics["test_acc"]
    try:
        current = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is not None:
        if current.run_id == best.info.run_id:
            return
        champion_acc = client.get_run(current.run_id).data.metrics.get("test_acc", 0.0)
        if acc <= champion_acc:
            log.info("best run %.4f does not beat champion v%s (%.4f)", acc, current.version, champion_acc)
            return
    model_uri = best.data.tags.get(tracking.MODEL_URI_TAG)
    if model_uri is None:
        log.warning("best run %s logged no model (mlflow.model_format=null): nothing to register", best.info.run_id)
        return
    version = mlflow.register_model(model_uri, REGISTERED_MODEL)
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version.version)
    log.info("registered %s v%s (test_acc %.4f) as @%s", REGISTERED_MODEL, version.version, acc, CHAMPION)


def log_study_plots(client: MlflowClient, run_id: str, storage: str, study_name: str) -> None:
    """Optimization history, parameter importances and parallel coordinates, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    study = optuna.load_study(study_name=study_name, storage=storage)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in {
            "optimization_history": plots.plot_optimization_history,
            "param_importances": plots.plot_param_importances,
            "parallel_coordinate": plots.plot_parallel_coordinate,
        }.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ finished trials
                log.warning("skipped the %s plot: %s", name, err)
                continue
            figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            figure.savefig(Path(tmp) / f"{name}.png", dpi=120, bbox_inches="tight")
            plt.close(figure)
        client.log_artifacts(run_id, tmp, "plots")
