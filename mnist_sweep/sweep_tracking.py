"""A sweep in MLflow: one parent run per study with its trials as children, the study's summary on
it, and the champion model.

:class:`MlflowStudy` is the study sweeper's tracker (``hydra.sweeper.tracker``): every worker of a
study nests its trials under the same parent, and refreshes the summary when it ends. A plain grid
(``hydra/sweeper=basic``) has no study: :class:`MlflowGridCallback` gives each invocation a parent.
"""

from __future__ import annotations

import atexit
import csv
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import Run, RunStatus
from omegaconf import DictConfig
from optuna.trial import TrialState

from mnist_sweep import stores, tracking
from mnist_sweep.registry import promote, selection_metric
from mnist_sweep.tracking import GRID_TAG, MODEL_URI_TAG, STUDY_TAG, TRIAL_TAG
from mnist_sweep.trial import FAILURE_ATTR, PARENT_ATTR, RUN_ID_ATTR, best_finished, feasible, is_pareto

log = logging.getLogger(__name__)

FAILURE_TAG = "failure"  # why a run ended FAILED without its worker saying so
PARENT_WAIT_S = 60  # how long a worker waits for the worker that created the study to make its parent


class MlflowStudy:
    """The MLflow side of a study, driven by the study sweeper (``hydra.sweeper.tracker``)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None, http_retries: int,
                 http_timeout: int, study_storage: str, cost: str | None = None,
                 min_accuracy: float | None = None, outage_s: float = 0, plots: bool = True) -> None:
        self.tracking_uri, self.experiment, self.artifact_root = tracking_uri, experiment, artifact_root
        self.http_retries, self.http_timeout, self.outage_s = http_retries, http_timeout, outage_s
        self.study_storage, self.plots = study_storage, plots
        self.cost, self.min_accuracy = cost, min_accuracy  # a Pareto search's (hydra/sweeper=pareto)
        self.parent_id: str | None = None

    def open(self, study: optuna.Study, created: bool) -> None:
        """Find or make the study's parent run and mark it RUNNING: this worker is alive."""
        tracking.bound_http(self.http_retries, self.http_timeout)
        experiment_id = tracking.use_store(self.tracking_uri, self.experiment, self.artifact_root)
        client = MlflowClient()
        self.parent_id = study_parent(client, experiment_id, study, created)
        client.update_run(self.parent_id, status=RunStatus.to_string(RunStatus.RUNNING))
        log.info("MLflow parent run %s (%s)", study.study_name, self.parent_id)

    def check(self, study: optuna.Study) -> None:
        """Before each batch: wait for MLflow if it stopped answering, up to ``outage_s``, then stop the
        sweep. A trial started then would train without a record or a model to register; the study
        keeps every finished trial, so a rerun of the same command goes on where this one stopped."""
        self._answering(study, lambda: MlflowClient().get_run(self.parent_id), self.outage_s)

    def close(self, study: optuna.Study, results_file: str, interrupted: bool) -> None:
        """Refresh the parent's summary and the champion; end the parent unless other workers still
        run trials (the last worker to end ends it). MLflow away at the sweep's end, or going away
        while it closes: as before a batch (:meth:`check`), the close tried again whole once it is back
        (each step is safe to repeat: a run's model is registered once); a sweep that stopped does not
        wait for it again."""
        self._answering(study, lambda: self._close(study, results_file, interrupted),
                        0 if interrupted else self.outage_s)

    def _close(self, study: optuna.Study, results_file: str, interrupted: bool) -> None:
        client = MlflowClient()
        # two workers ending together: one champion, one version (the study's database locks
        # across machines; an embedded MLflow store also locks its own file)
        with stores.lock(self.study_storage), stores.lock(self.tracking_uri):
            try:
                experiment_id = client.get_run(self.parent_id).info.experiment_id
                end_orphaned_runs(client, experiment_id, study)
                best = best_run(client, study)
                summarize(client, self.parent_id, study, best, results_file, self.plots)
                if best is not None:
                    promote(client, champion_run(client, experiment_id, study, best), self.cost, self.min_accuracy)
            finally:  # a summary that failed still leaves no parent RUNNING behind the last worker
                if not study.get_trials(deepcopy=False, states=[TrialState.RUNNING]):
                    status = RunStatus.KILLED if interrupted else RunStatus.FINISHED
                    client.set_terminated(self.parent_id, RunStatus.to_string(status))

    def _answering(self, study: optuna.Study, call: Callable[[], object], bound_s: float) -> None:
        """``call()``, riding out an outage of MLflow up to ``bound_s``; past it, the sweep stops in one
        (redacted) line: a raw MLflow error's message carries the tracking URI, password and all."""
        try:
            stores.ride_out(call, "the MLflow store", self.tracking_uri, bound_s)
        except tracking.LOST as err:
            finished = len(study.get_trials(deepcopy=False, states=[TrialState.COMPLETE, TrialState.PRUNED]))
            raise stores.StoreError(
                f"the MLflow store {stores.redact(self.tracking_uri)} stopped answering ({stores.one_line(err)}): "
                f"the sweep stops; the study keeps its {finished} finished trials, and the same command "
                "goes on from there once the store is back") from None


