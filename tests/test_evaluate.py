"""``python -m mnist_sweep.evaluate``: what it prints and logs is what an independent count gives."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import make_digits, run_cli


def test_evaluate_reports_and_logs_what_an_independent_count_gives(logged_model, overrides, tmp_path):
    """~20-40 s: the module's logged model (a run) and `python -m mnist_sweep.evaluate` in a process of its own."""
    # write_tiny_mnist's test split: independent of tensors.load and of the evaluate module
    images, labels = make_digits(160, seed=1)
    with torch.inference_mode():
        predicted = logged_model.model(torch.from_numpy(images).float().unsqueeze(1)).argmax(1).numpy()
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    correct = int((predicted == labels).sum())
    assert 0 < correct < 160, "the tiny model must be partly wrong, or a wrong count could pass"

    done = run_cli("mnist_sweep.evaluate", f"model_uri=runs:/{logged_model.run_id}/model", *overrides,
                   f"mlflow.tracking_uri={logged_model.tracking_uri}")
    assert done.returncode == 0, done.stderr
    assert f"test accuracy {correct / 160:.4f} ({correct}/160)" in done.stdout
    for digit in range(10):
        n = confusion[digit].sum()
        assert f"  {digit}  {confusion[digit, digit] / n:.4f} ({confusion[digit, digit]}/{n})" in done.stdout
    printed = [line.split()[1:] for line in done.stdout.splitlines()[-12:-2]]
    assert np.array_equal(np.array(printed, dtype=int), confusion)

    mlflow.set_tracking_uri(logged_model.tracking_uri)
    [evaluation] = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                      filter_string=f"tags.source_run_id = '{logged_model.run_id}'")
    assert evaluation.info.run_name == "evaluate-tiny-run"
    assert evaluation.data.tags["source_model_uri"] == logged_model.model_uri
    assert evaluation.data.tags["mlflow.source.name"] == "python -m mnist_sweep.evaluate"
    [scored] = evaluation.inputs.dataset_inputs  # the test split only
    assert scored.dataset.name == "mnist-test" and [(t.key, t.value) for t in scored.tags] == [
        ("mlflow.data.context", "testing")]
    assert evaluation.data.metrics["test_acc"] == pytest.approx(correct / 160)
    assert evaluation.data.metrics["acc_3"] == pytest.approx(confusion[3, 3] / confusion[3].sum())
    logged = mlflow.artifacts.download_artifacts(run_id=evaluation.info.run_id, dst_path=str(tmp_path / "dl"))
    rows = json.loads(Path(logged, "confusion_matrix.json").read_text())["rows_true_columns_predicted"]
    assert rows == confusion.tolist()
    assert Path(logged, "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = tmp_path / "outputs" / "evaluations" / evaluation.info.run_id / "confusion_matrix.png"
    assert saved.read_bytes() == Path(logged, "confusion_matrix.png").read_bytes()
