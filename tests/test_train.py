"""The training loop on the tiny digits, in-process: what fit reports and when, a seeded run is
repeatable, divergence stops it at once, and the device and threads it runs on."""

import pytest
import torch

from mnist_sweep import data, tensors, train
from mnist_sweep.model import ConvNet
from mnist_sweep.run import build
from mnist_sweep.train import DeviceError, pick_device
from conftest import compose_with


@pytest.fixture(scope="module")
def digits(tiny_mnist) -> tuple[tensors.Split, tensors.Split]:
    root, md5 = tiny_mnist
    return tensors.load(data.prepare(root, md5, log=lambda line: None), torch.device("cpu"))


def fit(train_set, test_set, lr: float = 0.01, seed: int = 0, **kwargs) -> tuple[ConvNet, dict[str, float]]:
    torch.manual_seed(seed)
    model = ConvNet([4, 8])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = {"epochs": 2, "batch_size": 32, "eval_batch_size": 64, "seed": seed} | kwargs
    return model, train.fit(model, optimizer, scheduler, train_set, test_set, **args)


@pytest.mark.parametrize("model", [(), ("model=shallow",)])
def test_the_default_model_reaches_98_percent_on_the_tiny_digits_as_shallow_does(model, digits):
    """The default config's model (fast) and the one it replaced, at their real widths and with the
    run's optimizer and schedule, as a run builds them: 2 epochs of the tiny digits, ~0.2 s each."""
    train_set, test_set = digits
    cfg = compose_with(*model, "epochs=2", "data.batch_size=32", "device=cpu")
    built = build(cfg, torch.device("cpu"), len(train_set))
    metrics = train.fit(*built[:3], train_set, test_set, epochs=2, batch_size=32, eval_batch_size=64, seed=0)
    assert metrics["test_acc"] >= 0.98


def test_fit_reports_every_epoch_and_each_check_at_its_step(digits):
    train_set, test_set = digits
    epochs, checks = [], []
    _, metrics = fit(train_set, test_set, epochs=2, on_epoch=lambda e, m: epochs.append((e, m)),
                     checks_per_epoch=3, check_set=test_set, on_check=lambda step, acc: checks.append(step))
    assert [e for e, _ in epochs] == [1, 2] and epochs[-1][1] == metrics
    assert set(metrics) == {"train_loss", "test_loss", "test_acc", "epoch_seconds", "images_per_second",
                            "eval_seconds"}
    assert checks == [1, 2, 3, 5, 6, 7]  # epoch e ends at step 4e: the epoch ends are on_epoch's
    assert metrics["test_acc"] > 0.5  # the tiny digits are learnable: a broken loop sits near 0.1


def test_a_validation_split_is_scored_beside_the_test_set(digits):
    train_set, test_set = digits
    kept, held = tensors.holdout(train_set, 64, 0)
    _, metrics = fit(kept, test_set, val_set=held)
    assert {"val_acc", "val_loss", "test_acc", "test_loss"} <= set(metrics)
    assert metrics["val_acc"] == train.evaluate(fit(kept, test_set)[0], held, 64)["acc"]  # same seed, same model


def test_the_same_seed_trains_the_same_weights_and_another_seed_does_not(digits):
    first, second, other = (fit(*digits, seed=seed, epochs=1)[0] for seed in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.head[-1].weight, other.head[-1].weight)


def test_a_loss_that_is_not_finite_stops_training_at_once(digits):
    calls = []
    with pytest.raises(train.Diverged, match="lower optim.lr"):
        fit(*digits, augment=lambda images, generator: images * float("nan"), on_epoch=lambda e, m: calls.append(e))
    assert calls == []  # it stopped inside the first epoch, before any evaluation


def test_a_callback_that_raises_stops_training(digits):
    def stop(epoch, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(*digits, epochs=3, on_epoch=stop)


def test_evaluate_counts_what_the_model_gets_right(digits):
    _, test_set = digits
    model = ConvNet([4])
    predicted = model.eval()(test_set.images).argmax(1)
    expected = (predicted == test_set.labels).float().mean().item()
    assert train.evaluate(model, test_set, batch_size=7)["acc"] == pytest.approx(expected)


@pytest.mark.parametrize("name", ["cuda:x", "cuda:7", "mps"])
def test_a_device_this_machine_lacks_is_a_clear_error(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=f"device={name} is not"):
        pick_device(name)
    assert pick_device("auto") == torch.device("cpu")


def test_threads_zero_splits_the_cores_among_parallel_workers(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: set(range(8)))  # e.g. a Slurm allocation
    try:
        assert train.set_threads(0, parallel_workers=1) == 8
        assert train.set_threads(0, parallel_workers=3) == 2 and torch.get_num_threads() == 2
        assert train.set_threads(5, parallel_workers=3) == 5
    finally:
        torch.set_num_threads(before)


def test_each_step_reports_the_epochs_done_and_a_raise_stops_training(digits):
    train_set, test_set = digits
    steps = -(-len(train_set) // 80)  # batches an epoch
    seen = []

    def on_step(done: float) -> None:
        seen.append(done)
        if done >= 1.5:
            raise TimeoutError  # what a deadline does

    with pytest.raises(TimeoutError):
        fit(train_set, test_set, epochs=3, batch_size=80, on_step=on_step)
    assert seen == [pytest.approx(n / steps) for n in range(1, len(seen) + 1)]  # after every batch
    assert 1.5 <= seen[-1] < 1.5 + 1 / steps  # it stopped at the first step past the mark, mid-second epoch
