import pytest
import torch

from mnist_sweep.augment import RandomAffine


def digits(n: int = 64, device: str = "cpu") -> torch.Tensor:
    """Blocks of ink (255) on black, away from the border, each in its own place."""
    images = torch.zeros(n, 1, 28, 28, device=device)
    for i in range(n):
        row, col = 6 + i % 8, 6 + (i // 8) % 8
        images[i, 0, row : row + 8, col : col + 6] = 255
    return images


def generator(device: str = "cpu", seed: int = 0) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


@pytest.mark.parametrize("augment", [RandomAffine(shift=2), RandomAffine(2, 10.0, 0.1)], ids=["shift", "affine"])
def test_augmentation_keeps_shape_dtype_device_and_changes_the_pixels(augment):
    images = digits()
    out = augment(images, generator())
    assert out.shape == images.shape and out.dtype == images.dtype and out.device == images.device
    changed = (out != images).flatten(1).any(1)
    assert changed.float().mean() > 0.5  # most images moved (a draw of no shift at all is rare)
    assert out.min() >= 0 and out.max() <= 255 + 1e-3  # raw pixels still (bilinear rounds by ~1e-5)
    assert torch.equal(augment(images, generator(seed=0)), out)  # seeded: a run repeats
    assert not torch.equal(augment(images, generator(seed=1)), out)


def test_a_shift_moves_whole_pixels_and_keeps_the_ink():
    images = digits()
    out = RandomAffine(shift=2)(images, generator())
    assert set(out.unique().tolist()) <= {0.0, 255.0}  # nearest sampling: no blurred values
    assert torch.equal(out.sum((1, 2, 3)), images.sum((1, 2, 3)))  # the blocks stay inside the image
    for before, after in zip(images[:, 0], out[:, 0]):  # each image is its block, moved by at most 2
        (r0, c0), (r1, c1) = before.nonzero()[0].tolist(), after.nonzero()[0].tolist()
        assert abs(r1 - r0) <= 2 and abs(c1 - c0) <= 2
        assert torch.equal(after[r1 : r1 + 8, c1 : c1 + 6], before[r0 : r0 + 8, c0 : c0 + 6])


def test_no_augmentation_returns_the_batch_itself():
    images = digits()
    assert RandomAffine()(images, generator()) is images


def test_augmentation_leaves_the_labels_alone_in_training(monkeypatch):
    """The training loop passes images only: each label still belongs to its (moved) image."""
    from mnist_sweep import tensors, train

    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda logits, labels: seen.append(labels.clone()) or logits.sum() * 0)
    split = tensors.Split(digits(16), torch.arange(16) % 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [labels for _, labels in tensors.batches(split, 4, seed=1)]
    train.train_epoch(model, optimizer, scheduler, split, 4, seed=1, augment=RandomAffine(2, 10.0, 0.1))
    assert all(torch.equal(a, b) for a, b in zip(seen, batches))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmentation_runs_on_the_batch_device():
    images = digits(device="cuda")
    out = RandomAffine(2, 10.0, 0.1)(images, generator("cuda"))
    assert out.device == images.device and not torch.equal(out, images)
