"""``python -m mnist_sweep``: train one CNN on MNIST and track it in MLflow; ``-m`` sweeps."""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mnist_sweep import data, tensors, tracking, train
from mnist_sweep.config import PROJECT_ROOT, ConfigError, validate

log = logging.getLogger("mnist_sweep")
# hydra-optuna-sweeper 1.3 still builds optuna 2's distribution classes; optuna 5 accepts them.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(hydra_plugins|optuna)\.")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train, evaluate and log one run; return its final test accuracy (0.0 if it diverged)."""
    try:
        validate(cfg)
        device = train.pick_device(cfg.device)
        tensor_file = data.prepare(Path(cfg.data.root), dict(cfg.data.md5), log=log.info)
    except (ConfigError, train.DeviceError, data.DataError) as err:
        raise SystemExit(f"error: {err}") from None  # one line: the message says what to change
    hydra_cfg = HydraConfig.get()
    threads = train.set_threads(cfg.threads, parallel_workers=hydra_cfg.launcher.get("n_jobs") or 1)
    torch.manual_seed(cfg.seed)
    train_set, test_set = tensors.load(tensor_file, device)
    model, optimizer, scheduler = build(cfg, device, steps=cfg.epochs * math.ceil(len(train_set) / cfg.data.batch_size))

    tracking.use_store(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.artifact_root)
    try:
        with tracking.run(**describe_run(cfg, hydra_cfg, threads)):
            tracking.log_datasets(data.datasets(Path(cfg.data.root), dict(cfg.data.md5)))
            metrics = train.fit(
                model, optimizer, scheduler, train_set, test_set,
                epochs=cfg.epochs, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                seed=cfg.seed, on_epoch=tracking.log_epoch,
            )
            tracking.log_outputs(model, Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir,
                                 test_set.images[:2], cfg.mlflow.model_format)
    except train.Diverged as err:
        log.error("run diverged: %s (returning test_acc 0.0)", err)
        return 0.0  # a finite worst score: the Optuna sweeper crashes on NaN
    return metrics["test_acc"]


def build(cfg: DictConfig, device: torch.device, steps: int):
    """Model, optimizer and schedule from their config groups: the one place objects are built."""
    model = instantiate(cfg.model).to(device)
    optimizer = instantiate(cfg.optim)(model.parameters())
    return model, optimizer, instantiate(cfg.scheduler)(optimizer, total_steps=steps)


def describe_run(cfg: DictConfig, hydra_cfg: DictConfig, threads: int) -> dict:
    """The MLflow run's name, params and tags; in a sweep, its parent run and trial number."""
    choices = {group: hydra_cfg.runtime.choices[group] for group in ("data", "model", "optim", "scheduler")}
    tags = {
        **tracking.source_tags("python -m mnist_sweep" + (" -m" if hydra_cfg.mode == RunMode.MULTIRUN else "")),
        "hydra.overrides": " ".join(hydra_cfg.overrides.task),
        "hydra.output_dir": hydra_cfg.runtime.output_dir,
        "mlflow.source.git.commit": tracking.git_commit(PROJECT_ROOT) or "unknown",
        "torch.threads": str(threads),  # what threads=0 (auto) became
    }
    parent = os.environ.get(tracking.PARENT_RUN_ENV) if hydra_cfg.mode == RunMode.MULTIRUN else None
    if parent:  # trials are asked in job order, from the study's size when the sweep started
        tags["trial"] = str(int(os.environ[tracking.FIRST_TRIAL_ENV]) + hydra_cfg.job.num)
    return {
        "name": f"{choices['model']}-{choices['optim']}-lr{cfg.optim.lr:.3g}-bs{cfg.data.batch_size}",
        "params": {**choices, **tracking.flatten(OmegaConf.to_container(cfg, resolve=True))},
        "tags": tags,
        "parent_run_id": parent,
    }


if __name__ == "__main__":
    main()
