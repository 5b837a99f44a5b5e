"""The study sweeper under a name Hydra accepts: Hydra instantiates sweepers only from the
``hydra_plugins`` namespace, so pyproject.toml installs this folder as ``hydra_plugins.mnist_sweep``.
The sweeper itself lives in :mod:`mnist_sweep.study`."""

from mnist_sweep.study import StudySweeperImpl


class StudySweeper(StudySweeperImpl):
    """``hydra/sweeper=study``: hydra-optuna-sweeper with the study as the unit of a sweep."""
