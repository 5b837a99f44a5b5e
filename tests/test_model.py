"""The CNN: its depth and widths as configured, and the preprocessing it carries itself."""

import pytest
import torch
from hydra.utils import instantiate

from mnist_sweep.config import validate
from mnist_sweep.model import ConvNet
from conftest import compose_with, options


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("channels", [[8], [4, 8], [4, 8, 16], [2, 4, 8, 16]])
def test_output_shape_for_every_model_and_depth(model, channels):
    cfg = compose_with(f"model={model}", f"model.channels={channels}")
    net = instantiate(cfg.model).eval()
    assert net(torch.rand(5, 1, 28, 28) * 255).shape == (5, 10)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == len(channels) * cfg.model.convs_per_block


def test_one_width_means_three_blocks_each_twice_as_wide():
    """What the sweep searches (model.channels=32): one number, the widths doubling from it."""
    cfg = compose_with("model=deep", "model.channels=32")
    validate(cfg)
    convs = [m for m in instantiate(cfg.model).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]


def test_model_standardises_raw_pixels_itself():
    net = ConvNet([4], batch_norm=False).eval()
    pixels = torch.rand(2, 1, 28, 28) * 255
    shifted = net.features(((pixels - 0.1307 * 255) / (0.3081 * 255)))
    assert torch.allclose(net(pixels), net.head(shifted))
