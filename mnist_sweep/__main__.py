"""``python -m mnist_sweep [overrides]``: one training run (the task: :func:`mnist_sweep.run.main`);
``-m`` sweeps (the sweeper: ``hydra_plugins.mnist_sweep``)."""

from mnist_sweep import cli

cli.defer_collection(__name__)

import hydra  # every import from here on is made with the collector off
from hydra.core.plugins import Plugins
from hydra_plugins.mnist_sweep import SlurmLauncher, StudySweeper

from mnist_sweep import run

for plugin in (StudySweeper, SlurmLauncher):
    Plugins.instance().register(plugin)  # an editable install hides them from Hydra's plugin scan


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> float:
    return run.main(cfg)


if __name__ == "__main__":
    cli.run(lambda argv: main())  # Hydra reads the arguments itself
