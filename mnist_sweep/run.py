"""The task: one training run, tracked in MLflow, as ``python -m mnist_sweep`` runs it (alone, or as
one trial of a sweep). Only this module reads the config; everything below takes plain values."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from mnist_sweep import checkpoint, costs, data, registry, stores, tensors, tracking, train, trial
from mnist_sweep.cli import one_line_errors
from mnist_sweep.config import ConfigError, validate

log = logging.getLogger("mnist_sweep")


def main(cfg: DictConfig) -> float | list[float]:
    """Train, evaluate and log one run; return its objective: test accuracy, or validation accuracy
    with ``data.val_size`` > 0 (0.0 if it diverged; its last reported accuracy if pruned); in a Pareto
    search's trial (``hydra/sweeper=pareto``), [that accuracy, its cost (``sweep.cost``)]. A value,
    store or study it cannot use, or a full disk, ends it with one ``error:`` line instead."""
    hydra_cfg = HydraConfig.get()
    writes = stores.written(cfg.paths.outputs, cfg.mlflow.tracking_uri, cfg.mlflow.artifact_root,
                            hydra_cfg.sweeper.get("storage"), hydra_cfg.runtime.output_dir)
    with one_line_errors(ConfigError, train.DeviceError, data.DataError, trial.StudyError, stores.StoreError,
                         writes=writes):
        return train_and_track(cfg, hydra_cfg)


def train_and_track(cfg: DictConfig, hydra_cfg: DictConfig) -> float | list[float]:
    """The run itself, from checking its config to telling its trial the result."""
    objective = registry.selection_metric(cfg.data.val_size > 0)
    validate(cfg)
    device = train.pick_device(cfg.device)
    job = join_trial(cfg, hydra_cfg.sweeper, objective)
    tracking.bound_http(cfg.mlflow.http_retries, cfg.mlflow.http_timeout)
    # a study trial's sweeper reached the store just now: one that does not answer is an outage to ride out
    tracking.use_store(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.artifact_root,
                       cfg.outage_s if job.number is not None else 0)
    splits = load_splits(Path(cfg.data.root), dict(cfg.data.md5), device, cfg.data.val_size,
                         cfg.data.split_seed, cfg.pruning.check_images)
    threads = train.set_threads(cfg.threads, parallel_workers=hydra_cfg.launcher.get("n_jobs") or 1)
    built = build(cfg, device, len(splits.train))  # model, optimizer, scheduler, augment
    record = tracking.Recorder(cfg.mlflow.tracking_uri, cfg.outage_s)  # MLflow away mid-run: training goes on
    keeper = checkpoint.Keeper(cfg.checkpoint.dir, cfg.checkpoint.enabled and cfg.epochs > 1)
    continues = continued_run(cfg.checkpoint.resume or job.earlier_run, cfg.checkpoint.dir)
    with job, keeper:  # heartbeats; a crash fails the trial; the checkpoint goes once the run has ended
        try:
            description = tracking.describe_run(cfg, hydra_cfg, threads, job)
            sampled = cfg.mlflow.system_metrics_interval if cfg.mlflow.system_metrics else None
            with tracking.run(**description, stopped=STOPPED, system_metrics=sampled, record=record,
                              continues=continues) as active:
                job.attach_run(active.info.run_id)
                keeper.attach(active.info.run_id)
                if continues:
                    built = resume(keeper, record, built, lambda: build(cfg, device, len(splits.train)))
                else:  # the config files first: a run killed midway can still be run again
                    record(tracking.log_config, Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir)
                    record(tracking.log_datasets, splits.datasets)
                metrics, deadline = train_until_done(cfg, job, record, keeper, *built, splits)
                cost = log_results(cfg, hydra_cfg, job, record, built[0], splits.test, metrics[objective], objective)
                if deadline is not None:
                    raise deadline  # the run ends KILLED with its `deadline` tag, its metrics and model kept
        except train.Diverged as err:
            log.error("run diverged: %s (returning %s 0.0)", err, objective)
            cost = costs.measure(built[0], splits.test.images[:1])[cfg.sweep.cost]  # what a Pareto search weighs
            return job.complete(0.0, cost, cfg.sweep.min_accuracy)  # a finite worst score: NaN crashes the sweeper
        except trial.DeadlineReached as reached:
            log.info("%s (%s %.4f)", reached, objective, metrics[objective])
            return job.stopped_at_deadline(reached.done, metrics[objective])
        except optuna.TrialPruned as err:
            log.info("%s", err)
            return job.prune()
    return finish(job, metrics[objective], cost, cfg.sweep.min_accuracy, objective, record.lost)


# How a run that stops early ends: its status KILLED, with this tag saying why (a subclass first)
STOPPED = {trial.DeadlineReached: tracking.DEADLINE_TAG, optuna.TrialPruned: tracking.PRUNED_TAG,
           trial.Requeued: tracking.REQUEUED_TAG}


def train_until_done(cfg: DictConfig, job: trial.JobTrial | trial.NoTrial, record: tracking.Recorder,
                     keeper: checkpoint.Keeper, model: torch.nn.Module, optimizer, scheduler, augment, splits: Splits,
                     ) -> tuple[dict[str, float], trial.DeadlineReached | None]:
    """Train to the end (after the epochs ``keeper`` holds), checkpointing each epoch, reporting to
    MLflow and the trial (whose pruner may stop it); returns the last metrics. Stopped by the
    sweep's deadline, the model is scored as it stands and the :class:`trial.DeadlineReached` is
    returned too, for the run to end once its results are logged."""
    on_epoch, on_check = report_to(record, job, lambda metrics: keeper.save(metrics, model, optimizer, scheduler))
    try:
        return train.fit(model, optimizer, scheduler, splits.train, splits.test, cfg.epochs, cfg.data.batch_size,
                         cfg.data.eval_batch_size, cfg.seed, on_epoch=on_epoch, checks_per_epoch=job.checks,
                         check_set=splits.check, on_check=on_check, val_set=splits.val, augment=augment,
                         on_step=job.check_deadline, done=list(keeper.history)), None
    except trial.DeadlineReached as reached:
        metrics = train.scores(model, splits.test, splits.val, cfg.data.eval_batch_size)
        record(tracking.log_epoch, math.ceil(reached.done), metrics)
        return metrics, reached


def log_results(cfg: DictConfig, hydra_cfg: DictConfig, job: trial.JobTrial | trial.NoTrial,
                record: tracking.Recorder, model: torch.nn.Module, test: tensors.Split, value: float,
                objective: str) -> float:
    """The run's costs, weights and (if it may be the study's best, or
    ``mlflow.log_models=all``) its named model; returns its ``sweep.cost``."""
    measured = costs.measure(model, test.images[:1])  # param_count, latency_ms, model_bytes
    cost, floor = measured[cfg.sweep.cost], cfg.sweep.min_accuracy  # a Pareto search's second objective, floor
    export = cfg.mlflow.log_models == "all" or job.leads(value, cost, floor)  # conf/config.yaml
    name = tracking.model_name(hydra_cfg.runtime.choices.model, model.widths, job.study_name, job.number)
    model_id = record(tracking.log_outputs, model, test.images[:2],
                      cfg.mlflow.model_format if export else None, name)
    record(tracking.log_costs, measured, model_id)  # with a model, linked to it, with its scores
    if job.pareto:
        record(tracking.log_feasibility, value, objective, floor)
    return cost


def continued_run(run_id: str | None, folder: str) -> str | None:
    """``run_id`` (given with ``checkpoint.resume``, or the earlier run of a requeued or retried
    trial) if it left a checkpoint in ``folder`` to continue from; else None: a new run."""
    if run_id is None:
        return None
    if not checkpoint.path(folder, run_id).exists():
        log.info("run %s left no checkpoint in %s: a new run trains from the first epoch", run_id, folder)
        return None
    return run_id


def resume(keeper: checkpoint.Keeper, record: tracking.Recorder, built: tuple, rebuild: Callable[[], tuple]) -> tuple:
    """``built`` (model, optimizer, scheduler, augment) in the state of the run's checkpoint, which
    the run's ``resumed`` tag then names; built again from scratch if the checkpoint cannot be used
    (one line says why: the run trains from its first epoch)."""
    try:
        keeper.restore(*built[:3])
    except (FileNotFoundError, checkpoint.Unusable) as err:
        log.warning("%s: the run trains again from its first epoch", err)
        return rebuild()
    log.info("continuing run %s after epoch %d, from %s", keeper.file.stem, len(keeper.history), keeper.file)
    record(tracking.log_resumed, len(keeper.history))
    return built


def join_trial(cfg: DictConfig, sweeper: DictConfig, objective: str) -> trial.JobTrial | trial.NoTrial:
    """This job's trial, as the study sweeper handed it (``optuna.study``, ``optuna.trial``, ``optuna.deadline``); a
    :class:`trial.NoTrial` for a single run or a plain grid's job."""
    pruner = instantiate(sweeper.pruner) if cfg.optuna.trial is not None else None
    return trial.join(cfg.optuna.study, cfg.optuna.trial, sweeper.get("storage"), pruner,
                      sweeper.get("heartbeat_interval"), objective, cfg.epochs, cfg.pruning.checks_per_epoch,
                      cfg.optuna.deadline, cfg.outage_s)


