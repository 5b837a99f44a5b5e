"""The benchmark end to end in quick mode on the tiny data: it runs and writes every row (never a speed)."""

import os

import pytest

from conftest import run_cli
from mnist_sweep import services
from mnist_sweep.bench import ROWS, SEARCH_ROWS


@pytest.mark.slow
def test_quick_benchmark_prints_and_writes_the_whole_table(overrides, tmp_path):
    out = tmp_path / "bench"
    done = run_cli("mnist_sweep.bench", "--quick", "--out", str(out), "--", *overrides, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    table = (out / "latest.md").read_text()
    assert table in done.stdout
    assert [path.name for path in out.glob("bench-*.md")] and "Machine: CPU " in table
    for row in ROWS:
        assert f"| {row} |" in table, row
    try:
        services.postgres_bindir()
        sweeps = 4  # both embedded sweeps, and both on the shared stores
    except FileNotFoundError:
        assert os.environ.get("CI") != "true", "CI benchmarks the shared stores: PostgreSQL must be installed"
        sweeps = 2
    assert table.count("2 of 2 trials completed") == sweeps  # every sweep really ran its trials
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # bench runs stay in the bench's store


@pytest.mark.slow
def test_quick_search_benchmark_runs_each_target_search(overrides, tmp_path):
    out = tmp_path / "bench"
    done = run_cli("mnist_sweep.bench", "--quick", "--search", "--out", str(out), "--", *overrides, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "latest.md").read_text()
    for row in SEARCH_ROWS:
        assert f"| {row} |" in table, row
    assert table.count("2 trials, ") == len(SEARCH_ROWS)  # each search really ran its trials
    assert "(chosen on val_acc " in table  # the validation search reports the test accuracy of its val choice
    assert "augment=" in table  # each row names its best trial's config
