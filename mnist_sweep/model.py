"""The CNN: depth, widths, batch norm and dropout all come from config."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IMAGE_SIDE = 28
MAX_BLOCKS = 4  # each block halves the 28×28 map: a fifth would pool a 1×1 map away
DOWNSAMPLES = ("pool", "stride", "stride_first")  # how the blocks halve their maps (model.downsample)
BLOCKS = 3  # what a single width means: three blocks, each twice as wide as the one before
# MNIST training-set pixel statistics in raw 0-255 units: the model standardises its own input,
# so a saved or served model takes raw pixels and no caller can forget the preprocessing.
PIXEL_MEAN, PIXEL_STD = 0.1307 * 255, 0.3081 * 255


class ConvNet(nn.Module):
    """``len(channels)`` blocks of (conv → [BN] → ReLU) × convs_per_block → 2×2 max-pool,
    then dropout → linear over the flattened maps. With ``downsample="stride"`` a block's first
    conv has stride 2 and there is no pool: each conv then runs on the halved map, a quarter of
    the work (the first block's full-size maps cost most of a CPU step), for a little accuracy.
    ``downsample="stride_first"`` strides the first block only and pools the rest: most of the
    saving, none of the accuracy lost in one epoch (docs/benchmark.md).

    ``channels``: each block's width, or one width ``w`` for the blocks ``[w, 2w, 4w]`` (what the
    sweep searches: a single number is one Optuna parameter, a list is not).

    Input: (N, 1, 28, 28) float raw pixels 0-255. Output: (N, 10) class scores (logits).
    The arguments are trusted: ``config.RULES`` checks them before a run builds the model.
    """

    def __init__(
        self,
        channels: int | Sequence[int],
        convs_per_block: int = 1,
        kernel_size: int = 3,
        batch_norm: bool = True,
        dropout: float = 0.0,
        downsample: str = "pool",
        num_classes: int = 10,
    ):
        super().__init__()
        if isinstance(channels, int):
            channels = [channels * 2**block for block in range(BLOCKS)]
        self.widths = list(channels)  # each block's, as built: what a logged model's name says
        layers: list[nn.Module] = []
        width, side = 1, IMAGE_SIDE
        for block, out in enumerate(channels):
            strided = downsample == "stride" or (downsample == "stride_first" and block == 0)
            for conv in range(convs_per_block):
                stride = 2 if strided and conv == 0 else 1
                # BN already has a bias term; the conv's would be redundant
                layers += [nn.Conv2d(width, out, kernel_size, stride=stride, padding=kernel_size // 2,
                                     bias=not batch_norm)]
                layers += [nn.BatchNorm2d(out)] if batch_norm else []
                layers += [nn.ReLU(inplace=True)]
                width = out
            layers += [] if strided else [nn.MaxPool2d(2)]
            side = (side + 1) // 2 if strided else side // 2  # a padded stride-2 conv rounds up, a pool down
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(width * side * side, num_classes)
        )
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - self.mean) / self.std  # (N, 1, 28, 28), zero mean, unit variance
        return self.head(self.features(x))  # (N, 10)
