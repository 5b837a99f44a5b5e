"""``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml): hydra-submitit-launcher's Slurm
launcher, changed where a study needs it: a job that Slurm ends before it returns (``scancel``, its
time limit, a lost node) is one failed job of its batch, holding a :class:`mnist_sweep.trial.JobEnded`
that says why (its state in Slurm's accounting). Upstream raises for the whole batch at the first
such job and stops waiting for the others; the study sweeper fails that trial with the reason,
re-queues it (``hydra.sweeper.max_retry``) and goes on. And a job that Slurm signals before its time
limit, or pre-empts, is requeued by submitit and continues its trial from the trial's last epoch
checkpoint (:func:`requeue_and_stop`), where upstream would train the trial again from its start.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from mnist_sweep.trial import JobEnded, Requeued

log = logging.getLogger(__name__)


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """``hydra/launcher=slurm``: see the module's docstring."""

    def __call__(self, *args: Any) -> JobReturn:
        """A trial's job, on its node: upstream's, with submitit's requeue on Slurm's signal ending the
        job as :class:`mnist_sweep.trial.Requeued` (its trial stays RUNNING, and its run says why)."""
        signal.signal(USR_SIG, functools.partial(requeue_and_stop, signal.getsignal(USR_SIG)))
        return super().__call__(*args)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        """Upstream's launch (hydra-submitit-launcher 1.2), except that each job's result is read on its own."""
        import submitit  # here, as upstream: Hydra imports every plugin at each start

        executor = submitit.AutoExecutor(cluster="slurm", folder=self.params["submitit_folder"],
                                         slurm_max_num_timeout=self.params["max_num_timeout"])
        shared = set(OmegaConf.structured(BaseQueueConf).keys())  # the rest take submitit's slurm_ prefix
        executor.update_parameters(**{key if key in shared else f"slurm_{key}": value
                                      for key, value in self.params.items()
                                      if key not in ("submitit_folder", "max_num_timeout")})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        for number, overrides in zip(numbers, job_overrides):
            log.info("\t#%d : %s", number, " ".join(filter_overrides(overrides)))
        jobs = executor.map_array(self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(numbers),
                                  list(numbers), [f"job_id_for_{n}" for n in numbers],
                                  [Singleton.get_state()] * len(numbers))
        return [job_return(job, overrides, self.params["timeout_min"]) for job, overrides in zip(jobs, job_overrides)]


USR_SIG = signal.SIGUSR2  # what Slurm sends signal_delay_s before the time limit (submitit's default)


def requeue_and_stop(requeue: Callable[[int, Any], None], signum: int, frame: Any) -> None:
    """On Slurm's signal (``signal_delay_s`` before the time limit, or a pre-emption): submitit's
    handler ``requeue`` requeues the job (``scontrol requeue``; the trial's call again, the same
    arguments) and exits; that exit, raised in the middle of training, becomes :class:`Requeued`.
    The requeued job continues the trial's run from its last epoch's checkpoint. When submitit does
    not requeue (``max_num_timeout`` spent), its own error goes on: the trial fails, as before."""
    requeued = Requeued(f"Slurm signalled the job ({signal.Signals(signum).name}: its time limit is near, or it is "
                        "pre-empted) and it was requeued: it continues from its last epoch's checkpoint")
    try:
        requeue(signum, frame)
    except SystemExit:
        raise requeued from None
    except subprocess.CalledProcessError as err:
        # `scontrol requeue` killed by a signal: the requeue it asked for ends the job's step, and the
        # scontrol running inside it, before it exits (a loaded node: once in a test suite). Requeued all the same
        if err.returncode >= 0:
            raise
        raise requeued from None


def job_return(job: Any, overrides: Sequence[str], timeout_min: int) -> JobReturn:
    """The job's own return; for a job that ended without one, a failed return that says why:
    a :class:`JobEnded` if Slurm ended it, submitit's error if the job failed around the task."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return job.results()[0]
    except FailedJobError as err:  # a kind of UncompletedJobError: first
        error: Exception = err
    except UncompletedJobError:
        error = JobEnded(why_ended(job.job_id, job.state, timeout_min))
    log.warning("job %s: %s", job.job_id, error)
    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error)


def why_ended(job_id: str, state: str, timeout_min: int) -> str:
    """What a trial's run says about a job that Slurm ended, from its state in ``sacct``."""
    if state.startswith("CANCELLED"):  # "CANCELLED by <uid>"
        return f"its Slurm job {job_id} was cancelled ({state}: scancel, or an administrator)"
    if state == "TIMEOUT":
        return f"its Slurm job {job_id} reached its time limit (hydra.launcher.timeout_min={timeout_min})"
    return f"its Slurm job {job_id} ended {state} before the trial did"
