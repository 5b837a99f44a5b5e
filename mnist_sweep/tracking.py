"""Recording runs in MLflow: where runs go, how a run is described (name, params, tags), what it
logs, and how it ends. Finding and loading the models runs logged: :mod:`mnist_sweep.registry`."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from hydra.types import RunMode
import requests
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, RunStatus
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)
from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mnist_sweep import costs, stores
from mnist_sweep.config import PROJECT_ROOT
from mnist_sweep.data import DatasetInfo

log = logging.getLogger(__name__)

MODEL_URI_TAG = "model_uri"  # the models:/m-… a run logged: what evaluate, predict and the registry use
STUDY_TAG = "optuna.study"  # a study trial's run: its study...
TRIAL_TAG = "trial"  # ...and its trial number
GRID_TAG = "sweep.dir"  # a plain grid's parent run: the sweep directory its jobs share
PRUNED_TAG = "pruned"  # why the pruner stopped the run (its status: KILLED)
FEASIBLE_TAG = "feasible"  # a Pareto search's trial: true, or false and why (its accuracy is below the floor)
DEADLINE_TAG = "deadline"  # where the sweep's deadline stopped the run (KILLED; its metrics and model kept)
# The scores a logged model carries beside its costs (the last epoch's): the Models tab's columns
MODEL_SCORES = ("test_acc", "test_loss", "val_acc", "val_loss")
# What MLflow raises when its store does not answer: its own error, or the HTTP client's
LOST = (mlflow.exceptions.MlflowException, requests.RequestException)
# MLflow's sqlite store logs a database error with its traceback, then raises it: whoever catches
# it reports it once, in one line (a full disk would otherwise print each traceback twice)
logging.getLogger("mlflow.store.db.utils").addFilter(lambda record: record.exc_info is None)
# MLflow's system metrics monitor says at INFO that it starts, finds no GPU, stops and has stopped:
# four lines a run that say nothing; its warnings (the store went away) still show
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def bound_http(retries: int, timeout: int) -> None:
    """Bound MLflow's HTTP retries for this process: by default a tracking server that is down
    costs 7 retries with exponential backoff (minutes) before the first error."""
    os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = str(retries)
    os.environ[MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name] = "1"  # 1 s, 2 s, 4 s… between retries
    os.environ[MLFLOW_HTTP_REQUEST_TIMEOUT.name] = str(timeout)


def use_store(tracking_uri: str, experiment: str, artifact_root: str | None) -> str:
    """Point MLflow at the store and experiment; returns the experiment id. A store that cannot
    be reached is a :class:`stores.StoreError`, before any run starts.

    A new experiment in an embedded store keeps its artifacts under ``artifact_root``: without it
    MLflow would write them to ``./mlruns`` in whatever directory the run started. A tracking
    server chooses, whatever ``artifact_root`` says: its ``mlflow-artifacts:`` root, served to every
    machine (a folder on this one would hold models no other worker can load).
    """
    mlflow.set_tracking_uri(tracking_uri)
    if stores.redact(tracking_uri) != tracking_uri:  # MLflow prints each run's link, password and all
        os.environ[MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name] = "true"
    server = stores.is_server(tracking_uri)
    # a new sqlite store's schema migration must not run twice at once: the lock
    with stores.opening("the MLflow store", tracking_uri, "mlflow.tracking_uri", *LOST), stores.lock(tracking_uri):
        found = mlflow.get_experiment_by_name(experiment) or _create_experiment(
            experiment, None if server else artifact_root)
    if server and found.artifact_location.startswith("file:"):
        raise stores.StoreError(
            f"experiment {experiment!r} on the tracking server {stores.redact(tracking_uri)} keeps its artifacts "
            f"in {found.artifact_location}, on one machine only: name a new mlflow.experiment, whose artifacts "
            "go through the server")
    mlflow.set_experiment(experiment_id=found.experiment_id)
    return found.experiment_id


def _create_experiment(name: str, artifact_root: str | None) -> mlflow.entities.Experiment:
    location = None
    if artifact_root is not None:
        Path(artifact_root).mkdir(parents=True, exist_ok=True)
        location = Path(artifact_root).resolve().as_uri()
    try:
        mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another worker created it first: use theirs
            raise
    return mlflow.get_experiment_by_name(name)


@contextlib.contextmanager
def run(name: str, params: Mapping[str, Any], tags: Mapping[str, str], parent_run_id: str | None = None,
        stopped: Mapping[type[BaseException], str] | None = None,
        system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that always ends: FINISHED, FAILED on an exception, KILLED on Ctrl-C, and
    KILLED on an exception of ``stopped`` (type → tag), with that tag saying why (the first type that
    matches: a subclass before its base). ``system_metrics``: MLflow samples the machine into it
    while it runs (:func:`watch_system`)."""
    stopped = dict(stopped or {})
    # a password typed into a store URI would otherwise land in a param or the overrides tag
    tags = {key: stores.redact(value) for key, value in tags.items()}
    active = mlflow.start_run(run_name=name, parent_run_id=parent_run_id, tags=tags,
                              log_system_metrics=system_metrics)
    status = RunStatus.FAILED
    try:
        mlflow.log_params({key: stores.redact(v) if isinstance(v, str) else v for key, v in params.items()})
        yield active
        status = RunStatus.FINISHED
    except tuple(stopped) as stop:
        mlflow.set_tag(next(tag for kind, tag in stopped.items() if isinstance(stop, kind)), str(stop))
        status = RunStatus.KILLED
        raise
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    finally:
        try:
            mlflow.end_run(RunStatus.to_string(status))
        except LOST as err:  # the store went away: the exception on its way out is the one to see
            log.error("MLflow run %s could not be ended %s: %s", active.info.run_id, RunStatus.to_string(status),
                      stores.one_line(err))
        else:
            log.info("MLflow run %s (%s) %s in %s", name, active.info.run_id, RunStatus.to_string(status),
                     stores.redact(mlflow.get_tracking_uri()))


