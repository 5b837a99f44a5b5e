"""``python -m mnist_sweep.reproduce run_id=ID [overrides]``: train a recorded run again, as a new
MLflow run tagged ``mnist_sweep.reproduces`` with the source run's id, and say whether its test
accuracy is the same.

ID: a run id, ``runs:/<run_id>/…``, or a ``models:/`` URI (the run that logged that model), looked
up in the MLflow store this command names (the overrides: ``paths.outputs=…``, ``stores=server``),
or in ``source_store=<tracking URI>``. The run is trained again from the overrides it recorded when
it started (``hydra/overrides.yaml``), on today's config and code:

- as one run: a study trial's identity (``optuna.*``) is dropped;
- with the torch threads it had (its ``torch.threads`` tag): on the CPU, the same seed and threads
  give the same run;
- into this command's stores: the ones it recorded (``stores``, ``paths.outputs``,
  ``mlflow.tracking_uri``, ``mlflow.artifact_root``) are dropped;
- on the data it recorded: each dataset's digest must be the one this command's data gives;
- with the overrides given here last, so they win.

A run that cannot be trained again so (no recorded config, a key or option since renamed or
removed, other data) is one ``error:`` line naming what.
"""

from __future__ import annotations

from mnist_sweep import cli

cli.defer_collection(__name__)

import os
import re
import shlex
import sys
from pathlib import Path

import mlflow
import yaml
from hydra.errors import HydraException
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mnist_sweep import data, registry, stores, tracking
from mnist_sweep.config import ConfigError, compose, split_args

REPRODUCES_TAG = "mnist_sweep.reproduces"  # on the new run: the id of the run it trains again
RECORDED = "hydra/overrides.yaml"  # what a run of python -m mnist_sweep was started with (tracking.log_config)
TRIAL_IDENTITY = "optuna."  # the study, trial number and deadline the study sweeper gave a trial's job
STATE = ("stores", "paths.outputs", "mlflow.tracking_uri", "mlflow.artifact_root")  # where a run writes
CONTINUED = "checkpoint.resume"  # which run's checkpoint a run took up (mnist_sweep.resume): not trained again


class NotReproducible(RuntimeError):
    """A run that cannot be trained again as it recorded; the message names the run and why."""


def say(line: str) -> None:
    print(f"reproduce: {line}", file=sys.stderr, flush=True)


def find_run(ref: str, tracking_uri: str) -> Run:
    """The run ``ref`` names (a run id, ``runs:/<run_id>/…``, or a ``models:/`` URI: the run that
    logged the model) in the store ``tracking_uri``."""
    mlflow.set_tracking_uri(tracking_uri)
    if ref.startswith("models:/"):
        run_id = registry.resolve_model(ref, option="run_id")[1]
    elif found := re.fullmatch(r"[0-9a-f]{32}", ref) or re.match(r"runs:/([0-9a-f]{32})(?:/|$)", ref):
        run_id = found.group(found.lastindex or 0)
    else:
        raise NotReproducible(f"run_id={ref} is not a run id, runs:/<run_id>/… or models:/<name>@<alias>")
    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise NotReproducible(f"run_id={ref}: {err.message} in {stores.redact(tracking_uri)}") from None


def recorded_overrides(run: Run) -> list[str]:
    """The overrides ``run`` was started with, exactly as given: its ``hydra/overrides.yaml`` (the
    ``hydra.overrides`` tag joins them with spaces, which a value may hold)."""
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{RECORDED}")
    except (mlflow.exceptions.MlflowException, OSError):
        raise NotReproducible(f"run {run.info.run_id} ({run.info.run_name}) recorded no config ({RECORDED}): "
                              "only a run of python -m mnist_sweep records one, as it starts") from None
    return list(yaml.safe_load(text) or [])


def as_single_run(recorded: list[str], threads: str | None) -> tuple[list[str], list[str]]:
    """``recorded`` less a trial's identity and the stores (this command's are used), then the
    thread count the run had (its ``threads=0`` would count this machine's cores); and what was dropped."""
    kept, dropped = [], []
    for override in recorded:
        key = override.split("=", 1)[0].lstrip("+~")
        (dropped if key.startswith(TRIAL_IDENTITY) or key in (*STATE, CONTINUED) else kept).append(override)
    return kept + ([f"threads={threads}"] if threads else []), dropped


