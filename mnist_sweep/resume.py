"""``python -m mnist_sweep.resume run_id=ID [overrides]``: continue a single run that was killed
mid-way (kill -9, a lost machine, Ctrl-C) from its last epoch checkpoint, as the same MLflow run.

The run is looked up in this command's MLflow store (``paths.outputs=…``, ``stores=server``), and
trained on from the overrides it recorded as it started (as :mod:`mnist_sweep.reproduce` reads them,
with its threads) plus ``checkpoint.resume=ID``: the task then takes the run up again where its
checkpoint (``checkpoint.dir``) stands. Its status goes back to RUNNING, its metric history goes on
at the next epoch, its ``resumed`` tag says after which, and it ends as any run does. On the CPU with
the same seed and threads, it ends exactly as it would have, unkilled.

A run that finished, a study trial's run (its sweep continues it: ``hydra.sweeper.max_retry``), a run
still training, or one whose checkpoint is gone, is one ``error:`` line naming why.
"""

from __future__ import annotations

from mnist_sweep import cli

cli.defer_collection(__name__)

import os
import socket
import sys

from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

from mnist_sweep import checkpoint, reproduce, tracking
from mnist_sweep.config import ConfigError, compose, split_args


class NotResumable(RuntimeError):
    """A run that cannot be continued; the message names it and why."""


def say(line: str) -> None:
    print(f"resume: {line}", file=sys.stderr, flush=True)


def still_running(run: Run) -> bool:
    """Whether ``run``'s process (its ``process`` tag) runs on this machine still."""
    host, _, pid = run.data.tags.get(tracking.PROCESS_TAG, "").rpartition(":")
    if run.info.status != "RUNNING" or host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def check_resumable(run: Run, folder: str) -> None:
    """The reasons a run cannot be continued from a checkpoint in ``folder``, as one line each."""
    what = f"run {run.info.run_id} ({run.info.run_name})"
    if run.info.status == "FINISHED":
        raise NotResumable(f"{what} FINISHED: there is nothing left to train (python -m mnist_sweep.reproduce "
                           "trains it again from the start)")
    if tracking.TRIAL_TAG in run.data.tags:
        raise NotResumable(f"{what} is trial {run.data.tags[tracking.TRIAL_TAG]} of study "
                           f"{run.data.tags.get(tracking.STUDY_TAG)}: its sweep continues it from its checkpoint "
                           "(hydra.sweeper.max_retry > 0, then the same sweep command)")
    if still_running(run):
        raise NotResumable(f"{what} is still training, in process {run.data.tags[tracking.PROCESS_TAG]}")
    if not checkpoint.path(folder, run.info.run_id).exists():
        raise NotResumable(f"{what} has no checkpoint in {folder} (it ended before its first epoch did, trained one "
                           "epoch, or ran with checkpoint.enabled=false): python -m mnist_sweep.reproduce trains it "
                           "again from the start")


def main(argv: list[str]) -> int:
    args, overrides = split_args(argv, ("run_id",))
    if len(args["run_id"]) != 1:
        raise ConfigError("give one run_id=<run id> (or runs:/<run id>/…) of the run to continue")
    here = compose(overrides)  # this command's store: where the run is, and goes on
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"
    tracking.bound_http(here.mlflow.http_retries, here.mlflow.http_timeout)
    try:
        source = reproduce.find_run(args["run_id"][0], here.mlflow.tracking_uri)
        check_resumable(source, here.checkpoint.dir)
        continued = reproduce.run_again(source, [f"checkpoint.resume={source.info.run_id}", *overrides], None)
    except reproduce.NotReproducible as err:
        raise NotResumable(str(err)) from None
    say(f"run {continued.info.run_id} {continued.info.status}, resumed {continued.data.tags.get(tracking.RESUMED_TAG)}"
        f": test_acc {continued.data.metrics.get('test_acc', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    cli.run(main)
