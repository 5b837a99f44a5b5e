"""MNIST in memory: each split as one tensor on the device, and its batches (no DataLoader).

``data.prepare`` makes the tensor file these load from.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, 1, 28, 28) float32 raw pixel values 0-255; the model normalises
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def load(tensor_file: Path, device: torch.device) -> tuple[Split, Split]:
    """Train and test, each as one float tensor of raw pixels plus labels, on ``device``.

    The trials of a one-process sweep share one copy instead of each loading its own: training
    only reads these tensors, and a rewritten file (another inode, size or modification time) loads afresh.
    """
    stat = Path(tensor_file).stat()
    return _load(Path(tensor_file), device, (stat.st_ino, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=1)
def _load(tensor_file: Path, device: torch.device, version: tuple[int, int, int]) -> tuple[Split, Split]:
    # version: the file's inode, size and modification time, there only as part of the cache's key
    t = torch.load(tensor_file, weights_only=True)  # plain tensors only: no pickled code runs

    def split(name: str) -> Split:
        return Split(t[f"{name}_images"].unsqueeze(1).to(device, torch.float32), t[f"{name}_labels"].to(device))

    return split("train"), split("test")


def batches(split: Split, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every example once, in an order drawn from ``seed`` (pass seed + epoch for a new order each epoch).

    Index the on-device tensor instead of a DataLoader: no per-sample Python work at all.
    """
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    order = order.to(split.labels.device)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield split.images[idx], split.labels[idx]


def holdout(split: Split, size: int, seed: int) -> tuple[Split, Split | None]:
    """``split`` less ``size`` examples drawn with ``seed``, and those examples (None when ``size`` is 0).

    The draw depends on ``seed`` and the split's length only, so every trial of a study, whatever
    its own seed, holds out the same images and their scores compare.
    """
    if size == 0:
        return split, None
    if not 0 < size < len(split):
        raise ValueError(f"data.val_size={size} must leave training images: the training split has {len(split)}")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).to(split.labels.device)
    keep, held = order[size:].sort().values, order[:size].sort().values  # sorted: a plain gather, in file order
    return Split(split.images[keep], split.labels[keep]), Split(split.images[held], split.labels[held])
