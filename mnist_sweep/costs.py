"""What a trained model costs to keep and to run: its parameters, its CPU latency per image, and the
size of its weights file. Every run logs them (``tracking.log_costs``) beside its accuracy, so a
study's candidates compare on both."""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

WEIGHTS_FILE = "state_dict.pt"  # the weights every run logs (weights/state_dict.pt): what model_bytes measures
WARMUP = 5  # untimed passes first: the first ones allocate buffers and pick kernels
PASSES = 50  # timed passes at most...
MIN_PASSES = 8  # ...and at least, whatever the budget: a median and quartiles need a few
BUDGET_S = 0.1  # timed passes stop once they took this long: a wide model must not cost its trial seconds


class Latency(NamedTuple):
    median_ms: float  # one image, batch 1
    iqr_ms: float  # the spread of the passes: the measurement's own noise
    passes: int


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_weights(model: nn.Module, directory: Path) -> Path:
    """The model's state_dict as a run logs it: ``directory/state_dict.pt``."""
    path = directory / WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path


def model_bytes(path: Path) -> int:
    return path.stat().st_size


def latency_ms(model: nn.Module, image: torch.Tensor, passes: int = PASSES, warmup: int = WARMUP,
               budget_s: float = BUDGET_S) -> Latency:
    """Milliseconds for ``model`` (in eval mode, on the CPU) to score one ``image`` (1, 1, 28, 28):
    the median of up to ``passes`` timed passes after ``warmup`` untimed ones, and their interquartile
    range. On one thread, whatever the run uses: trials of 1-thread and 2-thread workers compare, and
    a measurement leaves the other cores to the sweep's other workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(image)
            seconds: list[float] = []
            start = time.perf_counter()
            while len(seconds) < passes and (len(seconds) < MIN_PASSES or time.perf_counter() - start < budget_s):
                before = time.perf_counter()
                model(image)
                seconds.append(time.perf_counter() - before)
    finally:
        torch.set_num_threads(threads)
    q1, _, q3 = statistics.quantiles(seconds, n=4)
    return Latency(1000 * statistics.median(seconds), 1000 * (q3 - q1), len(seconds))


def measure(model: nn.Module, image: torch.Tensor) -> dict[str, float]:
    """``param_count``, ``latency_ms`` (with ``latency_ms_iqr``) and ``model_bytes`` of a trained
    model, as it is served: a CPU copy in eval mode (the run's own model stays as it is).
    ``image``: one raw test image, (1, 1, 28, 28)."""
    served = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    latency = latency_ms(served, image.cpu())
    with tempfile.TemporaryDirectory() as tmp:
        size = model_bytes(save_weights(served, Path(tmp)))
    # latency to 0.1 µs: far below its noise, and a number the Models tab shows whole
    return {"param_count": param_count(served), "latency_ms": round(latency.median_ms, 4),
            "latency_ms_iqr": round(latency.iqr_ms, 4), "model_bytes": size}
