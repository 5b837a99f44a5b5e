"""The config schema, its checks, and where the project keeps its state.

YAML in ``conf/`` fills this schema, so a wrong type (``epochs=abc``) fails at compose time with
Hydra's message; :func:`validate` adds the range checks a type cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# The checkout this package runs from: outputs/ and data/ are anchored here, not in the cwd, so
# every run, sweep worker and `make ui` share one MLflow store whatever directory they start in.
PROJECT_ROOT = CONF_DIR.parent
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class DataConfig:
    root: str = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    md5: dict[str, str] = field(default_factory=dict)


@dataclass
class MlflowConfig:
    tracking_uri: str = MISSING
    experiment: str = MISSING
    artifact_root: str = MISSING
    model_format: Optional[str] = "pt2"


@dataclass
class OptunaTrialConfig:
    study: Optional[str] = None  # set by the study sweeper for each job: its study...
    trial: Optional[int] = None  # ...and its trial number there


@dataclass
class PruningConfig:
    checks_per_epoch: int = MISSING
    check_images: int = MISSING


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING
    optim: Any = MISSING
    scheduler: Any = None
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    paths: Any = MISSING
    epochs: int = MISSING
    seed: int = MISSING
    device: str = MISSING
    threads: int = MISSING
    optuna: OptunaTrialConfig = field(default_factory=OptunaTrialConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)


@dataclass
class StudySweeperConfig(OptunaSweeperConf):
    """hydra-optuna-sweeper's config keys, plus what a study shared by many workers needs
    (the values and their comments are in conf/hydra/sweeper/search.yaml)."""

    _target_: str = "hydra_plugins.mnist_sweep.StudySweeper"
    tracker: Any = None
    pruner: Any = None
    heartbeat_interval: Optional[int] = None
    grace_period: Optional[int] = None
    max_retry: int = 0
    max_trials: Optional[int] = None
    timeout: Optional[float] = None


ConfigStore.instance().store(name="schema", node=Config)
ConfigStore.instance().store(group="hydra/sweeper", name="study", node=StudySweeperConfig, provider="mnist_sweep")

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


class ConfigError(ValueError):
    """A config value is out of range; the message names the key and what is allowed."""


def validate(cfg: DictConfig) -> None:
    """Range checks, run before any data is loaded or MLflow run created."""
    checks = [
        (cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}"),
        (cfg.data.batch_size >= 1, f"data.batch_size must be >= 1, got {cfg.data.batch_size}"),
        (cfg.data.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1, got {cfg.data.eval_batch_size}"),
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.mlflow.model_format in ("pt2", "pickle", None),
         f"mlflow.model_format must be pt2, pickle or null, got {cfg.mlflow.model_format!r}"),
        (cfg.threads >= 0, f"threads must be >= 0 (0 = every core), got {cfg.threads}"),
        (cfg.pruning.checks_per_epoch >= 0, f"pruning.checks_per_epoch must be >= 0, got {cfg.pruning.checks_per_epoch}"),
        (cfg.pruning.check_images >= 1, f"pruning.check_images must be >= 1, got {cfg.pruning.check_images}"),
        ((cfg.optuna.study is None) == (cfg.optuna.trial is None),
         "optuna.study and optuna.trial are set together (the study sweeper sets both)"),
        (
            cfg.device.split(":")[0] in DEVICES,
            f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {cfg.device!r}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def compose(overrides: list[str]) -> DictConfig:
    """The training config with command-line overrides, for entry points other than training."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def split_args(argv: list[str], keys: tuple[str, ...]) -> tuple[dict[str, list[str]], list[str]]:
    """Pull ``key=value`` arguments for ``keys`` (each may repeat) out of ``argv``; the rest are overrides.

    Those keys are not in the training config, and their values (paths, URIs) are kept verbatim:
    Hydra's override grammar would reject a file name with a space or a parenthesis.
    """
    values: dict[str, list[str]] = {key: [] for key in keys}
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in values:
            values[key].append(value)
        else:
            overrides.append(arg)
    return values, overrides
