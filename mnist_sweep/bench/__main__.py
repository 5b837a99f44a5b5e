"""``python -m mnist_sweep.bench``: the benchmark's command line (what it measures: the package's docstring)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mnist_sweep.bench", description="Time to 99.0% against the "
                                     "classic recipe, framework overhead, sweep throughput (see the docstring).")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 repeat, 1 classic epoch, 2 trials per sweep, no profiles (proves it runs, "
                             "not speed)")
    parser.add_argument("--overhead", action="store_true",
                        help="only the framework's overhead: imports, runs on an existing and a fresh store, their "
                             "profiles, the bare loop, per-trial overhead in a 1-worker sweep (minutes)")
    parser.add_argument("--target", action="store_true",
                        help="only the time to 99.0%%: the classic recipe and python -m mnist_sweep, alternating, "
                             "--repeats times (about 5 minutes a repeat)")
    parser.add_argument("--search", action="store_true",
                        help="only the 10-minute default search with each sampler (hydra/sweeper/sampler: tpe, "
                             "tpe_short, gp), and the default sampler with the prior known_good, each over --repeats "
                             "seeds (3: 12 searches, about 2 h 10 min); the default's first seed is its target row")
    parser.add_argument("--long-search", action="store_true",
                        help="only the long search targets: hydra/sweeper=long, and with data.val_size=5000 "
                             "(about 1 h 30 min)")
    parser.add_argument("--growth", action="store_true",
                        help="only the study's cost as it grows: the product's calls on a PostgreSQL study of 100, "
                             "1,000 and 5,000 trials, and what one trial costs the database and the tracking server")
    parser.add_argument("--soak", action="store_true",
                        help="only the soak (make soak): 3 workers, 60 tiny trials, faults injected; its figures "
                             "(up to 20 minutes; with --quick a short schedule)")
    parser.add_argument("--shipping", action="store_true",
                        help="only the model a user would ship: the default search against a deadline of 300 and "
                             "600 s and the soft budget, then a 20-minute Pareto search per cost (about 65 minutes)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="times each recipe runs (alternating), and --search's seeds per configuration; default 3")
    parser.add_argument("--services", type=Path, metavar="ROOT",
                        help="the PostgreSQL and MLflow server that `make services` runs under ROOT, for the shared-"
                             "store rows (default: servers of the bench's own, started and stopped)")
    parser.add_argument("--out", type=Path, help="where the table and the bench store go (default outputs/bench)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, after `--` (e.g. data.root=DIR)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from mnist_sweep.bench import measure, report
    from mnist_sweep.config import PROJECT_ROOT

    args = parse(argv)
    machine = report.machine_record()  # before set_threads changes this process's thread count
    bench = measure.setup((args.out or PROJECT_ROOT / "outputs" / "bench").resolve(), args.overrides, args.quick,
                          args.repeats, args.services)
    if args.target:
        labels, rows = report.TARGET_ROWS, measure.time_to_target(bench)
    elif args.search:
        labels, rows = report.SEARCH_ROWS, measure.sampler_searches(bench)
    elif args.long_search:
        labels, rows = report.LONG_SEARCH_ROWS, measure.search_targets(bench)
    elif args.soak:
        labels, rows = report.SOAK_ROWS, report.soak_rows(*measure.soak(bench))
    elif args.shipping:
        labels, rows = report.SHIPPING_ROWS, report.shipping_rows(measure.shipping(bench))
    elif args.growth:
        labels, rows = report.GROWTH_ROWS, report.growth_rows(measure.study_growth(bench))
    else:
        labels = report.OVERHEAD_ROWS if args.overhead else report.ROWS
        rows = measure.overhead_and_more(bench, overhead_only=args.overhead)
    command = " ".join(["python -m mnist_sweep.bench", *(sys.argv[1:] if argv is None else argv)])
    report.write(report.table(machine, command, labels, rows), args.quick, bench.out, bench.stamp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
