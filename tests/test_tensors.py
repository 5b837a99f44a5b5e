import pytest
import torch

from mnist_sweep import tensors


def test_batches_visit_every_example_once_in_a_seeded_order():
    split = tensors.Split(torch.arange(103.0).view(103, 1, 1, 1), torch.arange(103))
    epoch = list(tensors.batches(split, batch_size=10, seed=5))
    seen = torch.cat([labels for _, labels in epoch])
    assert sorted(seen.tolist()) == list(range(103))
    assert [len(labels) for _, labels in epoch] == [10] * 10 + [3]
    assert all(torch.equal(images.view(-1), labels.float()) for images, labels in epoch)  # pairs stay paired
    again = torch.cat([labels for _, labels in tensors.batches(split, 10, seed=5)])
    other = torch.cat([labels for _, labels in tensors.batches(split, 10, seed=6)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)


def write_tensor_file(path, first_pixel: int) -> None:
    images = torch.zeros(3, 28, 28, dtype=torch.uint8)
    images[0, 0, 0] = first_pixel
    torch.save({f"{split}_{kind}": images if kind == "images" else torch.arange(3)
                for split in ("train", "test") for kind in ("images", "labels")}, path)


def test_a_rewritten_tensor_file_loads_afresh_in_the_same_process(tmp_path):
    path = tmp_path / "mnist-uint8.pt"
    write_tensor_file(path, 7)
    train_set, test_set = tensors.load(path, torch.device("cpu"))
    assert train_set.images.shape == (3, 1, 28, 28) and train_set.images.dtype == torch.float32
    assert tensors.load(path, torch.device("cpu"))[0] is train_set  # a sweep's next trial: the same copy
    write_tensor_file(path, 9)  # data.prepare remade it (new size or modification time)
    assert tensors.load(path, torch.device("cpu"))[0].images[0, 0, 0, 0] == 9


def numbered(n: int) -> tensors.Split:
    """Image i is filled with the value i and labelled i: where an example went shows in both."""
    return tensors.Split(torch.arange(float(n)).view(n, 1, 1, 1).expand(n, 1, 28, 28), torch.arange(n))


def test_holdout_is_disjoint_complete_and_fixed_by_its_seed():
    split = numbered(100)
    train, val = tensors.holdout(split, 20, seed=3)
    assert len(train) == 80 and len(val) == 20
    assert set(train.labels.tolist()).isdisjoint(val.labels.tolist())
    assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(100))
    assert torch.equal(train.images[:, 0, 0, 0], train.labels.float())  # images stay with their labels
    assert torch.equal(tensors.holdout(split, 20, seed=3)[1].labels, val.labels)
    assert not torch.equal(tensors.holdout(split, 20, seed=4)[1].labels, val.labels)
    assert val.labels.tolist() != list(range(80, 100))  # drawn at random, not the file's tail


def test_no_holdout_leaves_the_split_as_it_is():
    split = numbered(10)
    train, val = tensors.holdout(split, 0, seed=0)
    assert train is split and val is None


def test_a_holdout_that_leaves_nothing_to_train_on_is_refused():
    with pytest.raises(ValueError, match="data.val_size=10 must leave training images: the training split has 10"):
        tensors.holdout(numbered(10), 10, seed=0)
