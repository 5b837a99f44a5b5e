"""The benchmark: its table (rows keyed by label), its profile phases, and end to end in quick mode
on the tiny data (it runs and writes every row in its place, never a speed)."""

from __future__ import annotations

import cProfile
import re
import shutil
import uuid

import numpy as np
import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from conftest import options, run_cli, runs_in, shared
from mnist_sweep.bench import growth, phases, report
from mnist_sweep.config import compose
from mnist_sweep.trial import JobTrial, open_storage

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
    costs = {"runs": [{"latency_ms": ms, "latency_ms_iqr": 0.02, "seconds": s, "param_count": 29178,
                       "model_bytes": 124789} for ms, s in ((1.0, 0.03), (1.2, 0.05), (0.8, 0.02))],
             "passes": 50, "warmup": 5, "budget_s": 0.1}
    system_metrics = {"with_s": [8.1, 8.3, 8.0], "without_s": [8.0, 7.9, 8.2], "samples": [2, 1, 2],
                      "interval_s": 5.0}
    return {"run": run, "sweep": sweep, "profile": profile, "bare": bare, "costs": costs,
            "trial": {"span_s": 6.0, "fit_s": 5.8, "model": False}, "system_metrics": system_metrics,
            "checkpoint": {"save_s": [0.004, 0.003, 0.02], "bytes": 250_000}}


def test_the_sections_rows_are_exactly_the_table_labels():
    m = measurements()
    overhead = (report.overhead_rows({"torch": [1.0], "main": [2.0]}, [m["run"]], [m["run"]], [m["bare"]],
                                     {"existing": m["profile"], "fresh": m["profile"]}, [m["trial"]] * 6)
                | report.sweep_rows({1: m["sweep"]}) | report.cost_rows(m["costs"])
                | report.system_metrics_row(m["system_metrics"]) | report.checkpoint_row(m["checkpoint"], [m["bare"]]))
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


def test_the_latency_rows_give_the_median_the_spread_between_measurements_and_their_cost():
    rows = report.cost_rows(measurements()["costs"])
    latency, measuring = rows["model costs: latency_ms, default model"], rows["model costs: measuring them, per run"]
    assert latency[0] == "1.000 ms"
    assert latency[2].startswith("median of 3 measurements in a row: 0.800-1.200 ms, a spread of 40% of the median")
    assert measuring[:2] == ("0.030 s", "<= 0.1 s: met") and "0.020-0.050 s" in measuring[2]


def test_the_checkpoint_row_is_the_median_save_as_a_share_of_an_epoch_judged_against_2_percent():
    m = measurements()
    result, target, detail = report.checkpoint_row(m["checkpoint"], [m["bare"]])[report.CHECKPOINT_ROW]
    assert (result, target) == ("4.0 ms, 0.20% of an epoch", "<= 2% of an epoch: met")  # 4 ms of a 2 s epoch
    assert "(244 KiB), median of 3 (range 3.0-20.0 ms)" in detail and "epoch (2.00 s)" in detail
    slow = m["checkpoint"] | {"save_s": [0.05, 0.06, 0.07]}
    assert report.checkpoint_row(slow, [m["bare"]])[report.CHECKPOINT_ROW][1] == "<= 2% of an epoch: not met"


def test_the_system_metrics_row_is_the_difference_of_the_medians_judged_against_its_target():
    measured = measurements()["system_metrics"]
    result, target, detail = report.system_metrics_row(measured)[report.SYSTEM_METRICS_ROW]
    assert (result, target) == ("+0.10 s", "<= 0.2 s: met")  # medians 8.1 and 8.0
    assert "every 5 s, 2 logged a run" in detail and "medians 8.10 / 8.00 s of 3 each" in detail
    slower = measured | {"with_s": [8.5, 8.4, 8.6]}
    assert report.system_metrics_row(slower)[report.SYSTEM_METRICS_ROW][:2] == ("+0.50 s", "<= 0.2 s: not met")