def build(cfg: DictConfig, device: torch.device, train_images: int):
    """Model (its weights seeded by ``seed``), optimizer, schedule over every step of the run, and
    augmentation, from their config groups: the one place objects are built (the bench too)."""
    torch.manual_seed(cfg.seed)
    steps = cfg.epochs * math.ceil(train_images / cfg.data.batch_size)
    model = instantiate(cfg.model).to(device)
    optimizer = instantiate(cfg.optim)(model.parameters())
    return model, optimizer, instantiate(cfg.scheduler)(optimizer, total_steps=steps), instantiate(cfg.augment)


class Splits(NamedTuple):
    train: tensors.Split  # less the validation images
    val: tensors.Split | None  # None without a validation split
    test: tensors.Split
    check: tensors.Split  # what the checks inside an epoch score: the first images of the selection set
    datasets: list[data.DatasetInfo]  # what the run records it trained, chose and was tested on


def load_splits(root: Path, md5: dict[str, str], device: torch.device, val_size: int, split_seed: int,
                check_images: int) -> Splits:
    """The verified digits on ``device``, with ``val_size`` training images held out for validation
    (drawn with ``split_seed``), and ``check_images`` of the selection set for checks."""
    train_set, test_set = tensors.load(data.prepare(root, md5, log=log.info), device)
    try:
        train_set, val_set = tensors.holdout(train_set, val_size, split_seed)
    except ValueError as err:  # a split larger than the training set
        raise ConfigError(str(err)) from None
    selection = test_set if val_set is None else val_set  # with a validation split, test images never choose
    check = tensors.Split(selection.images[:check_images], selection.labels[:check_images])
    return Splits(train_set, val_set, test_set, check, data.datasets(root, md5, val_size, split_seed))


