"""Slurm for real: ``make slurm``'s single-node cluster (the ``slurm_cluster`` fixture) with the real
PostgreSQL and MLflow server (``local_stack``), sweeps through ``hydra/launcher=slurm`` (sbatch,
sacct, scancel, a job's time limit); first the plain functions that record a job Slurm ended."""

import contextlib
import os
import re
import socket
import subprocess
import time
import uuid
import warnings

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.distributions import CategoricalDistribution, UniformDistribution
from optuna.trial import TrialState
from submitit.core.utils import FailedJobError, UncompletedJobError

from conftest import (FINISHED, checkpoint_epoch, finish, load_study, run_cli,
                      runs_in, server_args, start, study_runs)
from hydra_plugins.mnist_sweep import launcher, sweeper
from mnist_sweep import slurm, tracking
from mnist_sweep.__main__ import launch
from mnist_sweep.registry import CHAMPION, REGISTERED_MODEL
from mnist_sweep.sweep_tracking import FAILURE_TAG
from mnist_sweep.trial import FAILURE_ATTR, RUN_ID_ATTR, JobEnded, open_storage

# --------------------------------------------------------------------------- a job Slurm ended, in-process


def test_the_reason_names_the_job_and_what_ended_it():
    assert launcher.why_ended("7_0", "CANCELLED by 0", 60) == (
        "its Slurm job 7_0 was cancelled (CANCELLED by 0: scancel, or an administrator)")
    assert launcher.why_ended("7_1", "TIMEOUT", 5) == (
        "its Slurm job 7_1 reached its time limit (hydra.launcher.timeout_min=5)")
    assert launcher.why_ended("8", "NODE_FAIL", 60) == "its Slurm job 8 ended NODE_FAIL before the trial did"


class Job:
    """What the launcher reads of a submitit job: its id, its state in sacct, its results."""

    def __init__(self, state: str, error: Exception | None = None):
        self.job_id, self.state, self.error = "7_0", state, error

    def results(self) -> list[JobReturn]:
        if self.error is not None:
            raise self.error
        return [JobReturn(status=JobStatus.COMPLETED, _return_value=0.5)]


def test_each_job_of_a_batch_returns_on_its_own_an_ended_one_with_the_reason():
    assert launcher.job_return(Job("COMPLETED"), ["a=1"], 60).return_value == 0.5
    ended = launcher.job_return(Job("TIMEOUT", UncompletedJobError("no output")), ["a=1"], 60)
    assert ended.status == JobStatus.FAILED and ended.overrides == ["a=1"]
    assert isinstance(ended._return_value, JobEnded) and "time limit" in str(ended._return_value)
    failed = launcher.job_return(Job("FAILED", FailedJobError("no module named x")), ["a=1"], 60)
    assert failed.status == JobStatus.FAILED and isinstance(failed._return_value, FailedJobError)


