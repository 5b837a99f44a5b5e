"""The study sweeper, where Hydra looks for plugins: pyproject.toml installs this folder as
``hydra_plugins.mnist_sweep`` (Hydra instantiates sweepers only from that namespace)."""

from hydra_plugins.mnist_sweep.sweeper import StudySweeper

__all__ = ["StudySweeper"]