def report_to(record: tracking.Recorder, job: trial.JobTrial | trial.NoTrial,
              save: Callable[[dict[str, float]], None]) -> tuple[train.EpochCallback, train.CheckCallback]:
    """Training's callbacks: each epoch's metrics and each check's accuracy go to MLflow, the epoch's
    state to ``save`` (the checkpoint), then both to the trial (whose pruner may stop the run)."""
    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        record(tracking.log_epoch, epoch, metrics)
        save(metrics)  # after its metrics: a run continued from this epoch has them in its history
        job.report_epoch(epoch, metrics)

    def on_check(step: int, accuracy: float) -> None:
        record(tracking.log_check, step, accuracy)
        job.report_check(step, accuracy)

    return on_epoch, on_check


def finish(job: trial.JobTrial | trial.NoTrial, value: float, cost: float, floor: float | None, objective: str,
           lost: str | None) -> float | list[float]:
    """Tell the trial its result (in a Pareto search with its ``cost``, infeasible below ``floor``).
    If MLflow stopped answering mid-run, the run's record is incomplete: say so, and fail (the result
    is in the study all the same)."""
    returned = job.complete(value, cost, floor)
    if lost:
        held = f", which trial {job.number} holds in the study" if job.number is not None else ""
        raise SystemExit(f"error: MLflow stopped answering during the run ({lost}); it trained to {objective} "
                         f"{value:.4f}{held}, but its MLflow run is incomplete")
    return returned