def test_a_phase_missing_from_the_profile_is_named_in_its_row():
    m = measurements()
    m["profile"]["missing"] = dict.fromkeys(phases.PHASES, []) | {"model, optimizer": ["mnist_sweep.run.build"]}
    rows = report.phase_rows({"existing": m["profile"], "fresh": m["profile"]}, {"existing": 4.0, "fresh": 6.0})
    assert rows["overhead phase: model, optimizer"][2].endswith("; not in the profile: mnist_sweep.run.build")
    assert rows["overhead phase: data"][0] == "11% ~0.4 s / 11% ~0.7 s"  # 0.5 s of 4.5 s profiled
    assert "not in the profile" not in rows["overhead phase: data"][2]


def growth_measurements(report_s: dict[int, float]) -> dict:
    """What the growth section hands back, with the later reports taking ``report_s`` at each size
    and every other call 5 ms, 3 statements (figures made up)."""
    def calls(n: int) -> dict:
        return {name: {"s": report_s[n] if name == "report" else 0.005, "statements": 3, "sql_s": 0.002}
                for name in report.GROWTH_CALLS}
    sizes = {n: {"calls": calls(n), "reports": 16, "db_cpu_s": 0.5, "db_cpu_tick_s": 0.01, "heartbeat_s": 10,
                 "fill_s": 1.0, "trials": n} for n in report_s}
    return {"study": sizes, "tracking": {"s": 0.8, "requests": 30, "server_cpu_s": 0.3, "db_cpu_s": 0.1}}


def test_the_soak_rows_are_exactly_its_table_labels_and_judge_the_trials_lost_and_what_outages_cost():
    from mnist_sweep.soak import Figures

    figures = Figures(minutes=5.0, started=62, states={"COMPLETE": 50, "PRUNED": 10, "FAIL": 2}, trials_per_min=12.0,
                      faults_planned=6, faults_injected=6, faults_survived=6, failed=2, trials_lost=0, restarts=9)
    rows = report.soak_rows([], figures)
    assert set(rows) == set(report.SOAK_ROWS)
    assert rows["soak: trials lost"][1] == "0: met" and rows["soak: invariants"][0] == "all hold"
    lost = report.soak_rows(["trial 3 is RUNNING at the end"], Figures(**{**vars(figures), "trials_lost": 1}))
    assert lost["soak: trials lost"][1] == "0: not met" and lost["soak: invariants"][0] == "1 violated"
    outages = ("soak: workers ended by an outage", "soak: trials restarted by an outage",
               "soak: complete trials with an incomplete run")
    assert [rows[label][:2] for label in outages] == [("0", "0: met")] * 3
    costly = report.soak_rows([], Figures(**{**vars(figures), "outage_exits": 12, "restarted": 8, "incomplete": 4}))
    assert [costly[label][:2] for label in outages] == [("12", "0: not met"), ("8", "0: not met"), ("4", "0: not met")]
    assert list(table_rows(report.table(MACHINE, "cmd", report.SOAK_ROWS, rows))) == list(report.SOAK_ROWS)


def test_the_growth_rows_are_exactly_its_table_labels_and_judge_the_growth():
    rows = report.growth_rows(growth_measurements({100: 0.001, 1000: 0.002, 5000: 0.01}))
    assert set(rows) == set(report.GROWTH_ROWS)
    assert set(report.growth_rows("PostgreSQL is not installed")) == set(rows)
    label = f"study growth: {report.GROWTH_CALLS['report']}"
    assert rows[label][0] == "100: 1.0 ms; 1,000: 2.0 ms; 5,000: 10.0 ms"
    assert rows[label][1].endswith(": met")  # 5x the time for 5x the trials, under 100 ms
    faster = report.growth_rows(growth_measurements({100: 0.001, 1000: 0.002, 5000: 0.011}))
    assert faster[label][1].endswith(": not met")  # 5.5x the time for 5x the trials
    slow = report.growth_rows(growth_measurements({100: 0.1, 1000: 0.1, 5000: 0.12}))
    assert slow[label][1].endswith(": not met")  # past 100 ms at 5,000
    # a trial: 9 calls of 3 statements (heartbeats apart) and 15 more reports; in a minute, 12
    # heartbeats (its job's and its sweeper's), each a statement of 0.5 s / 72: 60 s / (0.5 + 12 * 0.5 / 72) s
    assert rows["study growth: database per trial"][0] == "72 statements, 500 ms PostgreSQL CPU"
    assert rows["study growth: workers one PostgreSQL carries"][0].startswith(f"{60 / (0.5 + 12 * 0.5 / 72):,.0f} ")
    assert rows["tracking server: workers it carries"][0] == "150 for 1-min trials, 1,500 for 10-min trials"


