"""The benchmark: its table (rows keyed by label), its profile phases, and end to end in quick mode
on the tiny data (it runs and writes every row in its place, never a speed)."""

from __future__ import annotations

import cProfile
import os
import re

import pytest

from conftest import run_cli
from mnist_sweep import stack
from mnist_sweep.bench import phases, report

MACHINE = {"date": "2026-01-01 00:00 UTC", "CPU": "test"}


def table_rows(table: str) -> dict[str, list[str]]:
    """The table's rows in order: label -> its other cells."""
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
             if line.startswith("| ") and not line.startswith("| Measurement ")]
    return {row[0]: row[1:] for row in cells}


# ----------------------------------------------------------------------------- the table


def test_a_row_that_was_not_measured_reads_so_in_its_place_and_shifts_no_other():
    labels = ("first", "second", "third")
    table = report.table(MACHINE, "cmd", labels, {"third": ("3 s", "", "c"), "first": ("1 s", "<= 2 s: met", "a")})
    rows = table_rows(table)
    assert list(rows) == list(labels)
    assert rows == {"first": ["1 s", "<= 2 s: met", "a"], "second": ["not measured", "", ""], "third": ["3 s", "", "c"]}


def test_a_row_with_no_place_in_the_table_is_an_error_not_dropped():
    with pytest.raises(ValueError, match="thrid"):
        report.table(MACHINE, "cmd", ("first", "third"), {"thrid": ("3 s", "", "")})


def measurements() -> dict:
    """One of each measurement, as the timers hand them back (figures made up)."""
    run = {"process_s": 9.0, "fit_s": 5.0, "to_target_s": 9.0, "acc": 0.991, "epochs": 2, "images_per_s": 6000.0}
    sweep = {"seconds": 30.0, "asked": 8, "trials": 8, "completed": 8, "pruned": 2, "best": 0.99,
             "best_test": 0.99, "best_params": {"optim.lr": 0.01, "model": "deep"}}
    profile = {"phases": dict.fromkeys(phases.PHASES, 0.5), "total": 4.5, "missing": dict.fromkeys(phases.PHASES, []),
               "details": {label: 0.1 for details in phases.DETAILS.values() for label in details}}
    bare = {"fit_s": 4.0, "acc": 0.99, "device": "cpu", "epoch_s": 2.0, "augment_s": 0.5}
    return {"run": run, "sweep": sweep, "profile": profile, "bare": bare,
            "trial": {"span_s": 6.0, "fit_s": 5.8, "model": False}}


def test_the_sections_rows_are_exactly_the_table_labels():
    m = measurements()
    overhead = (report.overhead_rows({"torch": [1.0], "main": [2.0]}, [m["run"]], [m["run"]], [m["bare"]],
                                     {"existing": m["profile"], "fresh": m["profile"]}, [m["trial"]] * 6)
                | report.sweep_rows({1: m["sweep"]}))
    assert set(overhead) == set(report.OVERHEAD_ROWS)
    rows = (overhead | report.sweep_rows({1: m["sweep"], 2: m["sweep"]})
            | report.target_rows([m["run"]], [m["run"]])
            | report.shared_rows(({1: m["sweep"], 2: m["sweep"]}, {"embedded": 0.5, "server": 0.7}), m["sweep"])
            | report.pruning_rows(dict.fromkeys(report.PRUNERS, m["sweep"]))
            | report.gpu_row([m["bare"]]) | report.augment_rows(dict.fromkeys(report.AUGMENTS, m["bare"])))
    assert set(rows) == set(report.ROWS)
    assert set(report.shared_rows("PostgreSQL is not installed", m["sweep"])) == set(rows) & set(report.shared_rows(
        ({1: m["sweep"], 2: m["sweep"]}, {"embedded": 0.5, "server": 0.7}), m["sweep"]))
    assert list(table_rows(report.table(MACHINE, "cmd", report.ROWS, rows))) == list(report.ROWS)