class Recorder:
    """Logs to the active run until the tracking store stops answering, then drops the rest of
    the run's records (each call would wait out its retries) so that training goes on and the
    trial's result still reaches the study. ``lost`` says what failed first (None: nothing).
    A full disk is raised: nothing more could be written, not even the run's model."""

    def __init__(self) -> None:
        self.lost: str | None = None

    def __call__(self, record: Callable[..., Any], *args: Any) -> Any:
        """``record(*args)``'s result; None once the store is lost."""
        if self.lost is not None:
            return None
        try:
            return record(*args)
        except LOST as err:
            if stores.disk_full(err):
                raise
            self.lost = f"{record.__name__}: {stores.one_line(err)}"
            log.error("MLflow stopped answering (%s): this run records nothing more; training goes on", self.lost)


def watch_system(interval: float) -> None:
    """Have MLflow sample this machine every ``interval`` seconds in the runs that ask
    (``run(..., system_metrics=True)``): CPU %, memory, disk, network, NVIDIA GPUs (``system/…``).
    Call it early: psutil's first CPU reading in a process is a meaningless 0.0 (a reading covers the
    time since the last one), so one taken now makes the run's first sample cover the time since."""
    import psutil  # only now: a run without system metrics does without it

    mlflow.set_system_metrics_sampling_interval(interval)
    psutil.cpu_percent()


