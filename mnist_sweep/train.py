"""The training loop: explicit arguments in, metrics out. No config, no tracking."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mnist_sweep.tensors import Split, batches

log = logging.getLogger(__name__)
# (images, generator) -> images of the same shape, e.g. augment.RandomAffine
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class DeviceError(RuntimeError):
    """The configured device does not exist on this machine."""


class Diverged(RuntimeError):
    """The training loss became NaN or infinite: stop at once rather than train on garbage."""


def pick_device(name: str) -> torch.device:
    """``auto`` → cuda, then mps, then cpu; a named device must exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # e.g. cuda:x
        raise DeviceError(f"device={name} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise DeviceError(f"device={name} is not available on this machine; use device=auto or device=cpu")
    return device


def set_threads(threads: int, parallel_workers: int) -> int:
    """Torch CPU threads: ``threads``, or with 0 the cores this process may use (a Slurm job's
    allocation, not the whole node) split among parallel sweep workers."""
    n = threads or max(1, len(os.sched_getaffinity(0)) // parallel_workers)
    torch.set_num_threads(n)
    return n


def memory_format(device: torch.device) -> torch.memory_format:
    # channels_last trains this CNN markedly faster on CPU (docs/benchmark.md)
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_set: Split,
    batch_size: int,
    seed: int,
    fmt: torch.memory_format = torch.contiguous_format,
    progress: bool = False,
    checks: int = 0,
    on_check: Callable[[int], None] = lambda check: None,
    augment: Augment = lambda images, generator: images,
    on_step: Callable[[float], None] = lambda done: None,
) -> float:
    """One pass over ``train_set`` in an order drawn from ``seed``, each batch through ``augment``
    (its randomness drawn from ``seed`` too); returns the mean training loss.

    ``on_check(j)`` runs after the batch that ends the j-th of ``checks + 1`` equal parts of the
    epoch, for j = 1..checks (the epoch's end is the caller's). ``on_step(done)`` runs after every
    batch with the fraction of the epoch done: a cheap poll (a deadline) that stops training by raising.
    """
    model.train()
    total = torch.zeros((), device=train_set.labels.device)
    steps = math.ceil(len(train_set) / batch_size)
    check_after = {steps * j // (checks + 1): j for j in range(1, checks + 1)}
    generator = torch.Generator(train_set.labels.device).manual_seed(seed)
    for step, (images, labels) in enumerate(tqdm(batches(train_set, batch_size, seed), total=steps,
                                                 disable=not progress, leave=False, unit="batch"), start=1):
        loss = F.cross_entropy(model(augment(images, generator).contiguous(memory_format=fmt)), labels)
        if not torch.isfinite(loss):
            raise Diverged(f"training loss became {loss.item()}; lower optim.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.detach() * len(labels)
        if step in check_after:
            on_check(check_after[step])
            model.train()
        on_step(step / steps)
    return total.item() / len(train_set)


@torch.inference_mode()
def evaluate(
    model: nn.Module, split: Split, batch_size: int, fmt: torch.memory_format = torch.contiguous_format
) -> dict[str, float]:
    """Mean cross-entropy (``loss``) and accuracy (``acc``, a fraction in [0, 1]) of ``model`` on ``split``."""
    model.eval()
    loss = torch.zeros((), device=split.labels.device)
    correct = torch.zeros((), dtype=torch.long, device=split.labels.device)
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].contiguous(memory_format=fmt)
        labels = split.labels[start : start + batch_size]
        logits = model(images)
        loss += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    return {"loss": loss.item() / len(split), "acc": correct.item() / len(split)}


def scores(model: nn.Module, test_set: Split, val_set: Split | None, batch_size: int) -> dict[str, float]:
    """``test_loss``, ``test_acc`` and, with a validation split, ``val_loss`` and ``val_acc``."""
    fmt = memory_format(test_set.labels.device)
    scored = {"test": test_set} | ({"val": val_set} if val_set is not None else {})
    return {f"{name}_{key}": value for name, split in scored.items()
            for key, value in evaluate(model, split, batch_size, fmt).items()}


EpochCallback = Callable[[int, dict[str, float]], None]
CheckCallback = Callable[[int, float], None]


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_set: Split,
    test_set: Split,
    epochs: int,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    on_epoch: EpochCallback = lambda epoch, metrics: None,
    checks_per_epoch: int = 0,
    check_set: Split | None = None,
    on_check: CheckCallback = lambda step, accuracy: None,
    val_set: Split | None = None,
    augment: Augment = lambda images, generator: images,
    on_step: Callable[[float], None] = lambda done: None,
    done: list[dict[str, float]] | None = None,
) -> dict[str, float]:
    """Train for ``epochs``, each batch through ``augment``, evaluating on ``test_set`` (``test_acc``,
    ``test_loss``) and ``val_set`` if any (``val_acc``, ``val_loss``) after each epoch; returns
    the last epoch's metrics.

    ``checks_per_epoch`` times inside each epoch (evenly spaced), the accuracy on ``check_set`` goes
    to ``on_check(step, accuracy)``; ``step`` counts checks and epoch ends together, so epoch e
    ends at step ``e * (checks_per_epoch + 1)``. ``on_step(done)`` runs after every batch with the
    epochs done so far (2.5: half of the third). A callback stops training by raising.
    Raises :class:`Diverged` as soon as the loss is not finite.

    ``done``: the metrics of epochs already trained (a run continued from its checkpoint, whose state
    the model, optimizer and scheduler already hold): training goes on with the next epoch.
    """
    device = train_set.labels.device
    fmt = memory_format(device)
    model.to(memory_format=fmt)
    progress = sys.stdout.isatty()
    metrics: dict[str, float] = done[-1] if done else {}
    for epoch in range(len(done or ()) + 1, epochs + 1):
        start = time.perf_counter()
        first_step = (epoch - 1) * (checks_per_epoch + 1)

        def check(j: int) -> None:
            on_check(first_step + j, evaluate(model, check_set, eval_batch_size, fmt)["acc"])

        train_loss = train_epoch(model, optimizer, scheduler, train_set, batch_size, seed + epoch, fmt, progress,
                                 checks_per_epoch if check_set is not None else 0, check, augment,
                                 lambda done: on_step(epoch - 1 + done))
        if device.type == "cuda":
            torch.cuda.synchronize()  # so the time below is the epoch's, not the launch queue's
        seconds = time.perf_counter() - start
        metrics = {
            "train_loss": train_loss,
            **scores(model, test_set, val_set, eval_batch_size),
            "epoch_seconds": seconds,
            "images_per_second": len(train_set) / seconds,
            "eval_seconds": time.perf_counter() - start - seconds,  # what a run spends beyond these two is overhead
        }
        log.info(
            "epoch %d/%d  train_loss %.4f  test_loss %.4f  test_acc %.4f%s  %.1fs  %.0f img/s",
            epoch, epochs, metrics["train_loss"], metrics["test_loss"], metrics["test_acc"],
            f"  val_acc {metrics['val_acc']:.4f}" if val_set is not None else "", seconds, metrics["images_per_second"],
        )
        on_epoch(epoch, metrics)
    return metrics