def test_a_phase_missing_from_the_profile_is_named_in_its_row():
    m = measurements()
    m["profile"]["missing"] = dict.fromkeys(phases.PHASES, []) | {"model, optimizer": ["mnist_sweep.run.build"]}
    rows = report.phase_rows({"existing": m["profile"], "fresh": m["profile"]}, {"existing": 4.0, "fresh": 6.0})
    assert rows["overhead phase: model, optimizer"][2].endswith("; not in the profile: mnist_sweep.run.build")
    assert rows["overhead phase: data"][0] == "11% ~0.4 s / 11% ~0.7 s"  # 0.5 s of 4.5 s profiled
    assert "not in the profile" not in rows["overhead phase: data"][2]


# ----------------------------------------------------------------------------- the phases


CLOCK = [0.0]  # the profile's clock: each function below advances it by what it "costs"


def spend(seconds: float) -> None:
    CLOCK[0] += seconds


def validate():
    spend(0.25)


def prepare():
    spend(1.0)


def fit():
    spend(8.0)
    log_epoch()


def log_epoch():
    spend(0.5)


def task():
    validate()
    prepare()
    fit()


def hydra_job():
    spend(0.75)
    task()


def process():
    spend(2.0)  # "imports"
    hydra_job()


def tiny_profile() -> cProfile.Profile:
    """``process`` profiled on a clock that moves only as its functions say: exact cumulative times."""
    CLOCK[0] = 0.0
    profile = cProfile.Profile(lambda: CLOCK[0])
    profile.runcall(process)
    return profile


def test_phases_add_up_the_functions_they_consist_of(tmp_path):
    names = {"hydra.main": hydra_job, "mnist_sweep.run.main": task, "mnist_sweep.config.validate": validate,
             "mnist_sweep.data.prepare": prepare, "mnist_sweep.train.fit": fit,
             "mnist_sweep.tracking.log_epoch": log_epoch}
    keys = {name: phases.key_of(function) for name, function in names.items()}
    keys["hydra.main"] = phases.key_of(hydra_job, unwrap=False)
    tiny_profile().dump_stats(tmp_path / "run.prof")

    split = phases.read(tmp_path / "run.prof", keys)
    assert split["phases"]["imports"] == pytest.approx(2.0)  # all outside Hydra's job
    assert split["phases"]["config (Hydra, validate)"] == pytest.approx(0.75 + 0.25)  # Hydra around the task
    assert split["phases"]["data"] == pytest.approx(1.0)
    assert split["phases"]["per-epoch records"] == pytest.approx(0.5)
    assert split["total"] == pytest.approx(2.0 + 0.75 + 0.25 + 1.0 + 0.5)  # all but fit's own training
    assert split["phases"]["run end"] == 0.0
    # what this profile never ran is named, in each phase it belongs to (and the overhead's in all)
    assert split["missing"]["data"] == ["mnist_sweep.data.datasets", "mnist_sweep.tensors.load"]
    assert split["missing"]["run end"] == ["mlflow.end_run"]
    assert split["missing"]["imports"] == split["missing"]["per-epoch records"] == []
    assert set(split["details"]) == {label for details in phases.DETAILS.values() for label in details}


def test_phases_from_synthetic_stats_subtract_what_they_say():
    keys = {name: ("/x.py", line, name) for line, name in enumerate(
        ["hydra.main", "mnist_sweep.run.main", "mnist_sweep.config.validate", "mnist_sweep.train.fit",
         "mnist_sweep.tracking.log_epoch", "mnist_sweep.tracking.log_outputs", "torch._dynamo"])}
    keys["torch._dynamo"] = ("/x.py", None, "<module>")  # a module's code: any line
    cumulative = {"hydra.main": 20.0, "mnist_sweep.run.main": 18.0, "mnist_sweep.config.validate": 0.5,
                  "mnist_sweep.train.fit": 12.0, "mnist_sweep.tracking.log_epoch": 1.0,
                  "mnist_sweep.tracking.log_outputs": 3.0}
    stats = {keys[name]: (1, 1, 0.0, seconds, {}) for name, seconds in cumulative.items()}
    stats[("/x.py", 99, "<module>")] = (1, 1, 0.0, 0.25, {})
    split = phases.split(stats, 25.0, keys)
    assert split["phases"]["imports"] == 5.0
    assert split["phases"]["config (Hydra, validate)"] == 2.5
    assert split["phases"]["model logging"] == 3.0
    assert split["total"] == 25.0 - 12.0 + 1.0
    assert split["details"]["import torch._dynamo"] == 0.25


