"""docs/screenshots.py, the README's pictures: each is taken only once its page shows what the
README says it shows, so an error page or an empty one fails instead of landing in the README.
Without Debian's chromium: skipped, but failed under CI (.ci/run installs it)."""

import re

import pytest
import screenshots  # docs/screenshots.py
from PIL import Image

from conftest import require

pytestmark = pytest.mark.slow


def test_the_script_pictures_the_runs_table_trial_charts_models_tab_and_pad_as_they_show(overrides, tmp_path,
                                                                                           monkeypatch):
    """Over 30 s: the whole script, as make screenshots runs it (a 2-trial sweep, the MLflow UI and
    make serve on its champion, a browser)."""
    require(screenshots.browser, "headless Chromium")
    shown, take = {}, screenshots.Page.screenshot

    def screenshot(page, path, *args, **kwargs):  # what the page says as each picture is taken
        shown[path.name] = " ".join(page.js("document.body.innerText").split())
        take(page, path, *args, **kwargs)

    monkeypatch.setattr(screenshots.Page, "screenshot", screenshot)
    sweep_overrides = [o for o in overrides if not o.startswith("paths.outputs=")]  # the script keeps its own store
    assert screenshots.main(["--out", str(tmp_path), "--trials", "2", *sweep_overrides]) == 0

    assert list(shown) == list(screenshots.PICTURES)
    for name, text in shown.items():
        assert not re.search(r"Traceback|Internal Server Error|Not Found|error:", text), (name, text[:500])
    table, chart, models, pad = shown.values()
    # the runs table: the study's parent and its two trials, each with its data sets, chosen columns
    assert "mnist_sweep" in table and table.count("mnist-train") == 2, table
    assert all(column in table for column in ("test_acc", "optim.lr", "data.batch_size", "Dataset", "Source"))
    assert "epoch_seconds vs. test_acc" in chart and "Parallel Coordinates" in chart, chart
    # the Models tab: both trials' models, named for what they are, with their scores and costs
    assert len(re.findall(r"trial\d-mnist_sweep", models)) == 2, models
    assert all(metric in models for metric in screenshots.MODEL_METRICS) and "test_loss" not in models, models
    # the pad: the champion, and three digits with their probabilities for the drawn 7
    assert "Digit pad" in pad and "models:/mnist-cnn@champion" in pad, pad
    assert len(re.findall(r"\b\d \d{1,3}\.\d%", pad)) == 3, pad

    for name in screenshots.PICTURES:
        path = tmp_path / name
        assert path.stat().st_size < 300_000, name
        with Image.open(path) as image:
            assert image.width == (screenshots.PAD_SIZE[0] if name == screenshots.PAD else screenshots.WIDTH)
            assert len(image.getcolors(256) or []) > 16, f"{name} is nearly blank"  # a page, not an empty one
