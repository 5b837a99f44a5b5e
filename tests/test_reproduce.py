"""python -m mnist_sweep.reproduce: a recorded run trained again in-process on the tiny data, the
same to the last digit on the CPU; what it will not train again (other data, a config that no longer
composes, no run, no record) is one line."""

import shutil

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

from conftest import runs_in, shared, store, write_tiny_mnist
from mnist_sweep import data, reproduce, stores, tracking, train
from mnist_sweep.__main__ import launch
from mnist_sweep.model import ConvNet

STATE = {"paths.outputs", "mlflow.tracking_uri", "mlflow.artifact_root", "checkpoint.dir"}  # what a run's store changes


def trained(*args: str) -> mlflow.entities.Run:
    """``python -m mnist_sweep *args`` in this process; its run."""
    launch(list(args))
    return mlflow.last_active_run()


def recorded(tiny_mnist, tmp_path, overrides: list[str]) -> mlflow.entities.Run:
    """A run in the test's store holding what a run of the task records as it starts (``overrides``,
    its datasets: the tiny data's), and a model, without training."""
    store(tmp_path)
    tracking.use_store(mlflow.get_tracking_uri(), "mnist_sweep", str(tmp_path / "outputs" / "mlartifacts"))
    with tracking.run("recorded", {}, {"torch.threads": "1"}) as active:
        mlflow.log_text(yaml.safe_dump(overrides), reproduce.RECORDED)
        tracking.log_datasets(data.datasets(*tiny_mnist))
        tracking.log_outputs(ConvNet([4]), torch.zeros(2, 1, 28, 28), "pickle", "shallow-4")
    return mlflow.get_run(active.info.run_id)


def test_a_run_trained_again_into_another_store_scores_the_same_and_names_its_source(overrides, tmp_path, capsys):
    # a value with a space, a comma and quotes: the overrides must come back exactly as given
    source = trained(*overrides, "seed=3", "optim.lr=0.01", "mlflow.model_format=null", "mlflow.system_metrics=false",
                     "mlflow.experiment='tiny run, \"quoted\"'")
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(shared("mlflow_schema"), copy / "mlflow.db")
    assert reproduce.main([f"run_id={source.info.run_id}", f"paths.outputs={copy}",
                           f"source_store=sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"]) == 0

    (again,) = runs_in(copy)
    assert again.info.status == "FINISHED" and again.info.run_id != source.info.run_id
    assert again.data.tags[reproduce.REPRODUCES_TAG] == source.info.run_id
    assert MlflowClient(f"sqlite:///{copy / 'mlflow.db'}").get_experiment(again.info.experiment_id).name == \
        'tiny run, "quoted"'
    for metric in ("test_acc", "test_loss", "train_loss"):  # the same run, to the last bit
        assert again.data.metrics[metric] == source.data.metrics[metric], metric
    assert {key for key, value in source.data.params.items() if again.data.params.get(key) != value} == STATE
    assert again.data.tags["torch.threads"] == source.data.tags["torch.threads"]
    assert again.data.tags["hydra.overrides"].endswith(f"threads={source.data.tags['torch.threads']} "
                                                       f"paths.outputs={copy}")  # pinned, then this command's
    assert [run.info.run_id for run in runs_in(tmp_path / "outputs")] == [source.info.run_id]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"reproduce: run {again.info.run_id} (FINISHED) trained run {source.info.run_id} again: "
        f"test_acc {source.data.metrics['test_acc']:.4f}, equal")


def test_a_killed_run_is_recorded_from_its_start_and_is_trained_again_to_its_end(overrides, tmp_path, monkeypatch,
                                                                                 capsys):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        launch([*overrides, "mlflow.system_metrics=false"])
    monkeypatch.undo()
    (source,) = runs_in(tmp_path / "outputs")
    assert source.info.status == "KILLED" and "test_acc" not in source.data.metrics

    reproduce.main([f"run_id={source.info.run_id}", f"paths.outputs={tmp_path / 'outputs'}"])  # the same store
    again = next(run for run in runs_in(tmp_path / "outputs") if run.info.run_id != source.info.run_id)
    assert again.info.status == "FINISHED" and again.data.tags[reproduce.REPRODUCES_TAG] == source.info.run_id
    assert "the source logged none to compare (it ended KILLED)" in capsys.readouterr().err


