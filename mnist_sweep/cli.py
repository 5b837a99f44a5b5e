"""What every command-line tool shares: how its process starts and ends, and its one-line errors.

The tools are ``python -m mnist_sweep`` and ``python -m mnist_sweep.<data|evaluate|predict|viewers|
stack>``. Each calls :func:`defer_collection` before its imports and :func:`run` at the bottom.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn


def defer_collection(module: str) -> None:
    """No cyclic garbage collection while the program ``module`` imports (only when it runs as
    ``__main__``: importing it, as the tests do, changes nothing).

    A tool's process imports hundreds of thousands of objects (torch, MLflow, Hydra) that live until
    it exits; the collector would walk them all at each full collection, and again at exit.
    """
    if module == "__main__":
        gc.disable()


def run(tool: Callable[[list[str]], int | None]) -> NoReturn:
    """Run ``tool(argv)`` as this process's program and exit with its status: freeze what was
    imported (a trial's own garbage is still collected), and freeze again before the interpreter's
    last collection. An error is one ``error:`` line and status 1; Ctrl-C is status 130."""
    gc.freeze()
    gc.enable()
    try:
        status = tool(sys.argv[1:])
    except KeyboardInterrupt:
        status = 130
    except Exception as err:  # noqa: BLE001 - a user reads one line, not a traceback
        from mnist_sweep.stores import one_line  # only now: it imports SQLAlchemy

        print(f"error: {one_line(err)}", file=sys.stderr)
        status = 1
    finally:
        gc.freeze()
    sys.exit(status)


@contextlib.contextmanager
def freeze_late_imports() -> Iterator[None]:
    """Around a job (a run, or one trial of a sweep): if it imported modules, freeze them once it
    ends, as :func:`run` froze the program's own imports (and a joblib worker, which never did,
    freezes all of its). A job imports some lazily: torch._dynamo when its optimizer is built, the
    exporter for its first model, hundreds of thousands of objects that a sweep's full collections
    would walk again and again (~90 ms each, in most trials: docs/benchmark.md). What the job left
    for the collector is frozen with them, but only in the jobs that imported something: once or
    twice a process."""
    modules = len(sys.modules)
    try:
        yield
    finally:
        if len(sys.modules) > modules:
            gc.freeze()


@contextlib.contextmanager
def one_line_errors(*kinds: type[BaseException], writes: Sequence[Path] = ()) -> Iterator[None]:
    """Inside a Hydra job: one of ``kinds`` ends the process with its message as one ``error:``
    line (the message says what to change), where Hydra would print a traceback. So does any error
    a full disk caused, naming the fullest disk among ``writes`` (where the job writes)."""
    from mnist_sweep import stores  # only now: it imports SQLAlchemy

    try:
        yield
    except kinds as err:
        raise SystemExit(f"error: {stores.one_line(err)}") from None
    except Exception as err:
        if not stores.disk_full(err):
            raise
        raise SystemExit(f"error: {stores.disk_full_message(writes)}") from None
