"""A run's epoch checkpoint: everything that continues its training exactly where an epoch ended.

At each epoch's end a run saves its weights, its optimiser's and learning-rate schedule's state, the
random state its dropout draws from, the epochs done and each one's metrics, to one file named for
its MLflow run (:func:`path`). The batch order and the augmentation need no saving: each epoch draws
them from ``seed + epoch`` (train.train_epoch). A file is written whole or not at all (a temporary
file, then a rename), and only the latest epoch's is kept, so a kill at any moment leaves the last
good one. Continued on the same device type and threads, a run ends exactly as it would have unkilled.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT = 1  # what a checkpoint holds; a file of another format is not used


class Unusable(ValueError):
    """A checkpoint that cannot continue this run (truncated, corrupt, another model's); says why."""


class Resumed(NamedTuple):
    epoch: int  # epochs done: training continues with the next
    history: list[dict[str, float]]  # each done epoch's metrics, in order


def path(folder: str | Path, run_id: str) -> Path:
    """Where the run ``run_id`` keeps its checkpoint: one file a run, in ``checkpoint.dir``."""
    return Path(folder) / f"{run_id}.pt"


def save(file: Path, history: list[dict[str, float]], model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler) -> bool:
    """Write the state after ``len(history)`` epochs to ``file``, replacing the one before; returns
    whether it was written. A write that fails (a full disk) leaves the previous checkpoint whole and
    is one warning: training goes on, and a resume starts from the epoch that was saved."""
    state = {
        "format": FORMAT,
        "epoch": len(history),
        "history": history,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []},
    }
    partial = file.with_name(f".{file.name}.{os.getpid()}.partial")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, partial)
        os.replace(partial, file)  # atomic: a reader sees the old file or the new one, never half
    except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as a RuntimeError
        partial.unlink(missing_ok=True)
        log.warning("checkpoint of epoch %d not written (%s): the one before stays; training goes on",
                    len(history), err)
        return False
    return True


def restore(file: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> Resumed:
    """Load ``file`` into the freshly built ``model``, ``optimizer`` and ``scheduler`` and the random
    state; returns where training stands. Raises FileNotFoundError without one, and :class:`Unusable`
    for a file that cannot continue this run (the objects may then be half loaded: build them again)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds for a damaged file
        raise Unusable(f"{file} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise Unusable(f"{file} is not a checkpoint of this version (format {FORMAT})")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return Resumed(int(state["epoch"]), list(state["history"]))
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise Unusable(f"{file} holds another model or training state ({str(err).splitlines()[0][:200]})") from None


class Keeper:
    """The checkpoints of one run: :meth:`save` after each epoch while it trains (when ``enabled``),
    and around the run, the file is deleted once the run has ended (finished, pruned, stopped at its
    deadline, diverged: nothing is left to continue) and kept when an error, a kill or a requeue cuts
    it short. ``attach`` names the run, once its MLflow run exists."""

    def __init__(self, folder: str | Path, enabled: bool):
        self.folder, self.enabled = Path(folder), enabled
        self.file: Path | None = None
        self.history: list[dict[str, float]] = []

    def attach(self, run_id: str) -> None:
        self.file = path(self.folder, run_id)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler) -> list[dict[str, float]]:
        """:func:`restore` of the attached run's file; returns the done epochs' metrics."""
        self.history = restore(self.file, model, optimizer, scheduler).history
        return self.history

    def save(self, metrics: dict[str, float], model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.history.append(metrics)
        if self.enabled and self.file is not None:
            save(self.file, self.history, model, optimizer, scheduler)

    def __enter__(self) -> Keeper:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None and self.file is not None:
            self.file.unlink(missing_ok=True)
