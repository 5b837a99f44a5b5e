"""Recording runs in MLflow: where runs go, how a run is described (name, params, tags), what it
logs, and how it ends. Finding and loading the models runs logged: :mod:`mnist_sweep.registry`."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from hydra.types import RunMode
import requests
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import LoggedModelStatus, Metric, RunStatus
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_RUN_CONTEXT,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)
from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE
from mlflow.utils.time import get_current_time_millis
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
PROCESS_TAG = "process"  # host:pid of the process training the run: a resume refuses a run still running
REQUEUED_TAG = "requeued"  # the scheduler stopped the run's job and requeued it (KILLED; it resumes)
RESUMED_TAG = "resumed"  # a run taken up again from its checkpoint (a kill, a requeue): after which epoch
DEADLINE_TAG = "deadline"  # where the sweep's deadline stopped the run (KILLED; its metrics and model kept)
# The scores a logged model carries beside its costs (the last epoch's): the Models tab's columns
MODEL_SCORES = ("test_acc", "test_loss", "val_acc", "val_loss")
# What MLflow raises when its store does not answer: its own error, or the HTTP client's
LOST = (mlflow.exceptions.MlflowException, requests.RequestException)
# While a tracking server is away, a record asks it whether it answers at most this often, with a
# health check of at most PROBE_TIMEOUT_S and no retries: training never waits out MLflow's own retries
PROBE_S, PROBE_TIMEOUT_S = 5.0, 2.0
# MLflow's sqlite store logs a database error with its traceback, then raises it: whoever catches
# it reports it once, in one line (a full disk would otherwise print each traceback twice)
logging.getLogger("mlflow.store.db.utils").addFilter(lambda record: record.exc_info is None)
# MLflow's system metrics monitor says at INFO that it starts, finds no GPU, stops and has stopped:
# four lines a run that say nothing; its warnings (the store went away) still show
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
# MLflow's loggers write through a handler of their own (they do not propagate to Hydra's, which
# redact): its warnings quote the store's URL, password and all ("Failed to get mlflow run: API
# request to http://user:password@host/… failed", the monitor's, while the server is away)
for _handler in logging.getLogger("mlflow").handlers:
    _handler.addFilter(stores.Redact())


def bound_http(retries: int, timeout: int) -> None:
    """Bound MLflow's HTTP retries for this process: by default a tracking server that is down
    costs 7 retries with exponential backoff (minutes) before the first error."""
    os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = str(retries)
    os.environ[MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name] = "1"  # 1 s, 2 s, 4 s… between retries
    os.environ[MLFLOW_HTTP_REQUEST_TIMEOUT.name] = str(timeout)


def use_store(tracking_uri: str, experiment: str, artifact_root: str | None, outage_s: float = 0) -> str:
    """Point MLflow at the store and experiment; returns the experiment id. A store that cannot
    be reached is a :class:`stores.StoreError`, before any run starts, unless it answered this
    worker before (a study trial's sweeper reached it): then an outage shorter than ``outage_s`` is
    waited out.

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
        stores.write_ahead(tracking_uri)
        found = stores.ride_out(lambda: mlflow.get_experiment_by_name(experiment) or _create_experiment(
            experiment, None if server else artifact_root), "the MLflow store", tracking_uri, outage_s)
        # set_experiment asks the store again: an outage can begin between the two (a soak met it)
        stores.ride_out(lambda: mlflow.set_experiment(experiment_id=found.experiment_id), "the MLflow store",
                        tracking_uri, outage_s)
    if server and found.artifact_location.startswith("file:"):
        raise stores.StoreError(
            f"experiment {experiment!r} on the tracking server {stores.redact(tracking_uri)} keeps its artifacts "
            f"in {found.artifact_location}, on one machine only: name a new mlflow.experiment, whose artifacts "
            "go through the server")
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
        system_metrics: float | None = None, record: Recorder | None = None,
        continues: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that always ends: FINISHED, FAILED on an exception, KILLED on Ctrl-C, and
    KILLED on an exception of ``stopped`` (type → tag), with that tag saying why (the first type that
    matches: a subclass before its base). ``system_metrics``: MLflow samples the machine into it
    every that many seconds while it runs (``system/…``: CPU %, memory, disk, network, NVIDIA GPUs;
    None: not). ``continues``: the id of a run to take up again instead of a new one (its params
    and parent are as it started; ``tags`` are set on it). ``record``: what logs to it (:class:`Recorder`); its start
    and its end wait out an outage of the tracking server as long as the recorder does, and the end
    comes after every record that waits."""
    stopped, record = dict(stopped or {}), record or Recorder()
    # a password typed into a store URI would otherwise land in a param or the overrides tag
    tags = {key: stores.redact(value) for key, value in tags.items()}
    if system_metrics is not None:
        mlflow.set_system_metrics_sampling_interval(system_metrics)  # the monitor's setting: process-wide
    active = record.now(lambda: mlflow.start_run(run_id=continues, run_name=name, tags=tags,
                                                 parent_run_id=None if continues else parent_run_id,
                                                 log_system_metrics=system_metrics is not None))
    status = RunStatus.FAILED
    try:
        if continues is None:  # a run's params are set once: a continued run's are those it started with
            record.now(lambda: mlflow.log_params({key: stores.redact(v) if isinstance(v, str) else v
                                                  for key, v in params.items()}))
        yield active
        status = RunStatus.FINISHED
    except tuple(stopped) as stop:
        record(mlflow.set_tag, next(tag for kind, tag in stopped.items() if isinstance(stop, kind)), str(stop))
        status = RunStatus.KILLED
        raise
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    finally:
        record(end_run, active.info.run_id, RunStatus.to_string(status))
        record.settle()
        if record.lost is None:
            log.info("MLflow run %s (%s) %s in %s", name, active.info.run_id, RunStatus.to_string(status),
                     stores.redact(mlflow.get_tracking_uri()))
        else:  # the store went away: the exception on its way out, or finish's line, is the one to see
            with contextlib.suppress(*LOST):  # one try, to take it off MLflow's stack: a next run can start
                end_run(active.info.run_id, RunStatus.to_string(status))
            log.error("MLflow run %s could not be ended %s: %s", active.info.run_id, RunStatus.to_string(status),
                      record.lost)


def end_run(run_id: str, status: str) -> None:
    """End run ``run_id`` with ``status``: MLflow's ``end_run`` while it is the active run (its system
    metrics stop too), else on the store alone (a try that took it off MLflow's stack of active runs
    found the store away)."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        mlflow.MlflowClient().set_terminated(run_id, status)


