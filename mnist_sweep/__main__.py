"""``python -m mnist_sweep``: train one CNN on MNIST and track it in MLflow; ``-m`` sweeps."""

from __future__ import annotations

import gc

if __name__ == "__main__":
    # A run's process imports ~350,000 objects (torch, MLflow with pandas and SQLAlchemy, Hydra)
    # that live until it exits. Python's cyclic collector would walk them all at each full
    # collection while they import, and again at exit (1.7 s from a run's last log line to the
    # process's end): ~2.5 s of a default run's overhead, measured. So nothing collects until they
    # are imported and frozen, at the bottom of this file.
    gc.disable()

import contextlib
import logging
import math
import warnings
from pathlib import Path

import hydra
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.types import RunMode
from hydra.utils import instantiate
from hydra_plugins.mnist_sweep import StudySweeper
from omegaconf import DictConfig, OmegaConf

from mnist_sweep import data, stores, study, sweep, tensors, tracking, train
from mnist_sweep.config import PROJECT_ROOT, ConfigError, validate

log = logging.getLogger("mnist_sweep")
# hydra-optuna-sweeper 1.3 still builds optuna 2's distribution classes; optuna 5 accepts them.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(hydra_plugins|optuna)\.")
# An editable install hides the plugin from Hydra's scan of the hydra_plugins namespace.
Plugins.instance().register(StudySweeper)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train, evaluate and log one run; return its final test accuracy, or its validation accuracy
    with ``data.val_size`` > 0 (0.0 if it diverged; the last reported accuracy if its study's
    pruner stopped it)."""
    hydra_cfg = HydraConfig.get()
    try:
        validate(cfg)
        device = train.pick_device(cfg.device)
        trial = join_trial(cfg, hydra_cfg)
        tracking.bound_http(cfg.mlflow.http_retries, cfg.mlflow.http_timeout)
        tracking.use_store(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.artifact_root)
        tensor_file = data.prepare(Path(cfg.data.root), dict(cfg.data.md5), log=log.info)
        train_set, val_set, test_set = load_splits(tensor_file, device, cfg.data.val_size, cfg.data.split_seed)
    except (ConfigError, train.DeviceError, data.DataError, study.StudyError, stores.StoreError) as err:
        raise SystemExit(f"error: {err}") from None  # one line: the message says what to change
    threads = train.set_threads(cfg.threads, parallel_workers=hydra_cfg.launcher.get("n_jobs") or 1)
    torch.manual_seed(cfg.seed)
    steps = cfg.epochs * math.ceil(len(train_set) / cfg.data.batch_size)
    model, optimizer, scheduler, augment = build(cfg, device, steps)
    checks = cfg.pruning.checks_per_epoch if trial and trial.prunes else 0  # only a pruner reads them
    # what the sweep maximises: with a validation split, test images never choose a model
    objective, selection_set = ("val_acc", val_set) if val_set is not None else ("test_acc", test_set)

    record = tracking.Recorder()  # if MLflow goes away mid-run, training goes on without it
    with trial or contextlib.nullcontext():  # heartbeats; a crash fails the trial
        try:
            with tracking.run(**describe_run(cfg, hydra_cfg, threads, trial), pruned=(optuna.TrialPruned,)) as run:
                if trial:
                    trial.attach(study.RUN_ID_ATTR, run.info.run_id)  # the study's way back to MLflow
                record(tracking.log_datasets, data.datasets(Path(cfg.data.root), dict(cfg.data.md5),
                                                            cfg.data.val_size, cfg.data.split_seed))
                metrics = train.fit(
                    model, optimizer, scheduler, train_set, test_set,
                    epochs=cfg.epochs, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                    seed=cfg.seed, on_epoch=on_epoch(trial, checks, cfg.epochs, record, objective),
                    checks_per_epoch=checks, check_set=first(selection_set, cfg.pruning.check_images),
                    on_check=on_check(trial, checks, cfg.epochs, record),
                    val_set=val_set, augment=augment,
                )
                # a study trial that cannot be the best keeps its weights only: ~0.2 s a trial saved
                export = trial is None or cfg.mlflow.log_models == "all" or trial.leads(metrics[objective])
                record(tracking.log_outputs, model, Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir,
                       test_set.images[:2], cfg.mlflow.model_format if export else None)
        except train.Diverged as err:
            log.error("run diverged: %s (returning %s 0.0)", err, objective)
            return trial.complete(0.0) if trial else 0.0  # a finite worst score: the sweeper crashes on NaN
        except optuna.TrialPruned as err:
            log.info("%s", err)
            return trial.prune()
    accuracy = trial.complete(metrics[objective]) if trial else metrics[objective]
    if record.lost:  # the result is in the study; the run's record is not complete: say so, fail
        raise SystemExit(f"error: MLflow stopped answering during the run ({record.lost}); it trained to {objective} "
                         f"{accuracy:.4f}{f', which trial {trial.number} holds in the study' if trial else ''}, "
                         "but its MLflow run is incomplete")
    return accuracy


def load_splits(tensor_file: Path, device: torch.device, val_size: int,
                split_seed: int) -> tuple[tensors.Split, tensors.Split | None, tensors.Split]:
    """Train (less the validation images), validation (None with ``val_size`` 0) and test, on ``device``."""
    train_set, test_set = tensors.load(tensor_file, device)
    try:
        return *tensors.holdout(train_set, val_size, split_seed), test_set
    except ValueError as err:  # a split larger than the training set
        raise ConfigError(str(err)) from None


def first(split: tensors.Split, n: int) -> tensors.Split:
    return tensors.Split(split.images[:n], split.labels[:n])


def join_trial(cfg: DictConfig, hydra_cfg: DictConfig) -> study.JobTrial | None:
    """This job's trial, as the study sweeper handed it (``optuna.study``, ``optuna.trial``); None
    for a single run or a plain grid."""
    if cfg.optuna.trial is None:
        return None
    sweeper = hydra_cfg.sweeper
    return study.join(cfg.optuna.study, cfg.optuna.trial, sweeper.get("storage"), instantiate(sweeper.pruner),
                      sweeper.get("heartbeat_interval"))


def on_epoch(trial: study.JobTrial | None, checks: int, epochs: int, record: tracking.Recorder,
             objective: str) -> train.EpochCallback:
    """Log the epoch's metrics, then report its ``objective`` to the trial (which may stop it)."""
    def log_and_report(epoch: int, metrics: dict[str, float]) -> None:
        record(tracking.log_epoch, epoch, metrics)
        if trial:
            trial.report(percent_done(epoch * (checks + 1), epochs * (checks + 1)), metrics[objective])
    return log_and_report


