"""``python -m mnist_sweep [overrides]``: one training run (the task: :func:`mnist_sweep.run.main`);
``-m`` sweeps (the sweeper: ``hydra_plugins.mnist_sweep``)."""

from mnist_sweep import cli

cli.defer_collection(__name__)

import sys

import hydra  # every import from here on is made with the collector off
from hydra.core.plugins import Plugins
from hydra_plugins.mnist_sweep import SlurmLauncher, StudySweeper

from mnist_sweep import run
from mnist_sweep.config import CONF_DIR

for plugin in (StudySweeper, SlurmLauncher):
    Plugins.instance().register(plugin)  # an editable install hides them from Hydra's plugin scan


# an absolute path: the same config whether this module runs as __main__ or is imported (the tests)
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg) -> float:
    with cli.freeze_late_imports():
        return run.main(cfg)


def launch(argv: list[str]) -> None:
    """``python -m mnist_sweep *argv`` in this process: the same Hydra app, job and task (how
    :mod:`mnist_sweep.reproduce` trains a recorded run again). It fails as the command does: Hydra's
    errors, and the task's one ``error:`` line, are a SystemExit."""
    from hydra.core.global_hydra import GlobalHydra

    saved, sys.argv = sys.argv, [sys.argv[0], *argv]  # where hydra.main reads its arguments
    GlobalHydra.instance().clear()  # Hydra refuses to start where a compose or an earlier app left it set up
    try:
        main()
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()


if __name__ == "__main__":
    cli.run(lambda argv: main())  # Hydra reads the arguments itself