@contextlib.contextmanager
def tagging(tags: Mapping[str, str]) -> Iterator[None]:
    """Every MLflow run this process starts in the block carries ``tags`` from its start, whoever
    starts it (the task, launched again in this process: :mod:`mnist_sweep.reproduce`), through
    MLflow's run context variable; a run's own tags of the same names win."""
    before = os.environ.get(MLFLOW_RUN_CONTEXT.name)
    os.environ[MLFLOW_RUN_CONTEXT.name] = json.dumps({**json.loads(before or "{}"), **tags})
    try:
        yield
    finally:
        if before is None:
            del os.environ[MLFLOW_RUN_CONTEXT.name]
        else:
            os.environ[MLFLOW_RUN_CONTEXT.name] = before


_TAKEN_AT: ContextVar[int | None] = ContextVar("taken_at", default=None)


def taken_at() -> int:
    """When the record being sent was taken (ms since the epoch; outside a record: now). Its metrics
    carry that time, so a record sent again, after a try that landed but whose answer was lost,
    lands once: MLflow's store keeps one point per key, time, step and value."""
    return _TAKEN_AT.get() or get_current_time_millis()


class Record:
    """One call of a record function (``record(*args)``), taken now, sent now or later; ``result``
    is what it returned once sent. An argument that is itself a Record stands for that one's result
    (a record that waited: the model's id for its costs)."""

    def __init__(self, record: Callable[..., Any], args: Sequence[Any]):
        self.record, self.args, self.at = record, args, get_current_time_millis()
        self.sent, self.result = False, None

    def send(self) -> Any:
        args = [arg.result if isinstance(arg, Record) else arg for arg in self.args]
        token = _TAKEN_AT.set(self.at)
        try:
            self.result = self.record(*args)
        finally:
            _TAKEN_AT.reset(token)
        self.sent = True
        return self.result


