"""docs/screenshots.py, the README's pictures: runs only where Debian's chromium is installed (it is
a documentation tool, not a test of MLflow). Slow: a sweep, the MLflow UI and a browser."""

import shutil
import subprocess
import sys

import pytest
from PIL import Image

from mnist_sweep.config import PROJECT_ROOT

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium on PATH")]


def test_the_script_pictures_the_sweeps_runs_table_trial_charts_and_models_tab(overrides, tmp_path):
    sweep_overrides = [o for o in overrides if not o.startswith("paths.outputs=")]  # the script keeps its own store
    done = subprocess.run([sys.executable, "docs/screenshots.py", "--out", str(tmp_path), "--trials", "2",
                           *sweep_overrides], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    # the script waits for the trials, the columns and the charts to show, and fails otherwise
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    for name in ("runs-table.png", "trials-chart.png", "models-tab.png"):
        path = tmp_path / name
        assert path.stat().st_size < 300_000, name
        with Image.open(path) as image:
            assert image.width == 1720
            assert len(image.getcolors(256) or []) > 16, f"{name} is nearly blank"  # a UI, not an empty page