def sweeper_trial(study: optuna.Study) -> optuna.trial.Trial:
    """A trial whose params were suggested as hydra-optuna-sweeper suggests them: optuna 2's classes."""
    trial = study.ask()
    trial._suggest("model", CategoricalDistribution(["shallow", "deep"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, and what the study holds
        trial._suggest("model.dropout", UniformDistribution(0.0, 0.4))
    return trial


def test_a_trial_whose_job_was_ended_fails_with_the_reason_and_is_requeued_up_to_max_retry(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", max_retry=1)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    ended = JobReturn(status=JobStatus.FAILED, _return_value=JobEnded("its Slurm job 7_0 was cancelled"))
    first = sweeper_trial(study)
    sweeper.record_returns(study, storage, [first], [ended], max_failure_rate=1.0)
    failed, queued = study.get_trials()
    assert failed.state == TrialState.FAIL and failed.user_attrs[FAILURE_ATTR] == "its Slurm job 7_0 was cancelled"
    assert queued.state == TrialState.WAITING

    retry = sweeper_trial(study)  # asked next: the same params, suggested again the sweeper's way
    assert retry.number == queued.number and retry.params == failed.params
    sweeper.record_returns(study, storage, [retry], [ended], max_failure_rate=1.0)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]  # max_retry=1: no third attempt
    assert trials[1].system_attrs["retry_history"] == [0]


def test_the_command_says_what_it_takes():
    with pytest.raises(ValueError, match="say start or stop"):
        slurm.main(["restart"])
    with pytest.raises(ValueError, match="the one argument is root=DIR"):
        slurm.main(["start", "port=1"])


# --------------------------------------------------------------------------- the cluster


def on_the_cluster(test):
    """Slow, and on one xdist worker in this file's order (make test's --dist loadgroup): the tests
    share the session's cluster, and the last one stops it."""
    return pytest.mark.slow(pytest.mark.xdist_group("slurm")(test))


def listening_addresses(port: int) -> set[str]:
    """The addresses a TCP port listens on, as the kernel lists them (hex, as in /proc/net/tcp)."""
    addresses = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            addresses.add(address)
    return addresses


@on_the_cluster
def test_the_daemons_listen_on_loopback_only_and_a_second_start_returns_the_cluster(slurm_cluster):
    for port in slurm_cluster.ports:
        assert listening_addresses(port) == {"0100007F"}, port  # 127.0.0.1, not 0.0.0.0
    pids = slurm.running(slurm_cluster.root)
    assert set(pids) == set(slurm.DAEMONS)
    assert slurm.start(slurm_cluster.root, slurm.Ports(1, 2, 3, 4)) == slurm_cluster  # its own ports, not these
    done = run_cli("mnist_sweep.slurm", "start", f"root={slurm_cluster.root}", timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"export SLURM_CONF={slurm_cluster.conf}" in done.stdout
    assert slurm.running(slurm_cluster.root) == pids  # the same daemons: none restarted


# The endless trials that wait for Slurm's time limit are submitted at the lowest priority, so their
# jobs run at it too (PropagatePrioProcess): the other tests' processes come first on the two cores.
# The rest of this file's sweeps run at normal priority: the file is one worker's chain of tests.
NICE = 19


def slurm_args(tmp_path) -> list[str]:
    """A trial's job on this cluster: one CPU, a little memory, its files under ``tmp_path``."""
    return ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
            f"hydra.launcher.submitit_folder='{tmp_path / 'submitit'}/%j'"]


def sacct(cluster: slurm.Cluster, job_ids: list[str], *options: str) -> list[tuple[str, str]]:
    """Each job's records in Slurm's accounting, (job id, state), once none is still running: the
    sweep may read a job's result before slurmd has told the accounting that the job ended."""
    for _ in range(120):
        done = subprocess.run(["sacct", "-X", "-n", "-P", *options, "-o", "JobID,State", "-j", ",".join(job_ids)],
                              env={**os.environ, **cluster.env()}, capture_output=True, text=True, check=True)
        records = [tuple(line.split("|")) for line in done.stdout.splitlines()]
        if not {state for _, state in records} & {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING"}:
            return records
        time.sleep(0.5)
    raise AssertionError(f"Slurm's accounting still has jobs running after 60 s: {records}")


def job_ids(tmp_path, pattern: str = r"\d+_\d+") -> list[str]:
    """The Slurm jobs of the trials, from their submitit folders (a batch's: <array>_<index>)."""
    return sorted(p.name for p in (tmp_path / "submitit").iterdir() if re.fullmatch(pattern, p.name))


def wait_for_runs(local_stack, name: str, count: int, proc: subprocess.Popen) -> None:
    """Until ``count`` trials of the study have their MLflow run (their jobs are training)."""
    for _ in range(600):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        try:
            trials = load_study(local_stack, name).get_trials()
        except KeyError:  # no study yet
            trials = []
        if sum(RUN_ID_ATTR in t.user_attrs for t in trials) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"no {count} trials running")


@on_the_cluster
def test_a_cancelled_job_and_one_past_its_time_limit_fail_their_trials_and_the_next_sweep_runs_them_as_slurm_jobs(
        slurm_cluster, local_stack, overrides, tmp_path):
    """One batch of two endless trials: scancel ends the first job; the second reaches its time
    limit (one minute: Slurm's least). Each trial FAILs, its run ends FAILED saying why, it is
    re-queued (max_retry=1), and the sweep ends normally. The next sweep runs the retries as a sweep
    on Slurm runs any trials: a job each, reporting to the pruner through the database, its run on
    the tracking server, the best crowned. ~2 min: the time limit, which Slurm checks every 30 s."""
    name = f"t{uuid.uuid4().hex[:10]}"
    env = {**local_stack.env(), **slurm_cluster.env()}
    args = [*server_args(overrides, name), *slurm_args(tmp_path), "hydra.sweeper.n_jobs=2", "hydra.sweeper.max_retry=1"]
    # no signal: Slurm ends the job at its limit; no checkpoints: the retries then train from epoch 0,
    # as any trial of the next sweep does, rather than continue after their last endless epoch
    proc = start(["-m", *args, "hydra.sweeper.n_trials=2", "hydra.launcher.timeout_min=1", "epochs=100000",
                  "hydra.launcher.signal_delay_s=0", "checkpoint.enabled=false"], env, nice=NICE)
    try:
        wait_for_runs(local_stack, name, 2, proc)
        (cancelled,) = [job for job in job_ids(tmp_path) if job.endswith("_0")]  # trial 0: the batch's first
        subprocess.run(["scancel", cancelled], env={**os.environ, **slurm_cluster.env()}, check=True)
        output = finish(proc, timeout=300)
    finally:
        proc.kill()

    reasons = {0: f"its Slurm job {cancelled} was cancelled",
               1: "reached its time limit (hydra.launcher.timeout_min=1)"}
    ended = job_ids(tmp_path)
    states = dict(sacct(slurm_cluster, ended))
    assert states.pop(cancelled).startswith("CANCELLED") and list(states.values()) == ["TIMEOUT"]
    trials = load_study(local_stack, name).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.WAITING] * 2
    client, (parent,), kids = study_runs(local_stack, name)
    for number, reason in reasons.items():
        assert reason in trials[number].user_attrs[FAILURE_ATTR] and reason in output
        run = client.get_run(trials[number].user_attrs[RUN_ID_ATTR])
        assert run.info.status == "FAILED" and run.data.tags[FAILURE_TAG] == trials[number].user_attrs[FAILURE_ATTR]
        assert trials[number + 2].system_attrs["retry_history"] == [number]
    assert parent.info.status == "FINISHED"

    finish(start(["-m", *args, "hydra.sweeper.n_trials=2", "epochs=1"], env))  # on: the retries
    retried = load_study(local_stack, name).get_trials()
    assert len(retried) == 4 and {t.state for t in retried[2:]} <= FINISHED
    assert [t.params for t in retried[2:]] == [t.params for t in trials[:2]]
    jobs = [job for job in job_ids(tmp_path) if job not in ended]
    # one sbatch'd job each, each done
    assert len(jobs) == 2 and {state for _, state in sacct(slurm_cluster, jobs)} == {"COMPLETED"}
    assert all(t.intermediate_values for t in retried[2:])  # each job reported to the pruner through the database
    client, (parent,), kids = study_runs(local_stack, name)
    assert parent.info.status == "FINISHED"
    for trial in retried[2:]:
        run = client.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert run.info.status == "FINISHED" and run.data.metrics["test_acc"] == trial.value
    best = max((t for t in retried if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert parent.data.tags["best_run_id"] == best.user_attrs[RUN_ID_ATTR]
    # other tests' sweeps share this registry: the champion is this study's best, or one at least as good
    champion = client.get_run(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).run_id)
    assert champion.data.metrics["test_acc"] >= best.value and tracking.MODEL_URI_TAG in champion.data.tags
    assert tracking.MODEL_URI_TAG in client.get_run(best.user_attrs[RUN_ID_ATTR]).data.tags  # a model to crown


@on_the_cluster
def test_a_trial_slurm_preempts_in_epoch_2_is_requeued_and_continues_to_the_accuracy_of_one_never_stopped(
        slurm_cluster, local_stack, overrides, tmp_path):
    """Slurm signals the job inside epoch 2 of 3 (USR2, as it does signal_delay_s before a time limit or
    on a pre-emption; sent with scancel here, at a moment the test chooses: Slurm's own timer has a
    30-60 s resolution, which no one-minute test can place inside an epoch). submitit requeues the job,
    the requeued job joins the same trial and continues its run after epoch 1: the trial COMPLETEs with
    the test accuracy of the same run never stopped. Slow: Slurm starts a requeued job ~25 s later."""
    fixed = [*overrides, "epochs=3", "data.batch_size=4", "model=shallow", "augment=shift", "model.dropout=0.2",
             "optim.lr=0.05", "optim.weight_decay=1e-4"]
    launch([*fixed, f"paths.outputs={tmp_path / 'whole'}"])  # never stopped: what the trial must reach
    (whole,) = runs_in(tmp_path / "whole")
    name = f"t{uuid.uuid4().hex[:10]}"
    env = {**local_stack.env(), **slurm_cluster.env()}
    proc = start(["-m", *server_args(fixed, name), *slurm_args(tmp_path), "hydra.sweeper.n_trials=1"], env)
    try:
        deadline = time.monotonic() + 300
        while True:  # until the trial's epoch 1 is checkpointed: epoch 2 is training
            assert proc.poll() is None and time.monotonic() < deadline, "the trial never reached epoch 2"
            time.sleep(0.05)
            with contextlib.suppress(KeyError, IndexError):  # no study, or no trial, yet
                run_id = load_study(local_stack, name).trials[0].user_attrs.get(RUN_ID_ATTR)
                if checkpoint_epoch(tmp_path / "outputs", run_id) == 1:
                    break
        (job,) = job_ids(tmp_path, r"\d+")  # a batch of one: a plain job, no array
        subprocess.run(["scancel", "--signal=USR2", job], env={**os.environ, **slurm_cluster.env()}, check=True)
        finish(proc, timeout=300)
    finally:
        proc.kill()

    (trial,) = load_study(local_stack, name).get_trials()
    assert trial.state == TrialState.COMPLETE and trial.value == whole.data.metrics["test_acc"]
    client, _, (run,) = study_runs(local_stack, name)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags[tracking.RESUMED_TAG] == "after epoch 1" and tracking.REQUEUED_TAG in run.data.tags
    assert [m.step for m in client.get_metric_history(run_id, "test_acc")] == [1, 2, 3]
    # -D: every record of the job, the requeued one's too
    assert sacct(slurm_cluster, [job], "-D") == [(job, "REQUEUED"), (job, "COMPLETED")]  # requeued once, then done


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@on_the_cluster
def test_stop_stops_every_daemon_and_start_resumes_the_cluster(slurm_cluster):
    """Last: it stops the session's cluster, then starts it again."""
    slurm.stop(slurm_cluster.root)
    assert slurm.running(slurm_cluster.root) == {} and all(refused(port) for port in slurm_cluster.ports)
    slurm.stop(slurm_cluster.root)  # nothing runs: nothing to do
    assert slurm.start(slurm_cluster.root) == slurm_cluster
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], env={**os.environ, **slurm_cluster.env()},
                          capture_output=True, text=True)
    assert done.stdout.strip() == "idle"


def test_a_requeue_whose_scontrol_the_requeue_itself_kills_still_ends_the_job_as_requeued():
    """Slurm ends the job's step as it requeues it, and a slow `scontrol requeue` inside the step dies
    of that SIGTERM before it exits: the job is requeued all the same (it failed its trial once in a
    loaded suite). An scontrol that exits with an error did not requeue: that error goes on."""
    def scontrol(returncode):
        def requeue(signum, frame):
            raise subprocess.CalledProcessError(returncode, ["scontrol", "requeue", "5"])
        return requeue

    with pytest.raises(launcher.Requeued, match="requeued: it continues from its last epoch's checkpoint"):
        launcher.requeue_and_stop(scontrol(-15), launcher.USR_SIG, None)
    with pytest.raises(subprocess.CalledProcessError):
        launcher.requeue_and_stop(scontrol(1), launcher.USR_SIG, None)
