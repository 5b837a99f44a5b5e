"""Finding, loading and registering models: the URIs a user passes, the logged pt2 model, and the
champion (``models:/mnist-cnn@champion``) with the one rule that chooses it."""

from __future__ import annotations

import logging
import os
import re

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from torch import nn

from mnist_sweep.tracking import MODEL_URI_TAG

log = logging.getLogger(__name__)

REGISTERED_MODEL = "mnist-cnn"
CHAMPION = "champion"
ALLOW_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


def selection_metric(has_validation: bool) -> str:
    """The metric that chooses between runs, everywhere (a sweep's objective, the study's best run,
    the champion): validation accuracy when a split is held out for it, so the test set never
    chooses a model; else test accuracy."""
    return "val_acc" if has_validation else "test_acc"


def promote(client: MlflowClient, best: Run, cost: str | None = None, floor: float | None = None) -> None:
    """Register the best run's model (once per run); point ``champion`` at it if it beats the
    current champion on the metric that chose it (``val_acc`` if it has one, else ``test_acc``); in a
    Pareto search (``cost``: the metric it minimises), if the champion is below ``floor`` or costs more.
    Callers hold the store's lock: the read and the move must not interleave."""
    metric = selection_metric("val_acc" in best.data.metrics)
    acc = best.data.metrics[metric]
    try:
        current = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is not None:
        if current.run_id == best.info.run_id:
            return
        # a champion chosen on test_acc has no val_acc: a model chosen without looking at the
        # test set replaces it (their scores don't compare)
        held = client.get_run(current.run_id).data.metrics
        champion_acc = held.get(metric, 0.0)
        if cost is None:
            beats = acc > champion_acc
        else:  # the cheapest model at or above the floor; one run before costs were logged costs the most
            below = floor is not None and champion_acc < floor
            beats = below or (best.data.metrics[cost], -acc) < (held.get(cost, float("inf")), -champion_acc)
        if not beats:
            log.info("best run's %s %.4f%s does not beat champion v%s (%.4f%s)", metric, acc,
                     f", {cost} {best.data.metrics[cost]:g}" if cost else "", current.version, champion_acc,
                     f", {cost} {held.get(cost, float('inf')):g}" if cost else "")
            return
    model_uri = best.data.tags.get(MODEL_URI_TAG)
    if model_uri is None:
        log.warning("best run %s logged no model (mlflow.model_format=null): nothing to register", best.info.run_id)
        return
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}' and run_id = '{best.info.run_id}'")
    version = versions[0] if versions else mlflow.register_model(model_uri, REGISTERED_MODEL)
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version.version)
    log.info("registered %s v%s (%s %.4f) as @%s", REGISTERED_MODEL, version.version, metric, acc, CHAMPION)


class ModelNotFound(LookupError):
    """A model URI that names no loadable model; the message says which and why."""


def resolve_model(uri: str, option: str = "model_uri") -> tuple[str, str]:
    """``runs:/<id>/model``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
    ``models:/m-…`` or a bare run id → (a loadable ``models:/m-…`` URI, the id of the run that logged it).

    A bare run id or ``runs:/<id>/model`` means the model that run logged: its ``model_uri`` tag
    (MLflow alone would look for a model named ``model``, and a run's model is named for what it is),
    else ``runs:/<id>/model`` as MLflow reads it (a run logged before models had names).
    ``option`` is how the user passed the URI (``model_uri``, or ``MODEL`` for ``make serve``): errors
    quote it, and a registry name or alias that does not exist yet says what to pass instead.
    """
    run_id = None
    if re.fullmatch(r"[0-9a-f]{32}", uri):
        run_id = uri
    elif not uri.startswith(("runs:/", "models:/")):  # anything else MLflow would read as a local path
        raise ModelNotFound(
            f"{option}={uri} is not runs:/<run_id>/model, models:/<name>@<alias>, models:/<name>/<version> "
            "or a 32-character run id"
        )
    elif found := re.match(r"runs:/([0-9a-f]{32})/model$", uri):
        run_id = found.group(1)
    if run_id:
        try:
            run = mlflow.get_run(run_id)
        except mlflow.exceptions.MlflowException as err:
            raise ModelNotFound(f"{option}={uri}: {err.message}") from None
        if weights_only := _weights_only(run):  # before MLflow tries to download what is not there
            raise ModelNotFound(f"{option}={uri}: {weights_only}")
        uri = run.data.tags.get(MODEL_URI_TAG, f"runs:/{run_id}/model")
    try:
        info = mlflow.models.get_model_info(uri)
    except mlflow.exceptions.MlflowException as err:
        registry = uri.startswith("models:/") and not uri.startswith("models:/m-")
        raise ModelNotFound(f"{option}={uri}: {err.message}" + (_what_exists(option) if registry else "")) from None
    return info.model_uri, info.run_id


def _weights_only(run: Run) -> str | None:
    """For a run that logged its weights but no model: why, and the command that trains it again
    with one (same config and seed, same weights on the CPU); None for any other run."""
    if MODEL_URI_TAG in run.data.tags or "mlflow.model_format" not in run.data.params:
        return None
    if run.data.params["mlflow.model_format"] == "None":
        why = "it ran with mlflow.model_format=null"
    else:
        why = ("it was a sweep trial that did not lead its study when it ended, and mlflow.log_models=best "
               "exports only those (mlflow.log_models=all exports every trial's)")
    # the trial's own overrides; a single run always logs its model in the configured format
    overrides = [arg for arg in run.data.tags.get("hydra.overrides", "").split()
                 if not arg.startswith(("optuna.", "mlflow.log_models=", "mlflow.model_format=null"))]
    run_id = run.info.run_id
    return (f"run {run_id} ({run.info.run_name}) logged its weights (runs:/{run_id}/weights) but no model: {why}. "
            f"Train it again as one run to get its model: python -m mnist_sweep {' '.join(overrides)}".rstrip())


def _what_exists(option: str) -> str:
    """For a registered model or alias that is not there: the latest run's model, or what to run first."""
    latest = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.{MODEL_URI_TAG} LIKE 'models:/%'",
                                order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not latest:
        return ". No run in this store has logged a model yet: train one (make run) or run a sweep (make sweep)"
    run = latest[0].info
    return (f". A sweep registers its best run's model as the champion: run one (make sweep), or pass "
            f"{option}=runs:/{run.run_id}/model, the latest run's model ({run.run_name})")


def load_model(uri: str) -> nn.Module:
    """The logged model, on the CPU: float32 (n, 1, 28, 28) raw pixels → (n, 10) logits.

    Only a pt2 model loads, and only after MLflow has checked that its archive holds no pickle:
    MLflow 3 unpickles by default (MLFLOW_ALLOW_PICKLE_DESERIALIZATION defaults to true), and a
    pickle can run any code. The result is an exported graph already in inference mode; calling
    ``.eval()`` on it raises.
    """
    previous = os.environ.get(ALLOW_PICKLE_ENV)
    os.environ[ALLOW_PICKLE_ENV] = "false"  # read at load time, by this process only
    try:
        return mlflow.pytorch.load_model(uri)
    except mlflow.exceptions.MlflowException as err:
        raise ModelNotFound(f"{uri}: {err.message}") from None
    finally:
        if previous is None:
            del os.environ[ALLOW_PICKLE_ENV]
        else:
            os.environ[ALLOW_PICKLE_ENV] = previous
