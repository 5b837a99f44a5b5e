"""The classic recipe: pytorch/examples ``mnist/main.py`` as written, as the benchmark's child process.

``python -m mnist_sweep.bench.classic ROOT [--epochs N]`` trains it on the MNIST files under ROOT
and prints one JSON line per epoch; it stops at the first epoch that reaches the target accuracy.
It imports only what the example imports (torch, torchvision): its process start is the example's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

TARGET_ACC = 0.99
EPOCHS = 14  # the example's default --epochs: the cap when the target is never reached


class ClassicNet(nn.Module):
    """pytorch/examples mnist ``Net``, unchanged: log-probabilities for nll_loss."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = self.dropout2(F.relu(self.fc1(torch.flatten(x, 1))))
        return F.log_softmax(self.fc2(x), dim=1)


@torch.no_grad()
def accuracy(model: nn.Module, device: torch.device, loader) -> float:
    model.eval()
    correct = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        correct += model(images).argmax(1).eq(labels).sum().item()
    return correct / len(loader.dataset)


def train_epoch(model: nn.Module, device: torch.device, loader, optimizer: torch.optim.Optimizer) -> float:
    """One epoch of the example's training loop; returns its seconds."""
    start = time.monotonic()
    model.train()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        F.nll_loss(model(images), labels).backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()  # the epoch's time, not the launch queue's
    return time.monotonic() - start


def loaders(root: str, use_cuda: bool):
    from torchvision import datasets, transforms  # the example imports them at its top

    loader_kwargs = {"num_workers": 1, "pin_memory": True} if use_cuda else {}
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(root, train=True, download=False, transform=transform)
    test_set = datasets.MNIST(root, train=False, download=False, transform=transform)
    # shuffled on every device: the example shuffles only on CUDA, a wart the recipe leaves out
    return (torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True, **loader_kwargs),
            torch.utils.data.DataLoader(test_set, batch_size=1000, **loader_kwargs))


def train(root: str, max_epochs: int) -> None:
    """The example's main() without its argparse and log prints; one JSON line per epoch on stdout,
    ``at`` the CLOCK_MONOTONIC instant its test pass ended (the parent shares that clock)."""
    torch.manual_seed(1)  # the example's --seed
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    train_loader, test_loader = loaders(root, use_cuda)
    model = ClassicNet().to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    for epoch in range(1, max_epochs + 1):
        train_s = train_epoch(model, device, train_loader, optimizer)
        acc = accuracy(model, device, test_loader)
        scheduler.step()
        line = {"epoch": epoch, "acc": acc, "train_s": train_s, "images": len(train_loader.dataset),
                "at": time.monotonic()}
        print(json.dumps(line), flush=True)
        if acc >= TARGET_ACC:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_sweep.bench.classic",
                                     description="The pytorch/examples MNIST recipe, timed by the benchmark.")
    parser.add_argument("root", help="the directory holding MNIST/raw")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"the cap (default {EPOCHS}, the example's)")
    args = parser.parse_args(argv)
    train(args.root, args.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
