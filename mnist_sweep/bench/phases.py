"""Where a run's overhead goes: ``python -m mnist_sweep`` under cProfile, split into phases.

A phase is named by what it consists of: the public functions (mnist_sweep's entry points, MLflow's,
Hydra's) whose cumulative profiled times add up to it. Each dotted name resolves to the code the
profile names, so a function that moves is followed, one that is gone fails at the start, and one
the run no longer calls is said in the table, never counted as zero silently.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import pstats
from collections.abc import Mapping
from pathlib import Path

Key = tuple[str, int | None, str]  # as pstats keys a function: (file, first line, name); None: any line

TOTAL = "the whole profile"
HYDRA_JOB = "hydra.main"  # the function hydra.main wraps our task in: Hydra's whole job
# Each phase: terms whose cumulative seconds add up to it, "-" before one that is subtracted.
PHASES = {
    # all that runs outside Hydra's job: interpreter start, module imports, exit
    "imports": (TOTAL, f"-{HYDRA_JOB}"),
    # what Hydra does around our task (composing the config, the job's directory and logging)
    "config (Hydra, validate)": (HYDRA_JOB, "-mnist_sweep.run.main", "mnist_sweep.config.validate"),
    "data": ("mnist_sweep.data.prepare", "mnist_sweep.tensors.load", "mnist_sweep.data.datasets"),
    "store (open or create)": ("mnist_sweep.tracking.use_store",),
    "model, optimizer": ("mnist_sweep.run.build",),
    "run start": ("mlflow.start_run", "mlflow.log_params", "mnist_sweep.tracking.describe_run",
                  "mnist_sweep.tracking.log_config", "mnist_sweep.tracking.log_datasets"),
    "per-epoch records": ("mnist_sweep.tracking.log_epoch",),  # a run outside a study logs no checks
    "model logging": ("mnist_sweep.tracking.log_outputs",),
    "model costs": ("mnist_sweep.costs.measure", "mnist_sweep.tracking.log_costs"),  # cProfile slows its passes
    "run end": ("mlflow.end_run",),
}
# The profiled overhead, which the phases share: all but the training loop (less the records it makes)
OVERHEAD = (TOTAL, "-mnist_sweep.train.fit", "mnist_sweep.tracking.log_epoch")
# Inside some phases, the costs docs/benchmark.md explains: phase -> {label: function or module}.
# They may be absent from a profile (a fresh store creates its schema, an existing one checks it).
DETAILS = {
    "store (open or create)": {"schema creation": "mlflow.store.db.utils._initialize_tables",
                               "schema check": "mlflow.store.db.utils._verify_schema"},
    "model, optimizer": {"import torch._dynamo": "torch._dynamo"},
    "model logging": {
        "mlflow.pytorch.log_model": "mlflow.pytorch.log_model",
        "its requirements check": "mlflow.utils.requirements_utils.warn_dependency_requirement_mismatches",
        "its torch.export": "torch.export.export",
    },
}


def key_of(function, unwrap: bool = True) -> Key:
    """The profile's key of ``function``; ``unwrap``: of the function under its decorators, which is
    what does the work."""
    code = (inspect.unwrap(function) if unwrap else function).__code__
    return os.path.realpath(code.co_filename), code.co_firstlineno, code.co_name


def code_key(name: str) -> Key:
    """The profile's key of the function, or a module's top-level code, that ``name`` (dotted) names."""
    if name == HYDRA_JOB:
        import hydra

        return key_of(hydra.main(version_base="1.3", config_path=None)(lambda cfg: None), unwrap=False)
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # a function in a module, not a module of a package
        spec = None
    if spec is not None and spec.origin:
        return os.path.realpath(spec.origin), None, "<module>"
    module, _, attribute = name.rpartition(".")
    return key_of(getattr(importlib.import_module(module), attribute))


def resolve(names: set[str] | None = None) -> dict[str, Key]:
    """Every name the phases, the overhead and the details use, as profile keys; a ValueError names
    one that no longer exists (the phases need updating to where it went)."""
    if names is None:
        terms = [*(t for terms in PHASES.values() for t in terms), *OVERHEAD]
        names = {t.lstrip("-") for t in terms} | {n for details in DETAILS.values() for n in details.values()}
    keys = {}
    for name in sorted(names - {TOTAL}):
        try:
            keys[name] = code_key(name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"the overhead phases name {name}, which is gone ({err}): "
                             f"update {Path(__file__).name}") from None
    return keys


def cumulative(stats: Mapping[Key, tuple]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(file, function) -> each (first line, cumulative seconds) that pstats' ``stats`` hold for it
    (key -> (.., .., own s, cumulative s, ..)), files as real paths like :func:`code_key`'s."""
    real = functools.lru_cache(maxsize=None)(os.path.realpath)
    found: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for (file, line, name), value in stats.items():
        found.setdefault((real(file), name), []).append((line, value[3]))
    return found


def seconds_of(found: Mapping[tuple[str, str], list[tuple[int, float]]], key: Key) -> float | None:
    """``key``'s cumulative seconds; None if the profile never ran it."""
    file, line, name = key
    times = [seconds for at, seconds in found.get((file, name), ()) if line is None or at == line]
    return sum(times) if times else None


def split(stats: Mapping[Key, tuple], total: float, keys: Mapping[str, Key]) -> dict:
    """A profile (``stats``, its ``total`` seconds) split: ``phases`` (name -> seconds), ``details``
    (label -> seconds, 0 if absent), ``total`` (the profiled overhead), ``missing`` (phase -> the names
    it sums that the profile never ran or ``keys`` lacks, the overhead's included: every share depends
    on it)."""
    found = cumulative(stats)
    seconds = {name: seconds_of(found, key) for name, key in keys.items()} | {TOTAL: total}

    def add_up(terms: tuple[str, ...]) -> tuple[float, list[str]]:
        signed = [(-1 if term.startswith("-") else 1, term.lstrip("-")) for term in terms]
        return (sum(sign * (seconds.get(name) or 0.0) for sign, name in signed),
                [name for _, name in signed if seconds.get(name) is None])

    overhead, overhead_missing = add_up(OVERHEAD)
    phases = {name: add_up(terms) for name, terms in PHASES.items()}
    return {
        "phases": {name: value for name, (value, _) in phases.items()},
        "details": {label: seconds.get(n) or 0.0 for details in DETAILS.values() for label, n in details.items()},
        "total": overhead,
        "missing": {name: sorted(set(missing + overhead_missing)) for name, (_, missing) in phases.items()},
    }


def read(profile: Path, keys: Mapping[str, Key]) -> dict:
    """A profile file that cProfile wrote, split as :func:`split` does."""
    stats = pstats.Stats(str(profile))
    return split(stats.stats, stats.total_tt, keys)
