"""A job's side of its trial, on a real study database (no sweep, no training)."""

import os
import signal
import time

import optuna

from mnist_sweep.study import JobTrial, ctrl_c_remembered, open_storage


def test_a_trial_leads_when_no_completed_trial_is_better(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    first = JobTrial(study, study.ask().number, storage, None)
    assert first.leads(0.1)  # nothing completed yet: any value may end as the best
    first.complete(0.5)
    second = JobTrial(study, study.ask().number, storage, None)
    assert second.leads(0.6) and second.leads(0.5)  # a tie may be the best Optuna reports
    assert not second.leads(0.4)
    study.ask()  # a running trial has no value yet: it does not count
    assert not JobTrial(study, study.ask().number, storage, None).leads(0.49)


def test_a_swallowed_ctrl_c_is_still_remembered():
    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_remembered() as interrupted:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            pass  # what Python does to one raised in a garbage-collector callback
        assert interrupted.is_set()  # so the sweep loop still stops before its next trial
    assert signal.getsignal(signal.SIGINT) is before