def test_every_phase_names_a_function_that_exists_and_a_gone_one_fails_at_once():
    keys = phases.resolve()
    assert keys["mnist_sweep.run.build"][2] == "build" and keys["hydra.main"][2] != "<lambda>"
    with pytest.raises(ValueError, match="mnist_sweep.tracking.no_such_function"):
        phases.resolve({"mnist_sweep.tracking.no_such_function"})


# ----------------------------------------------------------------------------- end to end


def shared_stores_available() -> bool:
    try:
        stack.postgres_bindir()
    except FileNotFoundError:
        assert os.environ.get("CI") != "true", "CI benchmarks the shared stores: PostgreSQL must be installed"
        return False
    return True


# What each kind of row's result looks like: a row under another's label would not match
RESULTS = [
    (r"time to 99\.0%$|^import torch|--help$|process, |bare training loop|framework overhead, ",
     r"^(\d+\.\d s|not reached)"),
    (r"^time to 99\.0%, ", r"^(n/a|\d\.\d{3}x)$"),
    (r"^overhead phase: ", r"^\d+% ~-?\d+\.\d s / \d+% ~-?\d+\.\d s$"),
    (r"^sweep: overhead per trial$", r"^(-?\d+\.\d\d s|n/a)$"),  # n/a: a quick sweep has 2 trials
    (r"sweep, ", r"^(\d+\.\d trials/min|n/a)$"),
    (r"^tracking one trial", r"^(\d+\.\d\d s|n/a)$"),
    (r"^search, pruner ", r"^\d+ s, best "),
    (r"^wall time saved", r"^(-?\d+% less, best [+-]\d+\.\d\d pt|n/a)$"),
    (r"^GPU: ", r"^(no GPU|\d+\.\d s)"),
    (r"^augment=", r"^\d+\.\d\d s of warps$"),
]


@pytest.mark.slow
def test_quick_benchmark_prints_and_writes_the_whole_table(overrides, tmp_path):
    out = tmp_path / "bench"
    done = run_cli("mnist_sweep.bench", "--quick", "--out", str(out), "--", *overrides, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    table = (out / "latest.md").read_text()
    assert table in done.stdout
    assert [path.name for path in out.glob("bench-*.md")] and "Machine: CPU " in table
    rows = table_rows(table)
    assert list(rows) == list(report.ROWS)  # every row, in its place
    for label, (result, _, detail) in rows.items():
        assert result != "not measured", label
        assert "not in the profile" not in detail, (label, detail)  # a phase lost its function
        pattern = next(result_pattern for label_pattern, result_pattern in RESULTS if re.search(label_pattern, label))
        assert re.search(pattern, result), (label, result)
    sweeps = 4 if shared_stores_available() else 2  # both embedded sweeps, and both on the shared stores
    assert table.count("2 of 2 trials completed") == sweeps  # every sweep really ran its trials
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # bench runs stay in the bench's store


@pytest.mark.slow
def test_quick_search_benchmark_runs_each_target_search(overrides, tmp_path):
    out = tmp_path / "bench"
    done = run_cli("mnist_sweep.bench", "--quick", "--search", "--out", str(out), "--", *overrides, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = table_rows((out / "latest.md").read_text())
    assert list(rows) == list(report.SEARCH_ROWS)
    for label, (result, target, detail) in rows.items():
        assert re.match(r"\d+\.\d\d% ", result) and target.startswith(">= "), (label, result)
        assert detail.startswith("2 trials, ") and "augment=" in detail, (label, detail)  # its best trial's config
    assert "(chosen on val_acc " in rows[report.SEARCH_ROWS[-1]][0]  # the test accuracy of its val choice
