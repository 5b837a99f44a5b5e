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
