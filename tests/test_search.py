"""The default search's config groups: each sampler option (conf/hydra/sweeper/sampler) and each
pruner option (conf/hydra/sweeper/pruner) composes and runs, and the prior
(conf/hydra/sweeper/prior) lies in the default search's space."""

from __future__ import annotations

import warnings

import optuna
import pytest
from omegaconf import OmegaConf

from conftest import options, run_cli, sweep_here
from mnist_sweep.config import compose
from mnist_sweep.hydra_plugin.sweeper import check_points, parse_space
from mnist_sweep.trial import best_finished, open_storage

SAMPLERS = options("hydra/sweeper/sampler")
PRUNERS = options("hydra/sweeper/pruner")


def sweeper_config(*overrides: str):
    return compose(list(overrides), with_hydra=True).hydra.sweeper


@pytest.mark.parametrize("search", ["search", "long", "pareto"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_option_composes_with_each_search_without_a_warning(search, sampler):
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", append=True)  # what the modules' own filters leave through
        config = sweeper_config(f"hydra/sweeper={search}", f"hydra/sweeper/sampler={sampler}")
    assert [str(w.message) for w in caught] == []
    assert config.sampler.seed == 0  # search.yaml's seed reaches every option


@pytest.mark.slow
def test_a_run_composes_the_default_sampler_without_a_warning():
    """In a process of its own: pytest replaces the warning filters a module sets as it is imported."""
    done = run_cli("mnist_sweep", "--help")
    assert done.returncode == 0 and done.stderr == ""


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_option_runs_a_two_trial_sweep_and_the_default_reaches_98_percent(sampler, overrides, tmp_path,
                                                                                         capsys):
    """5-15 s an option: one random trial, then one the option's model proposes from it. On the tiny
    data every option's best, the default's among them, reaches 98% (the issue's bar for a default)."""
    expected = sweeper_config(f"hydra/sweeper/sampler={sampler}").sampler._target_.rsplit(".", 1)[1]
    sweep_here(*overrides, f"hydra/sweeper/sampler={sampler}", "hydra.sweeper.n_trials=2",
               "hydra.sweeper.sampler.n_startup_trials=1", "mlflow.model_format=null")
    assert f"sampler {expected}, " in capsys.readouterr().out  # the sweep's log names the sampler it seeded
    study = optuna.load_study(study_name="mnist_sweep",
                              storage=open_storage(f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}"))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert best_finished(study).value >= 0.98


@pytest.mark.parametrize("pruner", PRUNERS)
def test_each_pruner_option_runs_a_two_trial_sweep_whose_trials_report_only_to_a_real_pruner(pruner, overrides,
                                                                                               tmp_path, capsys):
    """~5 s an option: the sweep seeds the pruner the option names, and its trials report checks
    inside each epoch to it (none: the epochs' ends alone). The median pruner's decisions:
    tests/test_sweeper.py; what each pruner saves on the real data: make bench."""
    expected = sweeper_config(f"hydra/sweeper/pruner={pruner}").pruner._target_.rsplit(".", 1)[1]
    sweep_here(*overrides, f"hydra/sweeper/pruner={pruner}", "hydra.sweeper.n_trials=2", "epochs=2",
               "mlflow.model_format=null")
    assert f"pruner {expected})" in capsys.readouterr().out
    study = optuna.load_study(study_name="mnist_sweep",
                              storage=open_storage(f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}"))
    assert {t.state for t in study.trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert len(study.trials) == 2
    steps = {step for t in study.trials for step in t.intermediate_values}
    epoch_ends = {50, 100}  # percent of the training: the checks inside an epoch feed a pruner alone
    assert steps == epoch_ends if expected == "NopPruner" else steps > epoch_ends


def default_space() -> dict:
    """search.yaml's space, as the sweeper parses it."""
    params = sweeper_config().params
    space, fixed = parse_space([f"{key}={value}" for key, value in params.items()])
    assert not fixed
    return space


def test_the_known_good_prior_lies_in_the_default_search_space_and_names_every_key():
    points = OmegaConf.to_container(sweeper_config("hydra/sweeper/prior=known_good").enqueue)
    space = default_space()
    assert 1 <= len(points) <= 3  # each costs a trial of a 10-minute search's ~8
    check_points(points, space)  # a ConfigError naming the point and key once the space moves from under it
    assert all(set(point) == set(space) for point in points)  # whole points: each replays a measured trial


def test_enqueue_on_the_command_line_replaces_the_priors_points():
    config = sweeper_config("hydra/sweeper/prior=known_good", "hydra.sweeper.enqueue=[{model:deep}]")
    assert OmegaConf.to_container(config.enqueue) == [{"model": "deep"}]


def test_the_prior_belongs_to_the_default_space_so_the_long_search_refuses_it_in_one_line():
    config = sweeper_config("hydra/sweeper=long", "hydra/sweeper/prior=known_good")
    space, fixed = parse_space([f"{key}={value}" for key, value in config.params.items()])
    space = {key: value for key, value in space.items() if key not in fixed}
    with pytest.raises(ValueError, match=r"^enqueued point 0 .*: model is not in the search space"):
        check_points(OmegaConf.to_container(config.enqueue), space)
