"""The study sweeper and the Slurm launcher, where Hydra looks for plugins: pyproject.toml installs
this folder as ``hydra_plugins.mnist_sweep`` (Hydra instantiates plugins only from that namespace)."""

from hydra_plugins.mnist_sweep.launcher import SlurmLauncher
from hydra_plugins.mnist_sweep.sweeper import StudySweeper

__all__ = ["SlurmLauncher", "StudySweeper"]