def composed(run: Run, overrides: list[str]) -> DictConfig:
    """Today's config with ``overrides`` (``run``'s): one line naming what no longer composes."""
    try:
        return compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise NotReproducible(f"run {run.info.run_id} ({run.info.run_name}) does not compose with today's config: "
                              f"{stores.one_line(err)}") from None


def check_data(run: Run, cfg: DictConfig) -> None:
    """Each dataset ``run`` recorded (name, digest) is one that ``cfg``'s data gives."""
    recorded = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    if not recorded:
        say(f"run {run.info.run_id} recorded no datasets: its data is not checked")
        return
    here = {info.name: info.digest for info in data.datasets(Path(cfg.data.root), dict(cfg.data.md5),
                                                              cfg.data.val_size, cfg.data.split_seed)}
    for name, digest in recorded.items():
        if here.get(name) != digest:
            raise NotReproducible(
                f"run {run.info.run_id} trained on {name} {digest}, but data.root={cfg.data.root} with its "
                f"data.md5 gives {name} {here.get(name, '(none)')}: not the same data")
    say("the data is as recorded: " + ", ".join(f"{name} {digest}" for name, digest in sorted(recorded.items())))


def run_again(source: Run, extra: list[str], tag: str | None) -> Run:
    """Train ``source`` again in this process: from its recorded overrides as one run
    (:func:`as_single_run`), then ``extra`` (they win), once they compose and its data is the data it
    recorded. Returns the run it trained, tagged ``tag`` (if any) with the source's id from its start."""
    from mnist_sweep.__main__ import launch  # only now: the task's imports (torch, the sweeper)

    overrides, dropped = as_single_run(recorded_overrides(source), source.data.tags.get("torch.threads"))
    overrides += extra
    if dropped:
        trial = source.data.tags.get(tracking.TRIAL_TAG)
        say(f"{f'trial {trial} of study {source.data.tags.get(tracking.STUDY_TAG)}, ' if trial else ''}"
            f"trained again as one run into this command's stores: dropped {' '.join(dropped)}")
    check_data(source, composed(source, overrides))
    say(f"training run {source.info.run_id} ({source.info.run_name}) again: "
        f"python -m mnist_sweep {shlex.join(overrides)}")
    with tracking.tagging({tag: source.info.run_id} if tag else {}):
        launch(overrides)
    return mlflow.last_active_run()


def verdict(source: Run, new: Run) -> str:
    """Whether ``new`` scored the test accuracy ``source`` did, in a line."""
    before, after = source.data.metrics.get("test_acc"), new.data.metrics.get("test_acc")
    what = f"run {new.info.run_id} ({new.info.status}) trained run {source.info.run_id} again"
    if after is None:
        return f"{what}, and logged no test_acc"
    if before is None:
        return f"{what}: test_acc {after:.4f}; the source logged none to compare (it ended {source.info.status})"
    if after == before:
        return f"{what}: test_acc {after:.4f}, equal"
    return (f"{what}: test_acc {after:.4f} against {before:.4f}, not equal (the same seed and threads give the same "
            "run on the CPU, with the same torch)")


def main(argv: list[str]) -> int:
    args, overrides = split_args(argv, ("run_id", "source_store"))
    if len(args["run_id"]) != 1 or len(args["source_store"]) > 1:
        raise ConfigError("give one run_id=<run id>, runs:/<run id>/… or models:/<name>@<alias>, and at most one "
                          "source_store=<tracking URI>")
    here = compose(overrides)  # this command's stores: where the source is looked up, the new run goes
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"  # a bar for one small file
    tracking.bound_http(here.mlflow.http_retries, here.mlflow.http_timeout)
    source = find_run(args["run_id"][0], (args["source_store"] or [here.mlflow.tracking_uri])[0])
    say(verdict(source, run_again(source, overrides, REPRODUCES_TAG)))
    return 0


if __name__ == "__main__":
    cli.run(main)