def test_a_trial_whose_database_cpu_is_under_a_clock_tick_is_bounded_by_the_tick_not_divided_by_zero():
    measured = growth_measurements({100: 0.001, 1000: 0.002})
    measured["study"][1000]["db_cpu_s"] = 0.0  # /proc counts CPU in ticks: a cheap trial can read as none
    rows = report.growth_rows(measured)
    assert rows["study growth: database per trial"][0] == "72 statements, < 10 ms PostgreSQL CPU"
    assert rows["study growth: workers one PostgreSQL carries"][0].startswith(
        f"> {60 / (0.01 + 12 * 0.01 / 72):,.0f} for 1-min trials")


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


# ----------------------------------------------------------------------------- the study's growth


def test_synthetic_trials_report_at_the_steps_a_job_reports_at(tmp_path):
    space, pruner, _, checks = growth.search_config()
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'optuna.db'}"), direction="maximize",
                                pruner=pruner)
    for epochs in (2, 8):
        job = JobTrial(study, study.ask().number, study._storage, None, "test_acc", epochs, checks)
        for step in range(1, epochs * (checks + 1) + 1):
            job.report_check(step, 0.99)
        assert list(study.trials[-1].intermediate_values) == growth.percents(epochs, checks)


def test_a_filled_study_holds_finished_trials_of_the_default_search(local_stack, monkeypatch):
    """~20-30 s when loaded: 30 synthetic trials written to the session's PostgreSQL, a few round trips each."""
    monkeypatch.setenv("PGPASSFILE", str(local_stack.pgpass))
    space, pruner, _, checks = growth.search_config()
    name = f"growth-{uuid.uuid4().hex}"
    study = optuna.create_study(study_name=name, storage=open_storage(local_stack.optuna_storage),
                                direction="maximize", pruner=pruner)
    growth.fill(study, 30, space, checks, np.random.default_rng(0))
    growth.fill(study, 40, space, checks, np.random.default_rng(1))  # to 40: 10 more
    trials = optuna.load_study(study_name=name, storage=local_stack.optuna_storage).get_trials()  # as stored
    assert len(trials) == 40
    assert {t.state for t in trials} == {TrialState.COMPLETE, TrialState.PRUNED}
    for t in trials:
        assert {n: type(d) for n, d in t.distributions.items()} == {n: type(d) for n, d in space.items()}
        assert all(d._contains(d.to_internal_repr(t.params[n])) for n, d in space.items())
        steps, reported = growth.percents(t.params["epochs"], checks), list(t.intermediate_values)
        if t.state == TrialState.COMPLETE:
            assert reported == steps and t.value == t.intermediate_values[100]
        else:  # pruned at a check past the pruner's warm-up
            assert reported == steps[:len(reported)] and reported[-1] >= pruner._n_warmup_steps


# ----------------------------------------------------------------------------- end to end


def bench_out(tmp_path):
    """The bench's --out, its store a copy of the session's empty one (a new one's schema takes seconds)."""
    out = tmp_path / "bench"
    out.mkdir()
    shutil.copy(shared("mlflow_schema"), out / "mlflow.db")
    return out


# What each kind of row's result looks like: a row under another's label would not match
RESULTS = [
    (r"time to 99\.0%$|^import torch|--help$|process, |bare training loop|framework overhead, ",
     r"^(\d+\.\d s|not reached)"),
    (r"^time to 99\.0%, ", r"^(n/a|\d\.\d{3}x)$"),
    (r"^overhead phase: ", f"^{report.QUICK_SKIPS}$"),  # the profiles: their phases are tested in-process above
    (r"^sweep: overhead per trial$", r"^(-?\d+\.\d\d s|n/a)$"),  # n/a: a quick sweep has 2 trials
    (r"sweep, ", r"^(\d+\.\d trials/min|n/a)$"),
    (r"^tracking one trial", r"^(\d+\.\d\d s|n/a)$"),
    (r"^search, pruner (none|median)$", r"^\d+ s, best "),
    (r"^wall time saved by median", r"^(-?\d+% less, best [+-]\d+\.\d\d pt|n/a)$"),
    (r"pruner hyperband$|by hyperband pruning$", f"^{report.QUICK_SKIPS}$"),  # tests/test_search.py runs it
    (r"^GPU: ", r"^(no GPU|\d+\.\d s)"),
    (r"^augment=", r"^\d+\.\d\d s of warps$"),
    (r"^model costs: ", r"^\d+\.\d{3} (ms|s)$"),
    (r"^checkpoint: ", r"^\d+\.\d ms, \d+\.\d\d% of an epoch$"),
    (r"^system metrics: ", r"^[+-]\d+\.\d\d s$"),
]


