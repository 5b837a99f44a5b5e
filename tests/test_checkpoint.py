"""Epoch checkpoints (mnist_sweep/checkpoint.py) and ``python -m mnist_sweep.resume``: what a file
holds and what damages it, then a run killed with kill -9 inside its second epoch and continued."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from conftest import checkpoint_epoch, runs_in
from mnist_sweep import checkpoint, resume, tracking
from mnist_sweep.__main__ import launch
from mnist_sweep.config import PROJECT_ROOT
from mnist_sweep.model import ConvNet


def training_state(widths=(4, 8)):
    torch.manual_seed(0)
    model = ConvNet(list(widths), dropout=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    model(torch.rand(2, 1, 28, 28)).sum().backward()  # momentum buffers and a schedule step to save
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_a_checkpoint_restores_weights_optimiser_schedule_and_random_state(tmp_path):
    model, optimizer, scheduler = training_state()
    file = tmp_path / "run.pt"
    assert checkpoint.save(file, [{"test_acc": 0.5}, {"test_acc": 0.7}], model, optimizer, scheduler)
    expected_draw = torch.rand(3)  # what dropout would draw next

    torch.manual_seed(123)
    fresh = training_state()
    resumed = checkpoint.restore(file, *fresh)
    assert resumed == checkpoint.Resumed(2, [{"test_acc": 0.5}, {"test_acc": 0.7}])
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh[0].state_dict().values()))
    assert fresh[2].state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"] == 1
    assert torch.equal(fresh[1].state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # the temporary file was renamed, not left


@pytest.mark.parametrize("damage", ["truncated", "garbage", "another model"])
def test_a_damaged_or_foreign_checkpoint_is_unusable_with_why(tmp_path, damage):
    file = tmp_path / "run.pt"
    checkpoint.save(file, [{}], *training_state())
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif damage == "garbage":
        file.write_bytes(b"not a checkpoint at all")
    with pytest.raises(checkpoint.Unusable, match="another model" if damage == "another model" else "cannot be read"):
        checkpoint.restore(file, *training_state((8, 16) if damage == "another model" else (4, 8)))


def test_a_write_that_fills_the_disk_keeps_the_checkpoint_before_and_training_goes_on(small_disk, caplog):
    disk = small_disk("256k")
    file = disk / "run.pt"
    state = training_state()
    assert checkpoint.save(file, [{"test_acc": 0.5}], *state)
    (disk / "filler").write_bytes(b"\0" * (256 * 1024 - 2 * file.stat().st_size + 4096))  # room for less than one
    assert not checkpoint.save(file, [{"test_acc": 0.5}, {"test_acc": 0.6}], *state)
    assert "checkpoint of epoch 2 not written" in caplog.text
    assert checkpoint.restore(file, *training_state()).epoch == 1  # the one before, whole
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "run.pt"]


def test_the_keeper_deletes_the_checkpoint_of_a_run_that_ended_and_keeps_one_cut_short(tmp_path):
    state = training_state()
    with checkpoint.Keeper(tmp_path, enabled=True) as ended:
        ended.attach("a")
        ended.save({"test_acc": 0.5}, *state)
        assert ended.file.exists()
    assert not ended.file.exists()
    with pytest.raises(RuntimeError), checkpoint.Keeper(tmp_path, enabled=True) as crashed:
        crashed.attach("b")
        crashed.save({"test_acc": 0.5}, *state)
        raise RuntimeError("killed")
    assert crashed.file.exists()
    off = checkpoint.Keeper(tmp_path, enabled=False)
    off.attach("c")
    off.save({"test_acc": 0.5}, *state)
    assert not off.file.exists() and off.history == [{"test_acc": 0.5}]


def run_args(overrides: list[str]) -> list[str]:
    # 80 steps an epoch: long enough to kill inside one, and 3 epochs of dropout and augmentation,
    # whose random draws the checkpoint must carry over exactly
    return [*overrides, "epochs=3", "data.batch_size=4", "model.dropout=0.2", "augment=shift", "optim.lr=0.05"]


def only_run_id(outputs) -> str | None:
    files = list((outputs / "checkpoints").glob("*.pt")) if (outputs / "checkpoints").exists() else []
    return files[0].stem if files else None


@pytest.mark.slow
def test_a_run_killed_inside_epoch_2_and_resumed_ends_exactly_as_the_run_never_killed(overrides, tmp_path, capsys):
    """kill -9 mid-run needs a process of its own; the uninterrupted run and the resume run in this one."""
    launch(run_args(overrides))  # never killed: what the resumed run must end with
    (whole,) = runs_in(tmp_path / "outputs")
    killed_outputs = tmp_path / "killed"
    args = [o if not o.startswith("paths.outputs=") else f"paths.outputs={killed_outputs}" for o in overrides]
    proc = subprocess.Popen([sys.executable, "-m", "mnist_sweep", *run_args(args)], cwd=PROJECT_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while checkpoint_epoch(killed_outputs, only_run_id(killed_outputs)) != 1:  # epoch 2 is training
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    (cut,) = runs_in(killed_outputs)
    assert checkpoint_epoch(killed_outputs, cut.info.run_id) == 1  # killed inside epoch 2, before its checkpoint
    assert cut.info.status == "RUNNING" and len(mlflow.MlflowClient(
        f"sqlite:///{killed_outputs / 'mlflow.db'}").get_metric_history(cut.info.run_id, "test_acc")) == 1

    assert resume.main([f"run_id={cut.info.run_id}", f"paths.outputs={killed_outputs}"]) == 0
    client = mlflow.MlflowClient(f"sqlite:///{killed_outputs / 'mlflow.db'}")
    (continued,) = runs_in(killed_outputs)  # the same run, taken up again
    assert continued.info.run_id == cut.info.run_id and continued.info.status == "FINISHED"
    assert continued.data.tags[tracking.RESUMED_TAG] == "after epoch 1"
    assert [m.step for m in client.get_metric_history(cut.info.run_id, "test_acc")] == [1, 2, 3]
    assert continued.data.metrics["test_acc"] == whole.data.metrics["test_acc"]
    assert continued.data.metrics["test_loss"] == whole.data.metrics["test_loss"]  # exactly, not nearly
    assert not list((killed_outputs / "checkpoints").iterdir())  # the run ended: its checkpoint went
    assert "resumed after epoch 1" in capsys.readouterr().err

    with pytest.raises(resume.NotResumable, match=f"run {cut.info.run_id} .* FINISHED: there is nothing left"):
        resume.main([f"run_id={cut.info.run_id}", f"paths.outputs={killed_outputs}"])


def test_a_run_without_a_checkpoint_or_of_a_study_or_still_training_is_not_resumable(overrides, tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("resume")
    folder = tmp_path / "checkpoints"

    def run_with(tags):
        return client.get_run(client.create_run(experiment, tags=tags).info.run_id)

    gone = run_with({tracking.PROCESS_TAG: "another-host:1"})
    with pytest.raises(resume.NotResumable, match="has no checkpoint in .* mnist_sweep.reproduce trains it again"):
        resume.check_resumable(gone, str(folder))
    trial = run_with({tracking.TRIAL_TAG: "3", tracking.STUDY_TAG: "s"})
    with pytest.raises(resume.NotResumable, match="is trial 3 of study s: its sweep continues it"):
        resume.check_resumable(trial, str(folder))
    live = run_with({tracking.PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}"})
    checkpoint.save(checkpoint.path(folder, live.info.run_id), [{}], *training_state())
    with pytest.raises(resume.NotResumable, match=f"is still training, in process .*:{os.getpid()}"):
        resume.check_resumable(live, str(folder))