def study_parent(client: MlflowClient, experiment_id: str, study: optuna.Study, created: bool) -> str:
    """The study's parent run id, race-free: only the worker that created the study (a unique name
    in its database) makes the parent; the others wait for its id to appear on the study."""
    deadline = time.monotonic() + PARENT_WAIT_S
    # a study that already has trials, or a long wait, means the creator is gone (or predates this)
    while not created and PARENT_ATTR not in study.user_attrs and not study.trials and time.monotonic() < deadline:
        time.sleep(0.5)
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent is not None:
        try:
            client.get_run(parent)
            return parent
        except mlflow.exceptions.MlflowException:  # this MLflow store lost it: make another
            log.warning("the study's parent run %s is not in this MLflow store: making a new one", parent)
    tags = {STUDY_TAG: study.study_name, **tracking.source_tags("python -m mnist_sweep -m")}
    parent = client.create_run(experiment_id, run_name=study.study_name, tags=tags).info.run_id
    study.set_user_attr(PARENT_ATTR, parent)
    return parent


def end_orphaned_runs(client: MlflowClient, experiment_id: str, study: optuna.Study) -> None:
    """End FAILED the runs of the study's trials that no job is left to end, with a tag saying why:
    a trial whose worker died, whose job was ended (cancelled, out of time) or lost a store, and one
    whose job finished it but could not end its run (the tracking server was away). Found by their
    tags, not the trial's link to its run: a job may have lost the study before recording that."""
    query = f"tags.`{STUDY_TAG}` = '{study.study_name}' and attributes.status = 'RUNNING'"
    trials = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    for run in client.search_runs([experiment_id], query):
        trial = trials.get(int(run.data.tags.get(TRIAL_TAG, -1)))
        if trial is None or trial.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        if trial.state == TrialState.FAIL:
            why = trial.user_attrs.get(FAILURE_ATTR, "its worker stopped mid-trial (no heartbeat): the study failed "
                                                     "the trial")
        else:
            why = (f"its job could not end it (the tracking server stopped answering): its record is incomplete; "
                   f"the trial is {trial.state.name} in the study")
        client.set_tag(run.info.run_id, FAILURE_TAG, why)
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        log.warning("trial %d: %s; run %s ended FAILED", trial.number, why, run.info.run_id)


def best_run(client: MlflowClient, study: optuna.Study) -> Run | None:
    """The run of the study's best finished trial (:func:`trial.best_finished`); None while there
    is none with a test_acc (a diverged run scores 0.0 and logs none)."""
    best = best_finished(study)
    if best is None:
        return None
    run_id = best.user_attrs.get(RUN_ID_ATTR)
    run = client.get_run(run_id) if run_id else None
    return run if run is not None and "test_acc" in run.data.metrics else None


def champion_run(client: MlflowClient, experiment_id: str, study: optuna.Study, best: Run) -> Run:
    """The run whose model the champion should be: the best run's, or, where it has none because the
    tracking server went away before its export, the best finished trial's run that has one (with
    ``mlflow.model_format=null`` none has: the best run, which ``promote`` then declines)."""
    if MODEL_URI_TAG in best.data.tags:
        return best
    metric = selection_metric("val_acc" in best.data.metrics)
    done = study.get_trials(deepcopy=False, states=[TrialState.COMPLETE, TrialState.PRUNED])
    finished = {str(t.number) for t in done}
    query = f"tags.`{STUDY_TAG}` = '{study.study_name}' and tags.`{MODEL_URI_TAG}` LIKE 'models:/%'"
    runs = client.search_runs([experiment_id], query, order_by=[f"metrics.{metric} DESC"])
    return next((run for run in runs if run.data.tags.get(TRIAL_TAG) in finished and metric in run.data.metrics),
                best)


def summarize(client: MlflowClient, parent_id: str, study: optuna.Study, best: Run | None, results_file: str,
              plots: bool) -> None:
    """The study so far on its parent: best value and params (tags: they change as the study
    grows), ``optimization_results.yaml`` and, with ``plots``, the plots."""
    finished = study.get_trials(deepcopy=False, states=[TrialState.COMPLETE, TrialState.PRUNED])
    if best is not None:
        client.log_metric(parent_id, "best_test_acc", best.data.metrics["test_acc"], step=len(finished))
        if "val_acc" in best.data.metrics:  # what chose it; test_acc above is then its report
            client.log_metric(parent_id, "best_val_acc", best.data.metrics["val_acc"], step=len(finished))
        client.set_tag(parent_id, "best_run_id", best.info.run_id)
        client.set_tag(parent_id, "best.trial", best.data.tags.get(TRIAL_TAG, ""))
        for key in ("model", "optim.lr", "data.batch_size", "epochs", "augment"):
            client.set_tag(parent_id, f"best.{key}", best.data.params.get(key))
    client.set_tag(parent_id, "trials", f"{len(finished)} finished")
    if Path(results_file).exists():
        client.log_artifact(parent_id, results_file)
    if is_pareto(study):
        log_front(client, parent_id, study)
    if plots:
        log_study_plots(client, parent_id, study)


