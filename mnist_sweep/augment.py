"""Training-batch augmentation: one random affine warp per image, as tensor operations on the
batch's own device (no per-sample Python, no DataLoader workers)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mnist_sweep.model import IMAGE_SIDE


class RandomAffine:
    """Shift each image by up to ``shift`` pixels each way, rotate it by up to ``degrees`` and scale
    it by up to ``1 ± scale``, each drawn uniformly per image; all zero returns the batch untouched.

    A shift alone moves whole pixels (nearest sampling: the digit's pixel values are kept exactly);
    rotation or scale resample bilinearly. Pixels moved in from outside the image are 0, MNIST's
    background.
    """

    def __init__(self, shift: int = 0, degrees: float = 0.0, scale: float = 0.0):
        self.shift, self.degrees, self.scale = shift, degrees, scale

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``images``: (N, 1, 28, 28) float raw pixels; ``generator`` lives on their device."""
        if not (self.shift or self.degrees or self.scale):
            return images
        n, device = len(images), images.device
        uniform = torch.rand(n, 2, generator=generator, device=device) * 2 - 1  # in [-1, 1)
        angle = uniform[:, 0] * math.radians(self.degrees)
        zoom = 1 + uniform[:, 1] * self.scale
        pixels = torch.randint(-self.shift, self.shift + 1, (n, 2), generator=generator, device=device)
        # affine_grid maps each output pixel to where it samples the input, in [-1, 1] coordinates
        # (one pixel is 2/28 wide): the inverse of the warp, hence 1/zoom
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([
            torch.stack([cos, -sin, pixels[:, 0] * 2 / IMAGE_SIDE], 1),
            torch.stack([sin, cos, pixels[:, 1] * 2 / IMAGE_SIDE], 1),
        ], 1).to(images.dtype)  # (N, 2, 3)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        mode = "bilinear" if self.degrees or self.scale else "nearest"
        return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)