def describe_run(cfg: DictConfig, hydra_cfg: DictConfig, threads: int, trial: Any) -> dict[str, Any]:
    """The run's name, params (the resolved config) and tags (the command, overrides, commit); in a
    sweep, its parent run. ``trial`` is the job's trial (a ``trial.NoTrial`` outside any study)."""
    choices = {group: hydra_cfg.runtime.choices[group] for group in ("data", "model", "augment", "optim", "scheduler")}
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    tags = {
        **source_tags("python -m mnist_sweep" + (" -m" if multirun else "")),
        "hydra.overrides": " ".join(hydra_cfg.overrides.task),
        "hydra.output_dir": hydra_cfg.runtime.output_dir,
        "mlflow.source.git.commit": git_commit(PROJECT_ROOT) or "unknown",
        "torch.threads": str(threads),  # what threads=0 (auto) became
    }
    parent = grid_parent(hydra_cfg.sweep.dir) if multirun else None
    if trial.number is not None:
        tags |= {TRIAL_TAG: str(trial.number), STUDY_TAG: trial.study_name}
        parent = trial.parent_run_id
    config = OmegaConf.to_container(cfg, resolve=True)
    del config["optuna"]  # the trial's identity: tags, not params
    return {
        "name": f"{choices['model']}-{choices['optim']}-lr{cfg.optim.lr:.3g}-bs{cfg.data.batch_size}",
        "params": {**choices, **flatten(config)},
        "tags": tags,
        "parent_run_id": parent,
    }


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` → ``{"optim.lr": 0.1}``; lists stay whole (``[16, 32, 64]``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def source_tags(command: str) -> dict[str, str]:
    """What started a run, for the runs table's Source column: the command as typed.

    MLflow's own default is the script path, here always ``__main__.py``.
    """
    return {MLFLOW_SOURCE_NAME: command, MLFLOW_SOURCE_TYPE: "LOCAL"}


def log_datasets(infos: Sequence[DatasetInfo]) -> None:
    """The active run's data as MLflow dataset inputs (name, digest, source, context): the runs
    table's Dataset column. Metadata only, in one call, where ``mlflow.data.from_numpy`` on the
    70,000 images would cost more each run and digest a sample of rows, not
    the canonical bytes."""
    datasets = [MetaDataset(_dataset_source(info.source), name=info.name, digest=info.digest) for info in infos]
    mlflow.log_inputs(datasets, contexts=[info.context for info in infos], tags_list=[None] * len(infos))


def _dataset_source(url: str):
    """An http(s) URL or a file:// URI as MLflow's matching dataset source."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # file:// matches two identical local source types
        return resolve_dataset_source(url)


def git_commit(repo: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def log_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
    mlflow.log_metrics(dict(metrics), step=epoch)


def log_check(step: int, accuracy: float) -> None:
    """An accuracy check inside an epoch (``step`` counts checks and epoch ends alike)."""
    mlflow.log_metric("check_acc", accuracy, step=step)


def log_config(hydra_dir: Path) -> None:
    """The config files Hydra wrote into ``hydra_dir`` before the task ran (config.yaml, overrides.yaml,
    hydra.yaml; any password in a URI redacted) under the run's ``hydra/``, when it starts: a run
    killed midway is recorded well enough to run again (:mod:`mnist_sweep.reproduce`). Nothing if
    Hydra wrote none (a task called without Hydra's job)."""
    if not hydra_dir.is_dir():
        return
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifacts(str(redacted_copy(hydra_dir, Path(tmp) / "hydra")), "hydra")


def log_outputs(model: nn.Module, example: torch.Tensor, model_format: str | None, name: str) -> str | None:
    """The run's weights as a plain state_dict, and the servable model named ``name``
    (``model_format`` "pt2" or "pickle"; None logs no model). Returns that model's id.

    ``example``: a few raw test images (N > 1, so the exported batch dimension stays dynamic).
    """
    model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifact(str(costs.save_weights(model, Path(tmp))), "weights")
    if model_format:
        return log_pytorch_model(model, example.cpu().numpy().astype(np.float32), model_format, name)
    return None


def log_costs(measured: Mapping[str, float], model_id: str | None) -> None:
    """The model's costs (:func:`costs.measure`) as the run's metrics and, given the id of the model
    it logged, as that model's, with the run's latest scores: what MLflow's Models tab shows of each
    of a study's candidates (and ``search_logged_models`` orders them by)."""
    if model_id is not None:  # first: the Models tab orders its metric columns as they came
        link_scores(mlflow.active_run().info.run_id, model_id)
    mlflow.log_metrics(dict(measured), model_id=model_id)


def link_scores(run_id: str, model_id: str) -> None:
    """The run's latest ``MODEL_SCORES`` as metrics of its logged model too. Each is the very point
    the run logged (same step and timestamp), so the run's own history gains no second copy."""
    client = mlflow.MlflowClient()
    latest = [max(history, key=lambda point: (point.step, point.timestamp))
              for history in (client.get_metric_history(run_id, key) for key in MODEL_SCORES) if history]
    client.log_batch(run_id, metrics=[Metric(point.key, point.value, point.timestamp, point.step, model_id=model_id)
                                      for point in latest])


def model_name(arch: str, widths: Sequence[int], study: str | None, trial: int | None) -> str:
    """What a logged model is called in the Models tab: its architecture and block widths, then in a
    study which trial of which study (``deep-24-48-96-trial7-mnist_sweep``: the tab shows a name's
    first 30 characters or so); MLflow refuses ``/ : . % " '`` in a name."""
    name = "-".join([arch, *map(str, widths)])
    if trial is not None:
        name = f"{name}-trial{trial}-{study}"
    return re.sub(r"[/:.%\"']", "_", name)


def redacted_copy(source: Path, target: Path) -> Path:
    """The config files in ``source``, copied to ``target`` with any password in a URI redacted
    (a store URI can carry one, and the overrides repeat whatever was typed)."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            (target / path.name).write_text(stores.redact(path.read_text()))
    return target


def log_pytorch_model(model: nn.Module, example: np.ndarray, model_format: str, name: str) -> str:
    """The model for serving and reuse: float32 (n, 1, 28, 28) raw pixels → (n, 10) class scores;
    returns its id. MLflow gives it the run's params (the resolved config), as columns of the Models tab.

    "pt2" (torch.export) loads without running a pickle and without this package or the model
    class: what a served or shared model should be. It costs more to write (the exporter is a heavy
    import; docs/benchmark.md), where "pickle" is fast but unpickles code at load and needs mnist_sweep.
    """
    with torch.inference_mode():
        scores = model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        model,
        name=name,
        signature=mlflow.models.infer_signature(example, scores),
        input_example=example,
        serialization_format=model_format,
        # a pickled model refers to mnist_sweep.model.ConvNet: ship the package alongside it
        code_paths=[str(Path(__file__).parent)] if model_format == "pickle" else None,
        # explicit requirements: inferring them imports and inspects the model (slow)
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"],
    )
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)  # models:/m-…: what evaluate, predict and the registry use
    return info.model_id


def log_feasibility(accuracy: float, objective: str, floor: float | None) -> None:
    """A Pareto search's trial: the ``feasible`` tag, and why not (below ``sweep.min_accuracy``)."""
    if floor is None or accuracy >= floor:
        mlflow.set_tag(FEASIBLE_TAG, "true")
    else:
        mlflow.set_tag(FEASIBLE_TAG, f"false: {objective} {accuracy:.4f} is below sweep.min_accuracy={floor}")


def grid_parent(sweep_dir: str) -> str | None:
    """The parent run of the grid whose jobs write under ``sweep_dir``."""
    runs = mlflow.search_runs(filter_string=f"tags.`{GRID_TAG}` = '{sweep_dir}'", output_format="list")
    return runs[0].info.run_id if runs else None