class Recorder:
    """Logs to the active run, riding out an outage of a tracking server shorter than ``outage_s``.

    When the server stops answering, training goes on: each record waits, in order, and lands once
    the server answers again (a record asks it at most every ``PROBE_S``, so none waits out MLflow's
    HTTP retries), and the run's end waits for them (:meth:`settle`) up to ``outage_s`` after the
    server stopped answering. Past that, or for an embedded store, which no waiting brings back
    (``stores.can_go_away``), or with ``outage_s`` 0, the run's records are dropped so that training
    goes on and the trial's result still reaches the study; ``lost`` says what failed first (None:
    nothing). A full disk is raised: nothing more could be written, not even the run's model. A
    record sent twice lands once (:func:`taken_at`; the model: :func:`log_pytorch_model`).
    """

    def __init__(self, tracking_uri: str = "", outage_s: float = 0) -> None:
        self.tracking_uri = tracking_uri
        self.outage_s = outage_s if stores.can_go_away(tracking_uri) else 0
        self.waiting: list[Record] = []
        self.away_since = self.next_probe = 0.0  # (monotonic) the outage's start, the next question to the server
        self.failure = ""  # what failed first in the outage
        self.lost: str | None = None

    def __call__(self, record: Callable[..., Any], *args: Any) -> Any:
        """``record(*args)``'s result; while the server is away, a :class:`Record` of it, which a
        later record may take as an argument; None once the records are lost."""
        if self.lost is not None:
            return None
        taken = Record(record, args)
        if self.waiting:
            self.waiting.append(taken)
            if time.monotonic() >= self.next_probe:
                self._resume()
        else:
            try:
                taken.send()
            except LOST as err:
                self._away(taken, err)
        return taken.result if taken.sent else None if self.lost else taken

    def now(self, call: Callable[[], Any]) -> Any:
        """``call()``, waiting out an outage of the server as long as the recorder would (the run's
        start: nothing is trained yet, and nothing can be logged before it)."""
        return stores.ride_out(call, "the MLflow store", self.tracking_uri, self.outage_s)

    def settle(self) -> None:
        """Wait until every record that waits has landed, up to ``outage_s`` after the server stopped
        answering; past that, drop them, and ``lost`` says what failed."""
        while self.waiting:
            self._resume()
            left = self.away_since + self.outage_s - time.monotonic()
            if not self.waiting:
                break
            if left <= 0:
                self._lose(f"for more than outage_s={self.outage_s:g} s")
                break
            time.sleep(min(stores.FIRST_PAUSE_S, left))

    def _away(self, taken: Record, err: BaseException) -> None:
        """The server did not take ``taken``: wait for it, or lose the records."""
        if stores.disk_full(err):
            raise err
        self.failure = f"{taken.record.__name__}: {stores.one_line(err)}"
        if not self.outage_s or not stores.gone(err):
            self._lose("")
            return
        self.waiting, self.away_since = [taken], time.monotonic()
        self.next_probe = self.away_since + PROBE_S
        log.warning("MLflow stopped answering (%s): training goes on, and this run's records wait for it, up to "
                    "outage_s=%g s", self.failure, self.outage_s)

    def _resume(self) -> None:
        """If the server answers, send the records that wait, in order, up to the first it does not take."""
        self.next_probe = time.monotonic() + PROBE_S
        if not answers(self.tracking_uri):
            return
        while self.waiting:
            try:
                self.waiting[0].send()
            except LOST as err:
                if stores.disk_full(err):
                    raise
                if not stores.gone(err):
                    self.failure = f"{self.waiting[0].record.__name__}: {stores.one_line(err)}"
                    self._lose("")
                return
            self.waiting.pop(0)
        log.warning("MLflow answers again, after %.0f s: this run's records landed", time.monotonic() - self.away_since)

    def _lose(self, how_long: str) -> None:
        self.lost, self.waiting = self.failure, []
        log.error("MLflow stopped answering%s (%s): this run records nothing more; training goes on",
                  f" {how_long}" if how_long else "", self.lost)


def answers(tracking_uri: str) -> bool:
    """Whether the tracking server answers now: its health check, once, briefly."""
    try:
        return requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).ok
    except requests.RequestException:
        return False


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
        PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}",
    }
    if trial.number is not None:
        tags |= {TRIAL_TAG: str(trial.number), STUDY_TAG: trial.study_name}
        parent = trial.parent_run_id
    else:  # (a study trial asks the store nothing here: one call fewer that an outage could meet)
        parent = grid_parent(hydra_cfg.sweep.dir) if multirun else None
    config = OmegaConf.to_container(cfg, resolve=True)
    del config["optuna"]  # the trial's identity: tags, not params
    del config["checkpoint"]["resume"]  # which run a run continues: that run's own record
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
    mlflow.log_metrics(dict(metrics), step=epoch, timestamp=taken_at())


def log_resumed(epoch: int) -> None:
    """The run was taken up again from its checkpoint of ``epoch`` (its history goes on at the next)."""
    mlflow.set_tag(RESUMED_TAG, f"after epoch {epoch}")


def log_check(step: int, accuracy: float) -> None:
    """An accuracy check inside an epoch (``step`` counts checks and epoch ends alike)."""
    mlflow.log_metric("check_acc", accuracy, step=step, timestamp=taken_at())


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
    mlflow.log_metrics(dict(measured), model_id=model_id, timestamp=taken_at())


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
    Sent again (:class:`Recorder`), it exports no second model: the run keeps one.
    """
    earlier = earlier_model(name)
    if earlier is not None:
        mlflow.set_tag(MODEL_URI_TAG, f"models:/{earlier.model_id}")
        return earlier.model_id
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
        # MLflow links to the model every metric the run logged at the model's step, and its default,
        # 0, is the system metrics' first sample: the Models tab showed machine load as the model's
        # scores. No metric has step -1: link_scores links the scores alone
        step=-1,
    )
    # Logging a model makes it MLflow's active model, to which every metric logged later in this
    # thread is linked: the costs and scores are linked explicitly instead
    mlflow.clear_active_model()
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)  # models:/m-…: what evaluate, predict and the registry use
    return info.model_id


def earlier_model(name: str) -> mlflow.entities.LoggedModel | None:
    """The active run's model ``name`` that an earlier try of its export made whole (the store took
    it, and its answer, or the tag after it, was lost); None if none did. One that a try left
    half-made (the store went away midway) is deleted: the export starts again, and the run keeps one."""
    run = mlflow.active_run()
    client = mlflow.MlflowClient()
    found = None
    for model in client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'"):
        if model.status == LoggedModelStatus.READY and found is None:
            found = model
        else:
            client.delete_logged_model(model.model_id)
    return found


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