def on_check(trial: study.JobTrial | None, checks: int, epochs: int, record: tracking.Recorder) -> train.CheckCallback:
    def log_and_report(step: int, accuracy: float) -> None:
        record(tracking.log_check, step, accuracy)
        if trial:
            trial.report(percent_done(step, epochs * (checks + 1)), accuracy)
    return log_and_report


def percent_done(step: int, steps: int) -> int:
    """The pruner's step: the percent of its training a trial has done. Trials of 2 and 8 epochs
    meet at 25%, 50%, ..., each at the same point of its learning-rate schedule; at "epoch 1" an
    8-epoch trial still warming up would lose to a 2-epoch trial at its peak, and be pruned."""
    return round(100 * step / steps)


def build(cfg: DictConfig, device: torch.device, steps: int):
    """Model, optimizer, schedule and augmentation from their config groups: the one place objects are built."""
    model = instantiate(cfg.model).to(device)
    optimizer = instantiate(cfg.optim)(model.parameters())
    return model, optimizer, instantiate(cfg.scheduler)(optimizer, total_steps=steps), instantiate(cfg.augment)


def describe_run(cfg: DictConfig, hydra_cfg: DictConfig, threads: int, trial: study.JobTrial | None) -> dict:
    """The MLflow run's name, params and tags; in a sweep, its parent run and trial number."""
    choices = {group: hydra_cfg.runtime.choices[group] for group in ("data", "model", "augment", "optim", "scheduler")}
    tags = {
        **tracking.source_tags("python -m mnist_sweep" + (" -m" if hydra_cfg.mode == RunMode.MULTIRUN else "")),
        "hydra.overrides": " ".join(hydra_cfg.overrides.task),
        "hydra.output_dir": hydra_cfg.runtime.output_dir,
        "mlflow.source.git.commit": tracking.git_commit(PROJECT_ROOT) or "unknown",
        "torch.threads": str(threads),  # what threads=0 (auto) became
    }
    parent = None
    if trial:
        tags |= {sweep.TRIAL_TAG: str(trial.number), sweep.STUDY_TAG: trial.study.study_name}
        parent = trial.study.user_attrs.get(sweep.PARENT_ATTR)
    elif hydra_cfg.mode == RunMode.MULTIRUN:
        parent = sweep.grid_parent(hydra_cfg.sweep.dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    del config["optuna"]  # the trial's identity: tags, not params
    return {
        "name": f"{choices['model']}-{choices['optim']}-lr{cfg.optim.lr:.3g}-bs{cfg.data.batch_size}",
        "params": {**choices, **tracking.flatten(config)},
        "tags": tags,
        "parent_run_id": parent,
    }


if __name__ == "__main__":
    gc.freeze()  # no later collection walks what is imported (a sweep's trials still collect their garbage)
    gc.enable()
    try:
        main()
    finally:
        gc.freeze()  # nor does the interpreter's last collection, at exit