def pareto_front(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials no other trial beats on both accuracy (``values[0]``, maximised) and cost
    (``values[1]``, minimised), most accurate first: one sort, where pairwise checks grow as n²."""
    front, cheapest = [], float("inf")
    for trial in sorted(trials, key=lambda t: (-t.values[0], t.values[1])):
        if trial.values[1] < cheapest:
            front.append(trial)
            cheapest = trial.values[1]
    return front


def log_front(client: MlflowClient, run_id: str, study: optuna.Study) -> None:
    """``pareto.csv`` on the study's parent: the front of its completed trials (trial, run id,
    accuracy, cost, feasible), most accurate first."""
    accuracy, cost = study.metric_names or ["accuracy", "cost"]
    rows = [{"trial": t.number, "run_id": t.user_attrs.get(RUN_ID_ATTR, ""), accuracy: t.values[0],
             cost: t.values[1], "feasible": feasible(t)}
            for t in pareto_front(study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pareto.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["trial", "run_id", accuracy, cost, "feasible"])
            writer.writeheader()
            writer.writerows(rows)
        client.log_artifact(run_id, str(path))


class MlflowGridCallback(Callback):
    """Gives a plain grid (``hydra/sweeper=basic``) a parent run per invocation; its jobs find it by
    the sweep directory they share. Study sweeps track themselves (``hydra.sweeper.tracker``)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str) -> None:
        self.tracking_uri, self.experiment, self.artifact_root = tracking_uri, experiment, artifact_root
        self.parent_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "tracker" in config.hydra.sweeper:
            return
        experiment_id = tracking.use_store(self.tracking_uri, self.experiment, self.artifact_root)
        sweep_dir = str(config.hydra.sweep.dir)
        name = f"sweep-{Path(sweep_dir).name}"
        tags = {GRID_TAG: sweep_dir, **tracking.source_tags("python -m mnist_sweep -m")}
        self.parent_id = MlflowClient().create_run(experiment_id, run_name=name, tags=tags).info.run_id
        atexit.register(self._stopped_early)
        log.info("MLflow parent run %s (%s)", name, self.parent_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_id is None:
            return
        atexit.unregister(self._stopped_early)
        client = MlflowClient()
        experiment = client.get_experiment_by_name(self.experiment).experiment_id
        metric = selection_metric(config.data.val_size > 0)
        query = f"tags.mlflow.parentRunId = '{self.parent_id}' and metrics.{metric} >= 0"
        runs = client.search_runs([experiment], query, order_by=[f"metrics.{metric} DESC"], max_results=1)
        if runs:
            client.log_metric(self.parent_id, f"best_{metric}", runs[0].data.metrics[metric])
            client.set_tag(self.parent_id, "best_run_id", runs[0].info.run_id)
            with stores.lock(self.tracking_uri):
                promote(client, runs[0])
        client.set_terminated(self.parent_id, RunStatus.to_string(RunStatus.FINISHED))

    def _stopped_early(self) -> None:
        """At exit after Ctrl-C or a crash: end what this grid left running."""
        client = MlflowClient()
        experiment = client.get_experiment_by_name(self.experiment).experiment_id
        query = f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'RUNNING'"
        for child in client.search_runs([experiment], query):
            client.set_terminated(child.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        client.set_terminated(self.parent_id, RunStatus.to_string(RunStatus.KILLED))


def log_study_plots(client: MlflowClient, run_id: str, study: optuna.Study) -> None:
    """Optimization history, parameter importances and parallel coordinates, as PNGs; a Pareto
    search's front instead."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna's history, importance and coordinate plots take one objective; a Pareto search's is its front
        one = {
            "optimization_history": plots.plot_optimization_history,
            "param_importances": plots.plot_param_importances,
            "parallel_coordinate": plots.plot_parallel_coordinate,
        }
        for name, plot in ({"pareto_front": plots.plot_pareto_front} if is_pareto(study) else one).items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ finished trials
                log.warning("skipped the %s plot: %s", name, err)
                continue
            figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            figure.savefig(Path(tmp) / f"{name}.png", dpi=120, bbox_inches="tight")
            plt.close(figure)
        client.log_artifacts(run_id, tmp, "plots")