@pytest.mark.slow
def test_quick_benchmark_prints_and_writes_the_whole_table(overrides, local_stack, tmp_path):
    """~2 min: a dozen processes (runs, sweeps, the classic recipe), each a second import of torch and
    MLflow; the shared-store rows on the session's servers (--services), no profiles (--quick)."""
    out = bench_out(tmp_path)
    done = run_cli("mnist_sweep.bench", "--quick", "--services", str(local_stack.root), "--out", str(out), "--",
                   *overrides, timeout=600)
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
    assert table.count("2 of 2 trials completed") == 4  # both embedded sweeps, both on the shared stores
    assert runs_in(tmp_path / "outputs") == []  # bench runs stay in the bench's store


@pytest.mark.slow
def test_quick_growth_benchmark_times_every_call_at_each_size(overrides, local_stack, tmp_path):
    """~25-50 s: the bench's process, its study filled to each quick size on the session's PostgreSQL."""
    out = bench_out(tmp_path)
    done = run_cli("mnist_sweep.bench", "--quick", "--growth", "--services", str(local_stack.root), "--out", str(out),
                   "--", *overrides, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = table_rows((out / "latest.md").read_text())
    assert list(rows) == list(report.GROWTH_ROWS)
    sizes = "; ".join(f"{n}: " + r"\d+\.\d ms" for n in growth.QUICK_SIZES)
    for label in report.GROWTH_ROWS:
        result, _, detail = rows[label]
        if label.startswith("study growth: ") and label[len("study growth: "):] in report.GROWTH_CALLS.values():
            assert re.fullmatch(sizes, result), (label, result)
            assert re.match(r"SQL statements [1-9]\d* / [1-9]", detail), (label, detail)  # each call reaches the study
        else:
            assert re.match(r"([<>] )?[1-9][\d,]* ", result), (label, result)  # < or >: under a clock tick


@pytest.mark.slow
def test_quick_search_benchmark_compares_the_default_sampler_with_and_without_the_prior(overrides, tmp_path):
    """~1 min: two 2-trial sweeps, each its own process and at most 15 s of trials (the default
    sampler, with and without the prior; --quick skips the other samplers' searches, which
    tests/test_search.py runs). The model's size is left to the search: the prior's points name it,
    and a point whose key the command line fixes is an error."""
    out = bench_out(tmp_path)
    searched = [o for o in overrides if not o.startswith(("model.channels=", "data.batch_size=", "epochs="))]
    done = run_cli("mnist_sweep.bench", "--quick", "--search", "--out", str(out), "--", *searched,
                   "mlflow.model_format=null", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = table_rows((out / "latest.md").read_text())
    assert list(rows) == list(report.SEARCH_ROWS)
    others = [label for name, label in report.SAMPLER_ROWS.items() if name != "tpe"]
    assert {rows[label][0] for label in others} == {report.QUICK_SKIPS}
    for label in (report.SAMPLER_ROWS["tpe"], report.PRIOR_ROW):
        result, _, detail = rows[label]
        assert re.fullmatch(r"best \d+\.\d\d%; 99\.5% at (\d+\.\d s|not reached)", result), (label, result)
        seed = r"(^|; )seeds 0: [12] trials, \d pruned; first at >= 99\.5%: trial [01-]$"
        assert re.search(seed, detail), (label, detail)
    assert rows[report.PRIOR_ROW][2].startswith("against prior none (sampler tpe, the same seeds), medians: best ")
    for label in report.ASK_ROWS.values():
        assert re.fullmatch(r"10 trials: \d+\.\d\d s; 40 trials: \d+\.\d\d s", rows[label][0]), (label, rows[label])
    result, target, detail = rows[report.DEFAULT_TARGET_ROW]
    assert re.match(r"\d+\.\d\d% in ", result) and target.startswith(">= 99.50%: ") and "augment=" in detail
    storage = open_storage(f"sqlite:///{out / 'optuna.db'}")
    (prior,) = [name for name in optuna.get_all_study_names(storage) if name.endswith("-tpe-known_good-0")]
    points = OmegaConf.to_container(compose(["hydra/sweeper/prior=known_good"], with_hydra=True).hydra.sweeper.enqueue)
    ran = [t.params for t in optuna.load_study(study_name=prior, storage=storage).trials]
    assert ran and ran == points[:len(ran)]  # the prior's points were its first trials


@pytest.mark.slow
def test_quick_long_search_benchmark_runs_each_target_search(overrides, tmp_path):
    """~30-75 s: the bench's process and one 2-trial sweep process per long search target."""
    out = bench_out(tmp_path)
    done = run_cli("mnist_sweep.bench", "--quick", "--long-search", "--out", str(out), "--", *overrides, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = table_rows((out / "latest.md").read_text())
    assert list(rows) == list(report.LONG_SEARCH_ROWS)
    for label, (result, target, detail) in rows.items():
        assert re.match(r"\d+\.\d\d% ", result) and target.startswith(">= "), (label, result)
        assert detail.startswith("2 trials, ") and "augment=" in detail, (label, detail)  # its best trial's config
    assert "(chosen on val_acc " in rows[report.LONG_SEARCH_ROWS[-1]][0]  # the test accuracy of its val choice


def ten_minutes(seed: int, best: float, to_floor_s: float | None, trial: int | None) -> dict:
    """One 10-minute search of --search, as its section hands it back (figures made up)."""
    return {"seed": seed, "best": best, "best_test": best, "to_floor_s": to_floor_s, "floor_trial": trial,
            "trials": 8, "pruned": 4, "seconds": 612.0, "best_params": {"model": "deep", "augment": "shift"}}


def test_the_search_rows_are_exactly_its_labels_with_each_configurations_median_and_range():
    assert set(report.SAMPLERS) == set(options("hydra/sweeper/sampler"))  # every option is compared, and only those
    reached = [ten_minutes(0, 0.9955, 300.0, 4), ten_minutes(1, 0.9961, 200.0, 3), ten_minutes(2, 0.9958, 250.0, 5)]
    runs = {("tpe", "none"): reached, ("tpe_short", "none"): reached,
            ("gp", "none"): [*reached[:2], ten_minutes(2, 0.9940, None, None)],
            ("tpe", "known_good"): [ten_minutes(seed, 0.9962, 90.0, 0) for seed in (0, 1, 2)]}
    asks = {name: {10: [0.05, 0.07, 0.06], 40: [0.4, 0.5, 0.6]} for name in report.SAMPLERS}
    rows = report.search_rows(runs, ("tpe", "none"))
    assert set(rows | report.ask_rows(asks)) == set(report.SEARCH_ROWS)
    assert report.ask_rows(asks)["sampler gp: one ask"][0] == "10 trials: 0.06 s; 40 trials: 0.50 s"
    assert rows["10-minute search, sampler tpe"] == (
        "best 99.58% (median of 3, 99.55-99.61%); 99.5% at 250.0 s (median of 3, 200.0-300.0)", "",
        "seeds 0/1/2: 8/8/8 trials, 4/4/4 pruned; first at >= 99.5%: trial 4/3/5")
    gp = rows["10-minute search, sampler gp"]
    assert gp[0] == ("best 99.55% (median of 3, 99.40-99.61%); 99.5% at 250.0 s (median of 2, 200.0-300.0), "
                     "1 of 3 not reached")
    assert gp[2].endswith("trial 4/3/-")
    prior = rows["10-minute search, prior known_good"]
    assert prior[2].startswith("against prior none (sampler tpe, the same seeds), medians: best +0.04 pt, "
                               "99.5% reached -160 s; seeds 0/1/2: ")
    assert rows["search target: default -m, 10-minute budget"][:2] == ("99.55% in 10.2 min", ">= 99.50%: met")
    never = report.search_rows(runs | {("tpe", "none"): runs[("gp", "none")]}, ("tpe", "none"))
    assert "99.5% reached n/a" in never["10-minute search, prior known_good"][2]  # a seed without it never reached


def test_the_shipping_rows_judge_the_deadline_and_the_cheapest_model_at_each_floor():
    def search(seconds, budget, best=0.99, stopped=1):
        return {"seconds": seconds, "budget": budget, "best": best, "best_params": {}, "trials": 9, "pruned": 3,
                "stopped": stopped, "completed": 6}

    runs = {"deadline-300": search(355, 300), "deadline-600": search(671, 600), "soft-600": search(1478, 600),
            "pareto-param_count": {"points": [(0.995, 9000), (0.991, 2500), (0.98, 900)], "completed": 3,
                                   "seconds": 1210},
            "pareto-latency_ms": {"points": [(0.996, 0.3), (0.99, 0.1)], "completed": 2, "seconds": 1215},
            "default": {"model": "[16, 32, 64]", "param_count": 29178, "latency_ms": 0.4}}
    rows = report.shipping_rows(runs)
    assert set(rows) == set(report.SHIPPING_ROWS)
    assert rows["deadline search, timeout=300 s"][:2] == ("355 s, best 99.00%", "<= 360 s: met")
    assert rows["deadline search, timeout=600 s"][1] == "<= 660 s: not met"
    assert "+878 s past it" in rows["soft budget (finish_running), timeout=600 s"][2]
    params = rows["Pareto search by param_count, 20 min"]
    assert params[0] == ">= 99.0%: 2,500 params (0.09x default); >= 99.5%: 9,000 params (0.31x default)"
    assert params[1].endswith("at >= 99.0%: met")  # 2,500 of the default's 29,178
    latency = rows["Pareto search by latency_ms, 20 min"]
    assert latency[1] == "below the default's latency_ms at >= 99.5%: met"  # 0.3 ms against 0.4
    runs["pareto-latency_ms"]["points"] = [(0.99, 0.1)]
    assert report.shipping_rows(runs)["Pareto search by latency_ms, 20 min"][1].endswith(": n/a")  # none at 99.5%


def test_the_target_benchmark_times_only_the_two_recipes_and_judges_their_ratio_against_3_percent(
        overrides, tmp_path, monkeypatch):
    """``--target``, in-process, its processes replaced by what they report: the rows are exactly the
    time to 99.0%, each recipe's median, and their ratio judged against issue 24's 0.03×."""
    from mnist_sweep.bench import __main__ as cli, measure

    classic = iter([{"to_target_s": 300.0, "epochs": 3, "acc": 0.991, "images_per_s": 1000.0}])
    ours = iter([{"to_target_s": 8.0, "epochs": 1, "acc": 0.9911, "images_per_s": 9000.0}])
    # one process of each recipe a repeat: no fresh-store run, no imports (StopIteration or a failure if any)
    monkeypatch.setattr(measure, "time_classic", lambda root, epochs: next(classic))
    monkeypatch.setattr(measure, "time_run", lambda args, stores, experiment: next(ours))
    monkeypatch.setattr(measure, "time_imports", lambda: pytest.fail("--target timed the imports"))
    out = bench_out(tmp_path)
    assert cli.main(["--target", "--repeats", "1", "--out", str(out), "--", *overrides]) == 0
    rows = table_rows((out / "latest.md").read_text())
    assert list(rows) == list(report.TARGET_ROWS)
    assert rows["time to 99.0%, mnist_sweep / classic"][:2] == ["0.027x", "<= 0.03x: met"]


def test_the_per_trial_overhead_is_the_median_trial_so_a_leaders_export_does_not_move_it():
    """Issue 24's measure: the median of trials 2.. of the 1-worker sweep; the mean stays beside it."""
    trials = [{"span_s": 6.2, "fit_s": 6.0, "model": False}, {"span_s": 6.25, "fit_s": 6.0, "model": False},
              {"span_s": 6.9, "fit_s": 6.0, "model": True}]
    result, target, detail = report.trial_row(trials)
    assert (result, target) == ("0.25 s", "<= 0.3 s: met")
    assert "(mean 0.45 s)" in detail and "0.90 s (full model)" in detail
