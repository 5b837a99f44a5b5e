"""``python -m mnist_sweep.evaluate model_uri=URI [overrides]``: score a logged model on the whole
MNIST test set, print its accuracy, per-class accuracy and confusion matrix, and log the
evaluation to MLflow as a run of its own, tagged with the run that logged the model.

URI: ``runs:/<run_id>/model``, ``models:/mnist-cnn@champion``, ``models:/<name>/<version>``,
``models:/m-…`` or a bare run id. The overrides are training's (``data.root=DIR``,
``mlflow.tracking_uri=URI``, ...). The confusion matrix image is also saved under
``<paths.outputs>/evaluations/<evaluation run id>/``.
"""

from __future__ import annotations

import sys

from mnist_sweep import cli

cli.defer_collection(__name__)

from pathlib import Path

import mlflow
import torch
from torch import nn

from mnist_sweep import data, registry, tensors, tracking
from mnist_sweep.config import ConfigError, compose, split_args

SOURCE_RUN_TAG = "source_run_id"  # not mlflow.parentRunId: an evaluation is no part of training
SOURCE_MODEL_TAG = "source_model_uri"  # the models:/m-… the evaluation scored
REQUESTED_MODEL_TAG = "requested_model_uri"  # as typed: keeps the alias (@champion) that was meant
CLASSES = 10


@torch.inference_mode()
def confusion_matrix(model: nn.Module, split: tensors.Split, batch_size: int) -> torch.Tensor:
    """(10, 10) counts: row = true digit, column = predicted digit."""
    counts = torch.zeros(CLASSES * CLASSES, dtype=torch.long)
    for start in range(0, len(split), batch_size):
        predicted = model(split.images[start : start + batch_size]).argmax(1)
        truth = split.labels[start : start + batch_size]
        counts += torch.bincount(truth * CLASSES + predicted, minlength=CLASSES * CLASSES).cpu()
    return counts.view(CLASSES, CLASSES)


def accuracies(counts: torch.Tensor) -> dict[str, float]:
    """``test_acc`` and ``acc_<digit>`` (the fraction of that digit's images classified right);
    a digit with no test images has no ``acc_<digit>``."""
    metrics = {"test_acc": counts.trace().item() / counts.sum().item()}
    for digit, row in enumerate(counts):
        if row.sum() > 0:
            metrics[f"acc_{digit}"] = row[digit].item() / row.sum().item()
    return metrics


def report(counts: torch.Tensor, metrics: dict[str, float]) -> str:
    total = counts.sum().item()
    lines = [f"test accuracy {metrics['test_acc']:.4f} ({counts.trace().item()}/{total})", "per-class accuracy:"]
    for digit, row in enumerate(counts):
        acc = f"{metrics[f'acc_{digit}']:.4f}" if f"acc_{digit}" in metrics else "   n/a"
        lines.append(f"  {digit}  {acc} ({row[digit].item()}/{row.sum().item()})")
    width = max(4, len(str(counts.max().item())) + 1)
    lines.append("confusion matrix (rows: true digit, columns: predicted digit):")
    lines.append("   " + "".join(f"{d:>{width}}" for d in range(CLASSES)))
    lines += [f"{digit:>3}" + "".join(f"{n:>{width}}" for n in row.tolist()) for digit, row in enumerate(counts)]
    return "\n".join(lines)


def plot_confusion(counts: torch.Tensor, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 6))
    # log scale: the diagonal (~1000 a class) would otherwise wash out the few errors that matter
    shown = ax.imshow(counts.numpy() + 1, cmap="Blues", norm=matplotlib.colors.LogNorm())
    for (row, col), n in zip(((r, c) for r in range(CLASSES) for c in range(CLASSES)), counts.flatten().tolist()):
        if n:
            ax.text(col, row, str(n), ha="center", va="center", fontsize=7,
                    color="white" if row == col else "black")
    ax.set(xticks=range(CLASSES), yticks=range(CLASSES), xlabel="predicted digit", ylabel="true digit", title=title)
    figure.colorbar(shown, ax=ax, label="images + 1 (log scale)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str]) -> int:
    args, overrides = split_args(argv, ("model_uri",))
    if len(args["model_uri"]) != 1:
        raise ConfigError("give one model_uri=URI: runs:/<run_id>/model, models:/mnist-cnn@champion or a run id")
    requested = args["model_uri"][0]
    cfg = compose(overrides)
    tracking.bound_http(cfg.mlflow.http_retries, cfg.mlflow.http_timeout)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)  # registry URIs resolve in this store
    model_uri, source_run_id = registry.resolve_model(requested)
    model = registry.load_model(model_uri)
    # CPU: a pt2 model stays on the device it was exported from, which tracking makes the CPU
    tensor_file = data.prepare(Path(cfg.data.root), dict(cfg.data.md5), log=lambda line: print(line, file=sys.stderr))
    _, test_set = tensors.load(tensor_file, torch.device("cpu"))

    counts = confusion_matrix(model, test_set, cfg.data.eval_batch_size)
    metrics = accuracies(counts)
    print(f"model {model_uri} (logged by run {source_run_id})")
    print(report(counts, metrics))

    tracking.use_store(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.artifact_root)
    source_name = mlflow.get_run(source_run_id).info.run_name
    tags = {SOURCE_RUN_TAG: source_run_id, SOURCE_MODEL_TAG: model_uri, REQUESTED_MODEL_TAG: requested,
            **tracking.source_tags("python -m mnist_sweep.evaluate")}
    params = {"data.root": cfg.data.root, "test_images": len(test_set)}
    with tracking.run(f"evaluate-{source_name}", params, tags) as active:
        tracking.log_datasets([info for info in data.datasets(Path(cfg.data.root), dict(cfg.data.md5))
                               if info.context == "testing"])
        # model_id links the metrics to the logged model, so its page in the UI shows them
        mlflow.log_metrics(metrics, model_id=model_uri.removeprefix("models:/"))
        mlflow.log_dict({"rows_true_columns_predicted": counts.tolist()}, "confusion_matrix.json")
        image = Path(cfg.paths.outputs) / "evaluations" / active.info.run_id / "confusion_matrix.png"
        plot_confusion(counts, f"{source_name}: test accuracy {metrics['test_acc']:.4f}", image)
        mlflow.log_artifact(str(image))
    print(f"confusion matrix image: {image}")
    print(f"logged evaluation run {active.info.run_id} (evaluate-{source_name})")
    return 0


if __name__ == "__main__":
    cli.run(main)
