"""``python -m mnist_sweep.predict model_uri=URI images=PATH [images=PATH ...] [overrides]``: the
digit in each image, one ``file<TAB>digit<TAB>probability`` line per image on stdout.

PATH: an image file, a directory (every file directly in it, hidden ones skipped) or a list
``images=[a.png,b.jpg]``. URI and overrides are as for ``mnist_sweep.evaluate``. An image that
cannot be read gets a one-line ``error:`` on stderr and the others are still predicted; the exit
status is then 1.

Photos and scans are not MNIST: :func:`to_mnist` makes each one the way MNIST's digits were made.
"""

from __future__ import annotations

import sys

from mnist_sweep import cli

cli.defer_collection(__name__)

from pathlib import Path
from typing import BinaryIO

import mlflow
import numpy as np
import torch
from PIL import Image, ImageOps

from mnist_sweep import registry, tracking
from mnist_sweep.config import ConfigError, compose, split_args

SIDE = 28  # MNIST's image side
BOX = 20  # MNIST scaled each digit to fit a 20×20 box, keeping its aspect ratio
# Where MNIST puts a digit's centre of mass, in pixel indices: measured on the training set
# (mean 13.99 down, 14.00 across; each digit shifted by whole pixels, so within ±0.5 of it).
CENTRE = 14.0
MIN_CONTRAST = 32  # grey levels between paper and the darkest stroke below which nothing is written
INK_LEVEL = 64  # after stretching the strongest stroke to 255: fainter is paper texture or shadow


def to_mnist(image: Image.Image) -> np.ndarray:
    """A photo or scan of one handwritten digit, any size → (28, 28) float32 pixels 0-255, as MNIST:
    grayscale, light ink on a dark ground, cropped to the ink, scaled into 20×20 keeping the aspect
    ratio, placed so its centre of mass is at (14, 14). Raises ValueError for a blank image."""
    image = ImageOps.exif_transpose(image)  # phone photos keep their rotation as metadata
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # a transparent pixel's colour is arbitrary (often black): lay the image on white paper
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    paper = float(np.median(border))  # a digit rarely reaches every edge; the paper does
    ink = np.clip(paper - gray if paper > 127 else gray - paper, 0, None)  # dark ink on light paper, or the reverse
    if ink.max() < MIN_CONTRAST:
        raise ValueError("no digit found: the image is blank")
    ink *= 255 / ink.max()  # the strongest stroke becomes full ink, as in MNIST
    ink[ink < INK_LEVEL] = 0
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    height, width = ink.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Shrinking, BOX averages the pixels each output pixel covers: MNIST's anti-aliased grey edges.
    # Enlarging a tiny drawing, bilinear avoids BOX's (nearest-neighbour) blocks.
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    digit = np.asarray(Image.fromarray(ink).resize(size, resample), dtype=np.float32)

    height, width = digit.shape
    down, across = np.indices(digit.shape)
    mass = digit.sum()
    top = round(CENTRE - (down * digit).sum() / mass)
    left = round(CENTRE - (across * digit).sum() / mass)
    top, left = min(max(top, 0), SIDE - height), min(max(left, 0), SIDE - width)  # keep all the ink in frame
    pixels = np.zeros((SIDE, SIDE), dtype=np.float32)
    pixels[top : top + height, left : left + width] = digit
    return pixels


def image_paths(args: list[str]) -> tuple[list[Path], list[str]]:
    """``images=`` values → the files to read, and an error line for each path that gives none.

    A value may be a file, a directory (its files, not recursing, hidden ones skipped) or a list
    ``[a.png,b.png]``.
    """
    paths, errors = [], []
    for arg in args:
        names = arg[1:-1].split(",") if arg.startswith("[") and arg.endswith("]") else [arg]
        for path in (Path(name.strip()) for name in names if name.strip()):
            if path.is_dir():
                files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
                paths += files
                errors += [] if files else [f"{path}: the directory holds no files"]
            elif path.exists():
                paths.append(path)
            else:
                errors.append(f"{path}: no such file or directory")
    return paths, errors


def read(source: Path | BinaryIO, name: str | None = None) -> np.ndarray:
    """The image at ``source`` (a path, or an open binary file: the digit pad's drawing) as MNIST
    pixels; raises ValueError naming it (``name``, else the path) if it cannot."""
    name = source if name is None else name
    try:
        with Image.open(source) as image:
            return to_mnist(image)
    except Image.UnidentifiedImageError:
        raise ValueError(f"{name}: not an image (or a format PIL cannot read)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{name}: {getattr(err, 'strerror', None) or err}") from None


@torch.inference_mode()
def classify(model: torch.nn.Module, pixels: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) raw pixels → each image's most probable digit and its softmax probability."""
    images = torch.from_numpy(pixels).unsqueeze(1)  # (n, 1, 28, 28): the model's input
    probs = torch.cat([model(images[i : i + batch_size]).softmax(1) for i in range(0, len(images), batch_size)])
    best = probs.max(1)
    return best.indices.numpy(), best.values.numpy()


def main(argv: list[str]) -> int:
    args, overrides = split_args(argv, ("model_uri", "images"))
    if len(args["model_uri"]) != 1:
        raise ConfigError("give one model_uri=URI: runs:/<run_id>/model, models:/mnist-cnn@champion or a run id")
    if not args["images"]:
        raise ConfigError("give images=PATH: an image, a directory of images or a list [a.png,b.png]")
    cfg = compose(overrides)
    tracking.bound_http(cfg.mlflow.http_retries, cfg.mlflow.http_timeout)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)  # registry URIs resolve in this store
    model = registry.load_model(registry.resolve_model(args["model_uri"][0])[0])

    paths, errors = image_paths(args["images"])
    if not paths and not errors:
        errors.append(f"images={args['images'][0]}: names no files")
    readable, pixels = [], []
    for path in paths:
        try:
            pixels.append(read(path))
            readable.append(path)
        except ValueError as err:
            errors.append(str(err))
    for error in errors:
        print("error: " + " ".join(error.split()), file=sys.stderr)
    if readable:
        digits, probs = classify(model, np.stack(pixels), cfg.data.eval_batch_size)
        for path, digit, prob in zip(readable, digits, probs):
            print(f"{path}\t{digit}\t{prob:.4f}")
    return 1 if errors or not readable else 0


if __name__ == "__main__":
    cli.run(main)