def test_a_study_trials_identity_and_stores_are_dropped_and_its_threads_pinned():
    recorded_ = ["optuna.study=s", "optuna.trial=3", "optuna.deadline=1.7e9", "stores=server",
                 "mlflow.tracking_uri=http://h:5000", "+paths.outputs=/old", "model=deep",
                 "mlflow.experiment='a b, \"c\"'", "threads=0"]
    kept, dropped = reproduce.as_single_run(recorded_, "2")
    assert kept == ["model=deep", "mlflow.experiment='a b, \"c\"'", "threads=0", "threads=2"]  # the last wins
    assert dropped == recorded_[:6]
    assert reproduce.as_single_run(["model=deep"], None) == (["model=deep"], [])


def test_other_data_is_one_line_naming_the_split_and_both_digests(overrides, tiny_mnist, tmp_path):
    source = recorded(tiny_mnist, tmp_path, overrides)
    other = tmp_path / "other"
    md5 = write_tiny_mnist(other, n_test=161)  # the same training files, another test set
    before = {i.dataset.name: i.dataset.digest for i in source.inputs.dataset_inputs}
    after = {info.name: info.digest for info in data.datasets(other, md5)}
    assert before["mnist-train"] == after["mnist-train"] and before["mnist-test"] != after["mnist-test"]

    with pytest.raises(reproduce.NotReproducible) as err:
        reproduce.main([f"run_id={source.info.run_id}", f"paths.outputs={tmp_path / 'outputs'}", f"data.root={other}",
                        *(f"data.md5.{name}={digest}" for name, digest in md5.items())])
    assert str(err.value) == (f"run {source.info.run_id} trained on mnist-test {before['mnist-test']}, but "
                              f"data.root={other} with its data.md5 gives mnist-test {after['mnist-test']}: "
                              "not the same data")
    assert len(runs_in(tmp_path / "outputs")) == 1  # nothing trained


@pytest.mark.parametrize("change,names", [
    (("model.channels=", "model.widths="), "Could not override 'model.widths'"),  # a key since renamed
    (("model.channels=[4,8]", "model=wide"), "Could not find 'model/wide'"),  # an option since removed
])
def test_a_config_that_no_longer_composes_is_one_line_naming_what(overrides, tiny_mnist, tmp_path, change, names):
    source = recorded(tiny_mnist, tmp_path, [o.replace(*change) for o in overrides])
    with pytest.raises(reproduce.NotReproducible) as err:
        reproduce.main([f"run_id={source.info.run_id}", f"paths.outputs={tmp_path / 'outputs'}"])
    assert str(err.value).startswith(f"run {source.info.run_id} (recorded) does not compose with today's config: ")
    assert names in str(err.value) and "\n" not in str(err.value)


def test_a_run_is_found_by_id_or_model_uri_and_one_it_cannot_use_is_one_line(overrides, tiny_mnist, tmp_path):
    source = recorded(tiny_mnist, tmp_path, overrides)
    uri = mlflow.get_tracking_uri()
    model_uri = source.data.tags[tracking.MODEL_URI_TAG]
    for ref in (source.info.run_id, f"runs:/{source.info.run_id}/model", model_uri):
        assert reproduce.find_run(ref, uri).info.run_id == source.info.run_id, ref
    unknown = "0123456789abcdef0123456789abcdef"
    for ref, message in ((unknown, f"run_id={unknown}: Run with id={unknown} not found"),
                         ("latest", "run_id=latest is not a run id, runs:/<run_id>/… or models:/")):
        with pytest.raises(reproduce.NotReproducible, match=message):
            reproduce.find_run(ref, uri)

    with tracking.run("evaluate-something", {}, {}) as bare:  # not a run of the task: no config recorded
        pass
    with pytest.raises(reproduce.NotReproducible) as err:
        reproduce.recorded_overrides(mlflow.get_run(bare.info.run_id))
    assert stores.one_line(err.value) == (f"run {bare.info.run_id} (evaluate-something) recorded no config "
                                          "(hydra/overrides.yaml): only a run of python -m mnist_sweep records one, "
                                          "as it starts")
