"""The core run end to end on the tiny data: what lands in MLflow, and how a run ends."""

import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import threading
import time

import mlflow
import numpy as np
import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from conftest import assert_one_line_error, checkpoint_epoch, only_run, run_cli, runs_in, store
from hydra_plugins.mnist_sweep import launcher
from mnist_sweep import data, tensors, tracking
from mnist_sweep.config import CONF_DIR
from mnist_sweep.run import main, train_until_done
from mnist_sweep.model import ConvNet
from mnist_sweep.trial import DEADLINE_ATTR, RUN_ID_ATTR, Requeued, open_storage


def run_in_process(overrides: list[str], output_dir) -> float:
    """The task function exactly as Hydra calls it, without a subprocess."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # Hydra hands the task its config without the hydra node
    return main(cfg)


def test_cli_run_logs_params_metrics_artifacts_and_a_servable_model(overrides, tiny_mnist, tmp_path):
    done = run_cli("mnist_sweep", *overrides, "epochs=2", "optim.lr=0.05", "threads=0", "mlflow.model_format=pt2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 2/2" in done.stdout  # one log line per epoch (Hydra logs to stdout)

    client = store(tmp_path)
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "fast-sgd-lr0.05-bs32"
    params = run.data.params
    assert params["optim.lr"] == "0.05" and params["data.batch_size"] == "32" and params["epochs"] == "2"
    assert params["model"] == "fast" and params["model.channels"] == "[4, 8]"
    assert "optim.lr=0.05" in run.data.tags["hydra.overrides"]
    assert run.data.tags["hydra.output_dir"].startswith(str(tmp_path / "outputs" / "runs"))
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert run.data.tags["torch.threads"] == str(len(os.sched_getaffinity(0)))  # threads=0, one process: every core
    assert run.data.tags["mlflow.source.name"] == "python -m mnist_sweep"  # the runs table's Source column
    assert run.data.tags["mlflow.source.type"] == "LOCAL"

    # the Dataset column: each split with the digest of its canonical MD5s, its context and origin
    root, md5 = tiny_mnist
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["mnist-test", "mnist-train"]
    for name, context, files in (("mnist-train", "training", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                                 ("mnist-test", "testing", ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        logged = inputs[name]
        assert logged.dataset.digest == hashlib.md5(" ".join(md5[f] for f in files).encode()).hexdigest()[:8]
        assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": context}
        assert logged.dataset.source_type == "local"
        assert json.loads(logged.dataset.source) == {"uri": data.raw_dir(root).resolve().as_uri()}

    for name in ("train_loss", "test_loss", "test_acc", "epoch_seconds", "images_per_second", "eval_seconds"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2], name
    final_acc = run.data.metrics["test_acc"]
    assert 0.0 <= final_acc <= 1.0

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert {"hydra/config.yaml", "hydra/overrides.yaml", "hydra/hydra.yaml"} <= artifacts
    weights = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="weights/state_dict.pt",
                                                  dst_path=str(tmp_path / "dl"))
    config = OmegaConf.load(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="hydra/config.yaml", dst_path=str(tmp_path / "dl")))
    net = ConvNet(list(config.model.channels), config.model.convs_per_block, config.model.kernel_size,
                  config.model.batch_norm, config.model.dropout, config.model.downsample)
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()

    _, test = tensors.load(data.tensor_file(root), torch.device("cpu"))
    with torch.inference_mode():
        expected = net(test.images)
    assert (expected.argmax(1) == test.labels).float().mean().item() == pytest.approx(final_acc)

    logged = mlflow.pyfunc.load_model(run.data.tags[tracking.MODEL_URI_TAG])
    served = logged.predict(test.images[:7].numpy())  # raw 0-255 pixels in, class scores out
    np.testing.assert_allclose(served, expected[:7].numpy(), rtol=1e-4, atol=1e-4)
    signature = logged.metadata.signature.inputs.to_dict()[0]
    assert tuple(signature["tensor-spec"]["shape"]) == (-1, 1, 28, 28)

    # MLflow's Models tab: the model named for what it is, with the run's params, last scores and costs
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.name == "fast-4-8" and model.source_run_id == run.info.run_id
    assert run.data.tags[tracking.MODEL_URI_TAG] == f"models:/{model.model_id}"
    assert model.params == params
    linked = {metric.key: metric.value for metric in model.metrics}
    assert linked == {key: run.data.metrics[key] for key in ("test_acc", "test_loss", "param_count", "latency_ms",
                                                             "latency_ms_iqr", "model_bytes")}
    assert linked["param_count"] == sum(p.numel() for p in net.parameters())
    assert linked["model_bytes"] == os.path.getsize(weights)  # the weights file the run logged
    assert linked["latency_ms"] > 0


def test_a_validation_split_is_scored_each_epoch_and_is_what_the_run_returns(overrides, tiny_mnist, tmp_path):
    score = run_in_process([*overrides, "data.val_size=64", "epochs=2", "augment=shift",
                            "mlflow.model_format=null"], tmp_path / "run")
    client = store(tmp_path)
    run = only_run(client)
    assert score == run.data.metrics["val_acc"]  # what a sweep maximises; test_acc is the report
    for name in ("val_acc", "val_loss", "test_acc", "test_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], name
    assert run.data.params["data.val_size"] == "64" and run.data.params["data.split_seed"] == "0"
    assert run.data.params["augment"] == "shift" and run.data.params["augment.shift"] == "2"
    inputs = {i.dataset.name: {t.key: t.value for t in i.tags} for i in run.inputs.dataset_inputs}
    assert inputs == {"mnist-train": {"mlflow.data.context": "training"},
                      "mnist-val": {"mlflow.data.context": "validation"},
                      "mnist-test": {"mlflow.data.context": "testing"}}

    # the run records the carved split it trained on: its training digest is not the whole set's
    root, md5 = tiny_mnist
    digests = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    carved = {info.name: info.digest for info in data.datasets(root, md5, val_size=64, split_seed=0)}
    assert digests == carved
    assert digests["mnist-train"] != data.datasets(root, md5)[0].digest


def test_nan_loss_ends_the_run_failed_and_scores_zero(overrides, tmp_path):
    score = run_in_process([*overrides, "optim.lr=1e8", "mlflow.model_format=null"], tmp_path / "run")
    assert score == 0.0
    run = only_run(store(tmp_path))
    assert run.info.status == "FAILED"
    assert "test_acc" not in run.data.metrics  # it stopped at once, before any evaluation


def test_in_process_run_returns_the_logged_final_accuracy(overrides, tmp_path):
    score = run_in_process([*overrides, "mlflow.model_format=null"], tmp_path / "run")
    run = only_run(store(tmp_path))
    assert run.info.status == "FINISHED"
    assert score == run.data.metrics["test_acc"]
    assert score > 0.5  # the tiny digits are learnable: a broken loop would sit near 0.1
    # no model logged (model_format=null), its costs all the same
    assert {"param_count", "latency_ms", "latency_ms_iqr", "model_bytes"} <= set(run.data.metrics)


def test_a_run_samples_the_machine_into_its_system_metrics_unless_told_not_to(overrides, tmp_path, monkeypatch):
    """MLflow's monitor, sampling every 50 ms here: CPU and memory as ``system/…`` metrics, a step a
    sample, none of them the logged model's (MLflow links a run's metrics at the model's step to it);
    with mlflow.system_metrics=false, none. Each run waits a second before it trains: a tiny run holds
    the GIL for about a second, and on a loaded machine its monitor then sampled only once."""
    def after_a_second(*args, **kwargs):
        time.sleep(1)  # the monitor's thread samples meanwhile
        return train_until_done(*args, **kwargs)

    monkeypatch.setattr("mnist_sweep.run.train_until_done", after_a_second)
    quick = [*overrides, "mlflow.system_metrics_interval=0.05"]
    run_in_process(quick, tmp_path / "on")
    run_in_process([*quick, "mlflow.system_metrics=false", "mlflow.model_format=null"], tmp_path / "off")
    client = store(tmp_path)
    on, off = client.search_runs([client.get_experiment_by_name("mnist_sweep").experiment_id],
                                 order_by=["attributes.start_time ASC"])
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage"} <= set(on.data.metrics)
    cpu = client.get_metric_history(on.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and sorted(m.step for m in cpu) == list(range(len(cpu)))
    assert all(0 <= m.value <= 100 for m in cpu)
    (model,) = client.search_logged_models([on.info.experiment_id])
    assert model.source_run_id == on.info.run_id and {m.key for m in model.metrics} >= {"test_acc", "param_count"}
    assert not [m.key for m in model.metrics if m.key.startswith("system/")]
    assert off.data.metrics.get("test_acc") and not [key for key in off.data.metrics if key.startswith("system/")]


@pytest.mark.parametrize("override,message", [
    ("optim.lr=0", "error: optim.lr must be > 0"), ("data.batch_size=0", "error: data.batch_size must be >= 1"),
    ("epochs=0", "error: epochs must be >= 1"), ("device=tpu", "error: device must be one of"),
    ("model.kernel_size=4", "error: model.kernel_size must be a positive odd integer"),
    ("model.dropout=1.5", "error: model.dropout must be in [0, 1), got 1.5"),
    ("model.channels=[]", "error: model.channels must be a positive width, or a list of 1 to 4 positive widths"),
    ("optim.momentum=0", "error: optim.nesterov=true needs optim.momentum > 0"),
    ("scheduler.pct_start=0", "error: scheduler.pct_start must be in (0, 1)"),
])
def test_bad_input_is_one_line_before_any_data_loads_or_run_exists(overrides, tmp_path, monkeypatch, override,
                                                                     message):
    def no_data(*args, **kwargs):
        raise AssertionError("data.prepare ran before the config was checked")

    monkeypatch.setattr(data, "prepare", no_data)
    with pytest.raises(SystemExit) as exit_:
        run_in_process([*overrides, override], tmp_path / "run")
    assert str(exit_.value).startswith(message) and "\n" not in str(exit_.value)
    assert runs_in(tmp_path / "outputs") == []


def test_a_validation_split_as_big_as_the_training_set_is_one_line(overrides, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        run_in_process([*overrides, "data.val_size=320"], tmp_path / "run")
    assert str(exit_.value) == "error: data.val_size=320 must leave training images: the training split has 320"


def statuses(client) -> list[str]:
    runs = client.search_runs([client.get_experiment_by_name("mnist_sweep").experiment_id],
                              order_by=["attributes.start_time"])
    return [run.info.status for run in runs]


def test_a_disk_that_fills_up_during_a_run_is_one_line_and_the_runs_before_are_kept(overrides, tmp_path,
                                                                                   monkeypatch):
    run_in_process([*overrides, "mlflow.model_format=null"], tmp_path / "first")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mlflow, "log_artifact", no_space)  # the weights' copy into the artifact store
    with pytest.raises(SystemExit) as exit_:
        run_in_process([*overrides, "mlflow.model_format=null"], tmp_path / "second")
    assert str(exit_.value).startswith(f"error: the disk holding {tmp_path / 'outputs'} ran out of space")
    assert "\n" not in str(exit_.value)
    assert statuses(store(tmp_path)) == ["FINISHED", "FAILED"]


@pytest.mark.slow  # a disk of its own, filled up
def test_a_run_that_fills_its_disk_says_so_in_one_line_as_a_user_meets_it(overrides, small_disk):
    outputs = small_disk("8m") / "outputs"
    args = [*overrides, f"paths.outputs={outputs}"]
    run_in_process(args, outputs / "runs" / "first")  # a run that fits, before the disk fills
    left = 1300 * 1024  # enough to start a run (config.MIN_FREE_MIB), not to keep a wide model
    (outputs.parent / "filler").write_bytes(bytes(shutil.disk_usage(outputs).free - left))
    done = run_cli("mnist_sweep", *args, "model=deep", "model.channels=[64,256]")
    assert_one_line_error(done, f"the disk holding {outputs} ran out of space", "free space there")
    assert statuses(mlflow.MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")) == ["FINISHED", "FAILED"]


def test_a_trial_past_its_sweeps_deadline_stops_pruned_scored_as_it_stands_with_its_model(overrides, tmp_path):
    """The deadline stops a trial at its next step: its run ends KILLED with the `deadline` tag, its
    metrics and (as the study's leader) its model kept, and its trial PRUNED with that score."""
    storage = open_storage(f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}")
    study = optuna.create_study(study_name="mnist_sweep", storage=storage, direction="maximize")
    number = study.ask().number
    score = run_in_process([*overrides, "epochs=3", "optuna.study=mnist_sweep", f"optuna.trial={number}",
                            f"optuna.deadline={time.time():.3f}"], tmp_path / "run")
    run = only_run(store(tmp_path))
    assert run.info.status == "KILLED"
    # it stopped at its first step: 1 of 30 (3 epochs of 10 batches)
    assert run.data.tags[tracking.DEADLINE_TAG] == (
        f"trial {number} stopped by the sweep's deadline (hydra.sweeper.timeout) at 3% of its training")
    assert tracking.PRUNED_TAG not in run.data.tags
    (ended,) = optuna.load_study(study_name="mnist_sweep", storage=storage).get_trials()
    assert ended.state == optuna.trial.TrialState.PRUNED and DEADLINE_ATTR in ended.user_attrs
    assert score == ended.value == run.data.metrics["test_acc"]  # scored as it stood when it stopped
    assert [m.step for m in store(tmp_path).get_metric_history(run.info.run_id, "test_acc")] == [1]
    assert tracking.MODEL_URI_TAG in run.data.tags  # it leads the study: its model is exported


def test_a_trial_whose_job_slurm_requeues_stays_running_and_the_requeued_job_continues_its_run(overrides, tmp_path):
    """Slurm's signal in epoch 2 of 3 (as hydra/launcher=slurm handles it on the node, submitit's
    requeue replaced by one that only exits): the run ends KILLED and tagged, the trial stays
    RUNNING, the checkpoint of epoch 1 stays; the job run again continues the same run to the end,
    with the test accuracy of a run never stopped."""
    args = [*overrides, "epochs=3", "data.batch_size=4", "model.dropout=0.2"]
    whole = run_in_process([*args, f"paths.outputs={tmp_path / 'whole'}"], tmp_path / "whole-run")
    storage = open_storage(f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}")
    study = optuna.create_study(study_name="mnist_sweep", storage=storage, direction="maximize")
    number = study.ask().number
    job = [*args, "optuna.study=mnist_sweep", f"optuna.trial={number}"]

    def submitit_requeue(signum, frame):
        raise SystemExit(-1)  # submitit's handler ends so, once `scontrol requeue` is done

    def signal_in_epoch_2():
        while checkpoint_epoch(tmp_path / "outputs", trial_run()) != 1:
            time.sleep(0.002)
        os.kill(os.getpid(), launcher.USR_SIG)

    def trial_run():
        return optuna.load_study(study_name="mnist_sweep", storage=storage).trials[0].user_attrs.get(RUN_ID_ATTR)

    previous = signal.signal(launcher.USR_SIG, functools.partial(launcher.requeue_and_stop, submitit_requeue))
    try:
        signaller = threading.Thread(target=signal_in_epoch_2, daemon=True)
        signaller.start()
        with pytest.raises(Requeued):
            run_in_process(job, tmp_path / "run")
    finally:
        signal.signal(launcher.USR_SIG, previous)
    run = only_run(store(tmp_path))
    assert run.info.status == "KILLED" and "requeued" in run.data.tags[tracking.REQUEUED_TAG]
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING
    assert checkpoint_epoch(tmp_path / "outputs", run.info.run_id) == 1

    assert run_in_process(job, tmp_path / "run-again") == whole
    continued = only_run(store(tmp_path))
    assert continued.info.run_id == run.info.run_id and continued.info.status == "FINISHED"
    assert continued.data.tags[tracking.RESUMED_TAG] == "after epoch 1"
    (trial,) = optuna.load_study(study_name="mnist_sweep", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == whole
