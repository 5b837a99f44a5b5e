"""Finding, loading and registering models: every URI form a user passes, what a missing model
says instead, the pt2 model that loads without unpickling, and the champion rule."""

import re

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from conftest import make_digits
from mnist_sweep import registry, tracking
from mnist_sweep.model import ConvNet
from mnist_sweep.registry import CHAMPION, REGISTERED_MODEL


def test_every_uri_form_resolves_to_the_logged_model(logged_model):
    mlflow.set_tracking_uri(logged_model.tracking_uri)
    expected = (logged_model.model_uri, logged_model.run_id)
    for uri in (f"runs:/{logged_model.run_id}/model", "models:/mnist-cnn@champion", "models:/mnist-cnn/1",
                logged_model.model_uri, logged_model.run_id):
        assert registry.resolve_model(uri) == expected, uri


@pytest.mark.parametrize("uri,named", [
    ("models:/mnist-cnn@nope", "alias nope not found"),
    ("models:/nope@champion", "name=nope not found"),
    ("0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef not found"),
    ("weights.pt", "model_uri=weights.pt is not runs:/"),
])
def test_an_unknown_model_is_named(logged_model, uri, named):
    mlflow.set_tracking_uri(logged_model.tracking_uri)
    with pytest.raises(registry.ModelNotFound, match=re.escape(named)):
        registry.resolve_model(uri)


def test_a_pickled_model_is_refused_not_unpickled(logged_model, tmp_path):
    mlflow.set_tracking_uri(logged_model.tracking_uri)
    with tracking.run("pickled", {}, {}):
        tracking.log_outputs(logged_model.model, torch.zeros(2, 1, 28, 28), "pickle", "pickled")
        uri = mlflow.get_run(mlflow.active_run().info.run_id).data.tags[tracking.MODEL_URI_TAG]
    with pytest.raises(registry.ModelNotFound, match="pickle"):
        registry.load_model(uri)


def test_the_loaded_model_matches_the_trained_one_on_any_batch_size(logged_model):
    mlflow.set_tracking_uri(logged_model.tracking_uri)
    loaded = registry.load_model(logged_model.model_uri)
    images = torch.from_numpy(make_digits(5, seed=9)[0]).float().unsqueeze(1)
    with torch.inference_mode():
        for n in (1, 5):
            torch.testing.assert_close(loaded(images[:n]), logged_model.model(images[:n]))


@pytest.mark.parametrize("option", ["model_uri", "MODEL"])
def test_with_no_champion_the_error_names_the_latest_runs_model(store_without_champion, option):
    mlflow.set_tracking_uri(store_without_champion.tracking_uri)
    with pytest.raises(registry.ModelNotFound) as err:
        registry.resolve_model("models:/mnist-cnn@champion", option=option)
    error = str(err.value)
    assert f"{option}=models:/mnist-cnn@champion: Registered Model with name=mnist-cnn not found" in error
    assert "make sweep" in error
    assert f"{option}=runs:/{store_without_champion.latest_run_id}/model, the latest run's model (newer-run)" in error


def test_a_trial_with_weights_only_says_how_to_get_its_model(weights_only_trial):
    mlflow.set_tracking_uri(weights_only_trial.tracking_uri)
    run_id = weights_only_trial.run_id
    for uri in (run_id, f"runs:/{run_id}/model"):
        with pytest.raises(registry.ModelNotFound) as err:
            registry.resolve_model(uri)
        error = str(err.value)
        assert error.startswith("model_uri=")
        assert f"run {run_id} (deep-sgd-lr0.05-bs64) logged its weights (runs:/{run_id}/weights) but no model" in error
        assert "mlflow.log_models=best" in error
        # the trial's own overrides, without its study identity: a single run that logs the model
        assert error.endswith("Train it again as one run to get its model: python -m mnist_sweep model=deep "
                              "optim.lr=0.05")


def test_a_run_without_a_model_says_it_ran_with_model_format_null(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.use_store(tracking_uri, "mnist_sweep", str(tmp_path / "mlartifacts"))
    params = {"mlflow.model_format": None, "mlflow.log_models": "best"}
    with tracking.run("no-model", params, {"hydra.overrides": "mlflow.model_format=null epochs=2"}) as active:
        tracking.log_outputs(torch.nn.Linear(1, 1), torch.zeros(2, 1), None, "linear")
    mlflow.set_tracking_uri(tracking_uri)
    with pytest.raises(registry.ModelNotFound) as err:
        registry.resolve_model(active.info.run_id)
    assert "no model: it ran with mlflow.model_format=null" in str(err.value)
    assert str(err.value).endswith("python -m mnist_sweep epochs=2")


def test_with_no_model_at_all_the_error_says_to_train_first(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.use_store(tracking_uri, "mnist_sweep", str(tmp_path / "mlartifacts"))
    with tracking.run("weights-only", {}, {}):  # mlflow.model_format=null logs no model
        pass
    mlflow.set_tracking_uri(tracking_uri)
    with pytest.raises(registry.ModelNotFound) as err:
        registry.resolve_model("models:/mnist-cnn@champion")
    assert "No run in this store has logged a model yet: train one (make run) or run a sweep (make sweep)" in str(
        err.value)


def test_the_champion_moves_on_the_metric_that_chose_the_candidate(tmp_path):
    """A model chosen on validation replaces one chosen on the test set; among models chosen on
    validation, the higher val_acc wins, whatever their test_acc."""
    tracking.use_store(f"sqlite:///{tmp_path / 'mlflow.db'}", "promote", str(tmp_path / "mlartifacts"))
    client = MlflowClient()

    def candidate(cost: str | None = None, floor: float | None = None, **metrics: float):
        with tracking.run("candidate", {}, {}) as active:
            tracking.log_outputs(ConvNet([4]), torch.zeros(2, 1, 28, 28), "pickle", "shallow-4")
            mlflow.log_metrics(metrics)
        run = client.get_run(active.info.run_id)
        registry.promote(client, run, cost, floor)
        return client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).run_id == run.info.run_id

    assert candidate(test_acc=0.99)                   # the first champion, chosen on test
    assert candidate(val_acc=0.95, test_acc=0.97)     # chosen on validation: replaces it
    assert not candidate(val_acc=0.94, test_acc=0.999)  # a better test_acc does not choose
    assert candidate(val_acc=0.96, test_acc=0.96)
    registry.promote(client, client.get_run(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).run_id))
    assert len(client.search_model_versions(f"name = '{REGISTERED_MODEL}'")) == 3  # never two versions of one run
    # a Pareto search's champion: the cheapest model at or above the floor (the one above logged no cost)
    assert candidate("param_count", 0.95, val_acc=0.955, param_count=3000)
    assert not candidate("param_count", 0.95, val_acc=0.99, param_count=9000)  # more accurate, but costlier
    assert not candidate("param_count", 0.95, val_acc=0.955, param_count=3000)  # a tie: no move
    assert candidate("param_count", 0.95, val_acc=0.951, param_count=1000)
    assert candidate("param_count", 0.99, val_acc=0.99, param_count=9000)  # the champion is below this floor


def test_the_selection_metric_is_validation_accuracy_whenever_there_is_a_split():
    assert registry.selection_metric(True) == "val_acc" and registry.selection_metric(False) == "test_acc"
