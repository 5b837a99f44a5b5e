"""The CNN: its depth and widths as configured, and the preprocessing it carries itself."""

import pytest
import torch
from hydra.utils import instantiate

from mnist_sweep.config import validate
from mnist_sweep.model import DOWNSAMPLES, ConvNet
from conftest import compose_with, options


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("channels", [[8], [4, 8], [4, 8, 16], [2, 4, 8, 16]])
@pytest.mark.parametrize("downsample", DOWNSAMPLES)
def test_output_shape_for_every_model_and_depth(model, channels, downsample):
    cfg = compose_with(f"model={model}", f"model.channels={channels}", f"model.downsample={downsample}")
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


def test_a_strided_block_halves_its_map_with_its_first_conv_and_has_no_pool():
    """downsample=stride: 28 → 14 → 7 → 4 (a padded stride-2 conv rounds up), each block's later
    convs on the halved map; the classifier reads the last map, 4×4."""
    net = ConvNet([4, 8, 16], convs_per_block=2, downsample="stride").eval()
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1)] * 3
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    assert net.features(torch.rand(1, 1, 28, 28)).shape == (1, 16, 4, 4)
    assert net.head[-1].in_features == 16 * 4 * 4


def test_stride_first_strides_the_first_block_and_pools_the_others():
    """downsample=stride_first (the default model, fast): 28 → 14 by the first conv's stride, then
    14 → 7 → 3 by max-pools; the classifier reads the last map, 3×3."""
    net = ConvNet([4, 8, 16], convs_per_block=2, downsample="stride_first").eval()
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1)] + [(1, 1), (1, 1)] * 2
    kinds = [type(m).__name__ for m in net.features if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d))]
    assert kinds == ["Conv2d", "Conv2d", "Conv2d", "Conv2d", "MaxPool2d", "Conv2d", "Conv2d", "MaxPool2d"]
    assert net.features(torch.rand(1, 1, 28, 28)).shape == (1, 16, 3, 3)
    assert net.head[-1].in_features == 16 * 3 * 3


def test_the_default_model_is_shallow_with_a_strided_first_block():
    """model=fast: what `python -m mnist_sweep` trains; its parameters are shallow's, the searches' choices."""
    fast, shallow = (instantiate(compose_with(*model).model) for model in ((), ("model=shallow",)))
    assert compose_with().model.downsample == "stride_first" and fast.widths == shallow.widths == [16, 32, 64]
    assert [p.shape for p in fast.parameters()] == [p.shape for p in shallow.parameters()]
