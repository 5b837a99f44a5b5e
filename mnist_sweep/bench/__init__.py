"""``python -m mnist_sweep.bench``: how fast mnist_sweep reaches 99.0% MNIST test accuracy next to the
classic PyTorch example, what the framework costs per run, and how many sweep trials a minute run.
``make bench`` runs it; ``--quick`` is CI's smoke test: it proves the benchmark runs, never a speed.

What is measured, and how (wall-clock seconds; medians over ``--repeats``):

1. Time to 99.0%, both recipes as whole processes timed from spawn, so each pays its own interpreter
   start, imports and data setup; repeats alternate classic, mnist_sweep, classic, ...
   - classic (``classic``): pytorch/examples ``mnist/main.py`` as written: a DataLoader doing
     per-sample ToTensor + Normalize (batch 64, shuffled), the two-conv Net with dropout, Adadelta
     lr 1.0 with StepLR gamma 0.7, a test pass after every epoch. Its child process
     (``python -m mnist_sweep.bench.classic``, which imports only what the example imports) stops at
     the first epoch that reaches 99.0%, or at the example's 14 epochs, and prints when each test
     pass ended; CLOCK_MONOTONIC is shared by processes, so that instant minus the spawn is its time
     to 99.0%.
   - mnist_sweep: ``python -m mnist_sweep`` with the default config, spawn to exit. Its time to 99.0%
     thus includes the MLflow logging and model export after training (a bias against it). Final
     accuracy and images/s come from its MLflow run.
2. Overhead per run: that process time minus its own training and evaluation (the run's
   ``epoch_seconds`` and ``eval_seconds``, as ``train.fit`` timed them: an epoch's time varies between
   processes, which a difference of medians would count as overhead), on the bench's existing store
   (made untimed at setup) and for a first run on a fresh store (a new sqlite file each repeat:
   MLflow creates its schema). Beside it, the bare loop on the same config, run in this process
   (``tensors.load`` and ``run.build`` untimed, then ``train.fit`` timed: train + test), and the
   process time less it. Its floor: ``python -c "import torch"``, spawn to exit; next to it
   ``python -m mnist_sweep --help``: every import a run makes and Hydra's config, no run. Targets:
   overhead <= import torch + 1.5 s (existing store), + 3 s (fresh store).
   Where it goes (``phases``): one more run of each kind under cProfile (``python -m cProfile -m
   mnist_sweep``), split into phases, each the sum of the cumulative times of the public functions
   it consists of (the training loop itself, ``train.fit`` less its MLflow records, is left out).
   cProfile inflates Python-heavy phases (imports, MLflow, SQLAlchemy) far more than training's C++
   kernels, so the table gives each phase's share of the profiled overhead and, scaled by that
   share, an estimate of its seconds in the uninstrumented overhead above.
   Per sweep trial: in the 1-worker sweep of 3., a trial's span is from its start (``datetime_start``,
   when the sweeper asked for it) to the next trial's, minus its training and evaluation (the run's
   ``epoch_seconds`` and ``eval_seconds`` metrics); the first trial (it pays the process's one-time
   costs) and the last (no next start) are left out; the row is their median (the mean beside
   it). Target: <= 0.3 s.
   Model costs (``model costs``): the ``latency_ms`` every run logs (:mod:`mnist_sweep.costs`: the
   median of up to 50 passes at batch 1 on one CPU thread after 5 warm-up passes, within 0.1 s),
   measured 20 times in a row on the default model in this process: their median, their range as
   a share of it (the metric's noise between runs), the median IQR of one measurement's passes
   (its noise within, logged as ``latency_ms_iqr``), and the seconds ``costs.measure`` adds to a run
   (target <= 0.1 s). Its share of a profiled run is the ``model costs`` phase.
   System metrics (``system metrics``): the default run's training in this process, inside a tracked
   run started and ended around it, with MLflow's system metrics (``mlflow.system_metrics_interval``)
   and without, alternating after an untimed pair; their cost to a one-epoch run is the difference
   of the medians (the monitor's samples take the GIL now and then, and ``end_run`` joins its
   thread). Target: <= 0.2 s.
   ``--overhead`` runs only these measurements.
3. Sweep throughput: completed trials per minute of a small Optuna sweep (8 trials of one size: a
   1-epoch model=shallow run; no pruner; spawn to exit), first 1 worker x 2 threads, then joblib with
   2 workers x 1 thread.
4. Pruning: the same seeded search (model=shallow, 2 epochs a trial, the rest of the default
   space, 10 trials) once per pruner (none, median, hyperband), spawn to exit: wall time, best test
   accuracy, trials pruned. Target: a pruner saves >= 35% of the wall time for the same best
   accuracy (within 0.05 pt).
5. Shared stores (``make services``' PostgreSQL and MLflow server, started on free loopback ports
   in a directory of the bench's own, stopped at the end): the sweep of 3. with ``stores=server``,
   first one worker process, then 2 worker processes started together (threads=1 each) sharing the
   study; and what tracking one trial costs, embedded sqlite against the server over HTTP: the
   records of a run (params, datasets, an epoch's metrics and checks, config files, weights, the
   pt2 model, its costs linked to it) without its training, in this process, median over
   ``--repeats`` after a warm-up.
6. With CUDA the bare loop runs on the GPU after one warm-up fit; its fit time is the GPU's time to
   99.0% after warm-up.
7. Augmentation: one epoch of the bare loop per ``augment`` option, and the seconds its warps alone
   take over an epoch's batches.
8. ``--search`` runs only the samplers' comparison on the default search with a 10-minute budget
   (``hydra.sweeper.timeout=600``), spawn to exit on the real data, on a fresh study each: every
   option of ``hydra/sweeper/sampler`` (tpe, tpe_short, gp) without a prior, and the default sampler
   with ``hydra/sweeper/prior=known_good``, each over ``--repeats`` sampler seeds from search.yaml's
   (seed by seed, each seed's configurations one after the other). A row gives the median and range
   of the best trial's test accuracy, and of the time from the sweep's spawn to the first finished
   trial at >= 99.5% (its ``datetime_complete``; "not reached" when none); the prior's row gives the
   shift of both medians against the default sampler without it (the same runs as that sampler's
   row). The default configuration's first seed is exactly ``-m hydra.sweeper.timeout=600``: its
   best trial is the 10-minute target row (>= 99.5% test accuracy), with its config. First, in this
   process, each sampler's ask (the trial and its params, as the sweeper asks) on a sqlite study of
   synthetic finished trials of the default search (``growth.fill``) at 10 and 40 trials: GPSampler
   fits its Gaussian process at every ask. About 2 h 10 min.
   ``--long-search`` runs only the long search targets, one after the other, each the command
   docs/sweeps.md gives, spawn to exit on the real data: ``hydra/sweeper=long`` (>= 99.65%), and the
   same with ``data.val_size=5000``, whose best trial is chosen on val_acc and reported on test
   (>= 99.6%). Each row names its best trial's config. About 1 h 30 min.
9. ``--growth`` runs only the study's cost as it grows, on a PostgreSQL and an MLflow server of the
   bench's own (as in 5.): a study is filled with synthetic finished trials of the default search
   (``growth``: its space as the sweeper parses it, a report at every percent step a job reports
   at, COMPLETE and PRUNED ones), and at 100, 1,000 and 5,000 trials (``--quick``: 10 and 50)
   ``--repeats`` trials run through the product's own calls: the sweeper's per-batch work
   (``fail_stale_trials``, ``fail_abandoned``, ``room``), its ask (the configured TPE sampler), the
   job's join, heartbeat, every report of a 4-epoch trial (report + the configured median pruner),
   ``leads`` and its tell, then ``record_returns``; medians per call, with the SQL statements each
   makes (SQLAlchemy's cursor events) and their time. Target: <= 100 ms a call at 5,000 trials,
   growing no faster than the study. At the largest size, one trial's load on PostgreSQL: its
   statements and the server's CPU seconds (its processes' CPU time in /proc, the ended backends
   included), and from it the workers one server core carries for trials of 1 and 10 minutes
   (heartbeats included); likewise the tracking server: one trial's records as 5. times them, the
   HTTP requests they make and the CPU they cost the server and its database.
10. ``--soak`` runs only the soak (``make soak``, :mod:`mnist_sweep.soak`: 3 workers, 60 tiny trials,
    a worker killed and both servers restarted, in a directory of its own, up to 20 minutes; with
    ``--quick``, 2 workers, 6 trials, one fault of each kind): faults injected and survived, trials
    lost (target 0), trials/min under faults, and whether every invariant held. Only when asked: a
    full bench would grow by up to 20 minutes, and the soak's trials/min measures resilience, not speed.
11. ``--shipping`` runs only the model a user would ship, spawn to exit on the real data: the
    default search with a deadline (``hydra.sweeper.timeout``) of 300 and 600 s, its wall time
    against the budget (target <= T + 60 s) and its best trial (the product's choice: completed, or
    stopped by the deadline); the 600 s budget again with ``finish_running=true`` (the soft budget);
    then a 20-minute ``hydra/sweeper=pareto`` search per ``sweep.cost``: the cheapest completed model
    at >= 99.0% and >= 99.5%, against the default model's parameters and CPU latency (``costs``).
    Targets: >= 99.0% with <= 1/10 of the default's parameters; >= 99.5% below its latency.
    (``--quick``: budgets of 20 and 30 s on the tiny data.)

Bench runs go to the experiment ``bench`` in a store of their own, ``<out>/mlflow.db``: a sweep
registers its best model, and a benchmark must not move the project's @champion. docs/benchmark.md
holds the tables with their dates and machines; the README, the current headline.

The package: ``__main__`` (the command line), ``classic`` (the classic recipe, its own process),
``timers`` (processes and sweeps, spawn to exit), ``inprocess`` (the bare loop, warps, tracking),
``phases`` (a profile split into phases), ``growth`` (a study of synthetic trials, the product's
calls on it), ``measure`` (the sections, in order), ``report`` (the table, rows keyed by label).
Nothing is imported here: the classic child imports this package.
"""
