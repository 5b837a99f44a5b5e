"""Measurements in the bench's own process: the bare training loop, augmentation's warps, a model's
cost metrics, what tracking one trial costs in a store, and what system metrics cost a run."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch


def time_bare_fit(cfg) -> dict:
    """The training loop of ``python -m mnist_sweep`` on ``cfg``, without Hydra's job or MLflow: the
    data and the objects a run builds made untimed, then ``train.fit`` timed (train and test)."""
    from mnist_sweep import data, tensors, train
    from mnist_sweep.run import build  # the very objects a run builds

    device = train.pick_device(cfg.device)
    train.set_threads(cfg.threads, parallel_workers=1)
    train_set, test_set = tensors.load(data.tensor_file(cfg.data.root), device)
    built = build(cfg, device, len(train_set))
    start = time.perf_counter()
    metrics = fit(cfg, built, train_set, test_set)
    return {"fit_s": time.perf_counter() - start, "acc": metrics["test_acc"], "device": device.type,
            "epoch_s": metrics["epoch_seconds"]}


def fit(cfg, built: tuple, train_set, test_set) -> dict[str, float]:
    """``train.fit`` as ``python -m mnist_sweep`` calls it on ``cfg``, on the objects ``run.build`` made."""
    from mnist_sweep import train

    model, optimizer, scheduler, augment = built
    return train.fit(model, optimizer, scheduler, train_set, test_set, epochs=cfg.epochs,
                     batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size, seed=cfg.seed,
                     augment=augment)


def time_checkpoint(cfg, saves: int) -> dict:
    """What an epoch's checkpoint costs a run of ``cfg``: ``checkpoint.save`` of the objects a run
    builds, after one epoch's steps would have filled the optimizer's state, ``saves`` times to a
    temporary folder (the run's own: checkpoint.dir's disk); each save's seconds and the file's size."""
    from mnist_sweep import checkpoint, train
    from mnist_sweep.run import build

    device = train.pick_device(cfg.device)
    model, optimizer, scheduler, _ = build(cfg, device, 60_000)
    model(torch.zeros(2, 1, 28, 28, device=device)).sum().backward()  # momentum buffers, as after a step
    optimizer.step()
    seconds = []
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "run.pt"
        history = [{"test_acc": 0.99, "test_loss": 0.03}]
        for _ in range(saves):
            start = time.perf_counter()
            checkpoint.save(file, history, model, optimizer, scheduler)
            seconds.append(time.perf_counter() - start)
        return {"save_s": seconds, "bytes": file.stat().st_size}


def time_system_metrics(cfg, repeats: int) -> dict:
    """What MLflow's system metrics cost a run: ``cfg``'s training inside a tracked run (in its own
    experiment of the store ``cfg`` names), timed from the run's start to its end, with the monitor
    (every ``mlflow.system_metrics_interval`` s) and without, alternating, after one untimed pair (the
    first imports psutil and the monitor); the samples each monitored run logged. The monitor's
    thread takes the GIL from training now and then, and end_run waits for it: both are in the time."""
    from mlflow import MlflowClient

    from mnist_sweep import data, tensors, tracking, train
    from mnist_sweep.run import build

    device = train.pick_device(cfg.device)
    train.set_threads(cfg.threads, parallel_workers=1)
    train_set, test_set = tensors.load(data.tensor_file(cfg.data.root), device)
    tracking.use_store(cfg.mlflow.tracking_uri, "bench-system-metrics", cfg.mlflow.artifact_root)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    samples = []
    for i in range(repeats + 1):
        for monitored in (True, False):
            built = build(cfg, device, len(train_set))
            start = time.perf_counter()
            sampled = cfg.mlflow.system_metrics_interval if monitored else None
            with tracking.run("bench-system-metrics", {}, {}, system_metrics=sampled) as active:
                fit(cfg, built, train_set, test_set)
            if i:  # the first pair is the warm-up
                seconds[monitored].append(time.perf_counter() - start)
            if monitored:
                history = MlflowClient().get_metric_history(active.info.run_id, "system/cpu_utilization_percentage")
                samples.append(len(history))
    return {"with_s": seconds[True], "without_s": seconds[False], "samples": samples,
            "interval_s": cfg.mlflow.system_metrics_interval}


def time_augment(cfg) -> dict:
    """One epoch of ``train.fit`` with ``cfg``'s augmentation, and the seconds the warps alone take
    over an epoch's batches (timed apart: within an epoch's noise they would not show)."""
    from hydra.utils import instantiate

    from mnist_sweep import data, tensors, train

    fit = time_bare_fit(cfg)
    device = train.pick_device(cfg.device)
    train_set, _ = tensors.load(data.tensor_file(cfg.data.root), device)
    augment, generator = instantiate(cfg.augment), torch.Generator(device).manual_seed(cfg.seed)
    start = time.perf_counter()
    for images, _ in tensors.batches(train_set, cfg.data.batch_size, cfg.seed):
        augment(images, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return fit | {"augment_s": time.perf_counter() - start}


def time_costs(cfg, repeats: int) -> dict:
    """``costs.measure`` on the default model, ``repeats`` times in a row as a run makes it once: the
    latency each gives (and the spread of its own passes) and the seconds each measurement costs."""
    from hydra.utils import instantiate

    from mnist_sweep import costs

    torch.manual_seed(cfg.seed)
    model, image = instantiate(cfg.model), torch.full((1, 1, 28, 28), 128.0)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        measured = costs.measure(model, image)
        runs.append(measured | {"seconds": time.perf_counter() - start})
    return {"runs": runs, "passes": costs.PASSES, "warmup": costs.WARMUP, "budget_s": costs.BUDGET_S}


def record_trial(cfg, params: dict, datasets: list, model: torch.nn.Module, hydra_dir: Path) -> None:
    """What a run records, without its training: params, config files, datasets, checks, an epoch, model."""
    from mnist_sweep import tracking

    with tracking.run("bench-tracking", params, tags={}):
        tracking.log_config(hydra_dir)
        tracking.log_datasets(datasets)
        for step in range(1, 4):
            tracking.log_check(step, 0.9)
        tracking.log_epoch(4, {"train_loss": 0.1, "test_loss": 0.1, "test_acc": 0.99,
                               "epoch_seconds": 10.0, "images_per_second": 6000.0})
        model_id = tracking.log_outputs(model, torch.zeros(2, 1, 28, 28), cfg.mlflow.model_format, "bench")
        tracking.log_costs({"param_count": 29178, "latency_ms": 0.3, "latency_ms_iqr": 0.02, "model_bytes": 124789},
                           model_id)


def time_tracking(targets: Mapping[str, tuple[str, str | None]], cfg, repeats: int) -> dict[str, float]:
    """Median seconds to record one trial in each of ``targets`` (name: tracking URI, artifact root);
    the stores alternate, after one untimed warm-up (the first model export imports torch.export)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mnist_sweep import data, tracking

    model = instantiate(cfg.model)
    params = tracking.flatten(OmegaConf.to_container(cfg, resolve=True))
    datasets = data.datasets(Path(cfg.data.root), dict(cfg.data.md5))
    tracking.bound_http(cfg.mlflow.http_retries, cfg.mlflow.http_timeout)
    seconds: dict[str, list[float]] = {name: [] for name in targets}
    with tempfile.TemporaryDirectory() as tmp:
        hydra_dir = Path(tmp)  # the three config files a run logs
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (hydra_dir / name).write_text(OmegaConf.to_yaml(cfg))
        for i in range(repeats + 1):
            for name, (uri, artifact_root) in targets.items():
                tracking.use_store(uri, "bench-tracking", artifact_root)
                start = time.perf_counter()
                record_trial(cfg, params, datasets, model, hydra_dir)
                if i:  # the first round is the warm-up
                    seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}
