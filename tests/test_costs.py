"""What a model costs: its parameters, its CPU latency (and that timing's own spread), its weights file."""

import time

import torch
from torch import nn

from mnist_sweep import costs
from mnist_sweep.model import ConvNet


class Sleeper(nn.Module):
    """A model whose pass takes at least ``seconds``, and that notes the threads it ran on."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.threads, self.calls = seconds, set(), 0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.threads.add(torch.get_num_threads())
        time.sleep(self.seconds)
        return image


class Alternating(nn.Module):
    """A model whose passes take 2 ms and 52 ms in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.002 if self.calls % 2 else 0.052)
        return image


def test_the_parameter_count_is_every_weight_and_bias():
    assert costs.param_count(nn.Linear(3, 2)) == 3 * 2 + 2
    assert costs.param_count(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))) == 4 * 9 + 4 + 4 + 4


def test_latency_is_the_median_pass_after_a_warm_up_on_one_thread_then_the_threads_are_back():
    before = torch.get_num_threads()
    model = Sleeper(0.002)
    latency = costs.latency_ms(model, torch.zeros(1, 1, 28, 28), passes=10, warmup=3, budget_s=10)
    assert model.calls == 13 and latency.passes == 10
    assert latency.median_ms >= 2.0  # a pass cannot take less than its sleep
    assert model.threads == {1} and torch.get_num_threads() == before


def test_the_spread_is_the_interquartile_range_of_the_passes():
    """Half the passes take 2 ms, half 52 ms: the quartiles fall in each half, ~50 ms apart (a
    scheduler's delay only lengthens a pass, and would have to stretch a 2 ms one past 22 ms)."""
    latency = costs.latency_ms(Alternating(), torch.zeros(1, 1, 28, 28), passes=10, warmup=2, budget_s=10)
    assert latency.passes == 10 and 30 <= latency.iqr_ms and latency.median_ms >= 2.0


def test_a_slow_model_stops_at_the_budget_but_never_below_the_minimum_passes():
    model = Sleeper(0.01)
    latency = costs.latency_ms(model, torch.zeros(1, 1, 28, 28), passes=50, warmup=1, budget_s=0.001)
    assert latency.passes == costs.MIN_PASSES  # not 50 passes of 10 ms: a trial's overhead stays small


def test_measure_gives_every_cost_of_the_served_copy_and_leaves_the_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    model = ConvNet([4, 8]).train()
    measured = costs.measure(model, torch.full((1, 1, 28, 28), 100.0))
    assert set(measured) == {"param_count", "latency_ms", "latency_ms_iqr", "model_bytes"}
    assert model.training  # the run's model: still training mode
    assert measured["param_count"] == costs.param_count(model)
    # the size of the weights file a run logs
    assert measured["model_bytes"] == costs.model_bytes(costs.save_weights(model, tmp_path))
    assert measured["model_bytes"] > 4 * measured["param_count"]  # float32 weights, plus BN's statistics
    assert measured["latency_ms"] > 0
