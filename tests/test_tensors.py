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
