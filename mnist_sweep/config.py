"""The config schema, its checks, and where the project keeps its state.

YAML in ``conf/`` fills this schema, so a wrong type (``epochs=abc``) fails at compose time with
Hydra's message; :func:`validate` adds the range checks a type cannot express, and
:class:`OutputsCheck` checks the folder Hydra writes before it does.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import MISSING, DictConfig, OmegaConf

from mnist_sweep.model import DOWNSAMPLES, IMAGE_SIDE, MAX_BLOCKS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# The checkout this package runs from: outputs/ and data/ are anchored here, not in the cwd, so
# every run, sweep worker and `make ui` share one MLflow store whatever directory they start in.
PROJECT_ROOT = CONF_DIR.parent
DEVICES = ("auto", "cpu", "cuda", "mps")
# Hydra writes a run's config files before the run starts, where no error can be made one line:
# with less than this free on their disk, the run stops first, with one
MIN_FREE_MIB = 1


@dataclass
class DataConfig:
    root: str = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    val_size: int = MISSING
    split_seed: int = MISSING
    md5: dict[str, str] = field(default_factory=dict)


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = MISSING  # null: stores=server without $MLFLOW_TRACKING_URI
    experiment: str = MISSING
    artifact_root: Optional[str] = MISSING  # null: the tracking server's
    http_retries: int = MISSING
    http_timeout: int = MISSING
    model_format: Optional[str] = "pt2"
    log_models: str = "best"
    system_metrics: bool = MISSING
    system_metrics_interval: float = MISSING
    study_plots: bool = MISSING


@dataclass
class SweepConfig:
    cost: str = MISSING
    min_accuracy: Optional[float] = MISSING


@dataclass
class OptunaTrialConfig:
    study: Optional[str] = None  # set by the study sweeper for each job: its study...
    trial: Optional[int] = None  # ...and its trial number there
    deadline: Optional[float] = None  # ...and its sweep's deadline (Unix time; None: none)
    storage: Optional[str] = MISSING  # the study's database (the stores group sets it)


@dataclass
class PruningConfig:
    checks_per_epoch: int = MISSING
    check_images: int = MISSING


@dataclass
class CheckpointConfig:
    enabled: bool = MISSING
    dir: str = MISSING
    resume: Optional[str] = None  # python -m mnist_sweep.resume sets it


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING
    augment: Any = MISSING
    optim: Any = MISSING
    scheduler: Any = None
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    paths: Any = MISSING
    epochs: int = MISSING
    seed: int = MISSING
    device: str = MISSING
    threads: int = MISSING
    outage_s: float = MISSING
    optuna: OptunaTrialConfig = field(default_factory=OptunaTrialConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


@dataclass
class WarmStartConfig:
    study: Optional[str] = None
    top: int = 5


@dataclass
class StudySweeperConfig(OptunaSweeperConf):
    """hydra-optuna-sweeper's config keys, plus what a study shared by many workers needs
    (the values and their comments are in conf/hydra/sweeper/search.yaml)."""

    _target_: str = "hydra_plugins.mnist_sweep.sweeper.StudySweeper"
    tracker: Any = None
    pruner: Any = None
    heartbeat_interval: Optional[int] = None
    grace_period: Optional[int] = None
    max_retry: int = 0
    max_trials: Optional[int] = None
    timeout: Optional[float] = None
    finish_running: bool = False
    enqueue: List[Any] = field(default_factory=list)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    sampler: Any = MISSING  # an option of conf/hydra/sweeper/sampler: gp's keys are not the plugin's SamplerConfig's


ConfigStore.instance().store(name="schema", node=Config)
ConfigStore.instance().store(group="hydra/sweeper", name="study", node=StudySweeperConfig, provider="mnist_sweep")
# conf/hydra/sweeper/sampler/tpe.yaml is validated against the plugin's structured `tpe` of the same
# name (typed keys, and the defaults the sampler had before it had a group). Hydra 1.3 warns of that
# match at every compose, and its plugin scan registers the plugin's `tpe` again: it cannot be dropped
warnings.filterwarnings("ignore", message=r"\s*'hydra/sweeper/sampler/tpe' is validated against ConfigStore schema")

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


class ConfigError(ValueError):
    """A config value is out of range; the message names the key and what is allowed."""


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is a subclass of int: true is no width


def _number(value: Any) -> bool:
    return _integer(value) or isinstance(value, float)


# Every documented constraint as (key, test, what is allowed). The model, optimizer and schedule
# groups are free-form (``_target_`` objects), so a wrong type or range there would otherwise
# surface mid-run, or never: an even kernel trains a different network without a word.
# A key its group does not have (AdamW has no momentum) is skipped.
COSTS = ("param_count", "latency_ms")  # what hydra/sweeper=pareto can weigh against accuracy (sweep.cost)
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("model.channels", lambda v: (_integer(v) and v >= 1) or (OmegaConf.is_list(v) and 1 <= len(v) <= MAX_BLOCKS
     and all(_integer(c) and c >= 1 for c in v)),
     f"a positive width, or a list of 1 to {MAX_BLOCKS} positive widths, one per block"),
    ("model.convs_per_block", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("model.kernel_size", lambda v: _integer(v) and v >= 1 and v % 2 == 1,
     "a positive odd integer (padding keeps the map size only for odd kernels)"),
    ("model.batch_norm", lambda v: isinstance(v, bool), "true or false"),
    ("model.dropout", lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
    ("model.downsample", lambda v: v in DOWNSAMPLES, f"{', '.join(DOWNSAMPLES[:-1])} or {DOWNSAMPLES[-1]}"),
    ("augment.shift", lambda v: _integer(v) and 0 <= v < IMAGE_SIDE // 2, f"an integer in [0, {IMAGE_SIDE // 2})"),
    ("augment.degrees", lambda v: _number(v) and 0 <= v <= 180, "in [0, 180]"),
    ("augment.scale", lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
    ("optim.lr", lambda v: _number(v) and v > 0, "> 0"),
    ("optim.momentum", lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
    ("optim.nesterov", lambda v: isinstance(v, bool), "true or false"),
    # torch takes floats only here: [0, 0.5] must be written [0.0, 0.5]
    ("optim.betas", lambda v: OmegaConf.is_list(v) and len(v) == 2
     and all(isinstance(b, float) and 0 <= b < 1 for b in v), "two floats in [0, 1), like [0.9, 0.999]"),
    ("optim.weight_decay", lambda v: _number(v) and v >= 0, ">= 0"),
    ("scheduler.pct_start", lambda v: _number(v) and 0 < v < 1, "in (0, 1)"),
    ("scheduler.div_factor", lambda v: _number(v) and v > 0, "> 0"),
    ("scheduler.final_div_factor", lambda v: _number(v) and v > 0, "> 0"),
    ("scheduler.cycle_momentum", lambda v: isinstance(v, bool), "true or false"),
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("data.val_size", lambda v: v >= 0, ">= 0 (0: no validation split)"),
    ("epochs", lambda v: v >= 1, ">= 1"),
    ("threads", lambda v: v >= 0, ">= 0 (0 = every core)"),
    ("outage_s", lambda v: v >= 0, ">= 0 seconds (0: a store that stops answering stops the worker at once)"),
    ("pruning.checks_per_epoch", lambda v: v >= 0, ">= 0"),
    ("pruning.check_images", lambda v: v >= 1, ">= 1"),
    ("device", lambda v: v.split(":")[0] in DEVICES, f"one of {', '.join(DEVICES)} (or cuda:N)"),
    ("mlflow.tracking_uri", lambda v: v is not None, "set (stores=server reads it from $MLFLOW_TRACKING_URI)"),
    ("mlflow.http_retries", lambda v: v >= 0, ">= 0"),
    ("mlflow.http_timeout", lambda v: v > 0, "> 0"),
    ("mlflow.model_format", lambda v: v in ("pt2", "pickle", None), "pt2, pickle or null"),
    ("mlflow.log_models", lambda v: v in ("best", "all"), "best or all"),
    ("mlflow.system_metrics_interval", lambda v: v > 0, "> 0 (seconds between samples)"),
    ("sweep.cost", lambda v: v in COSTS, " or ".join(COSTS)),
    ("sweep.min_accuracy", lambda v: v is None or (_number(v) and 0 < v < 1), "null or in (0, 1)"),
]
# Checks across keys, as (the key whose value is reported, the test on the whole config, what is
# allowed): --help lists them after RULES.
CROSS_RULES: list[tuple[str, Callable[[DictConfig], bool], str]] = [
    ("optim.momentum", lambda cfg: not (cfg.optim.get("nesterov") and not cfg.optim.momentum),
     "optim.nesterov=true needs optim.momentum > 0"),
    ("optuna.trial", lambda cfg: (cfg.optuna.study is None) == (cfg.optuna.trial is None),
     "optuna.study and optuna.trial are set together (the study sweeper sets both)"),
]
_ABSENT = object()


def validate(cfg: DictConfig) -> None:
    """Every rule in :data:`RULES`, run before any data is loaded or MLflow run created."""
    for key, ok, allowed in RULES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not ok(value):
            raise ConfigError(f"{key} must be {allowed}, got {'null' if value is None else repr(value)}")
    for key, ok, allowed in CROSS_RULES:
        if not ok(cfg):
            raise ConfigError(f"{allowed}, got {key}={OmegaConf.select(cfg, key)}")


class OutputsCheck(Callback):
    """``hydra.callbacks.outputs``: make the folder of a run (or a sweep) before Hydra writes there,
    or end with one ``error:`` line that names it and what to do, where Hydra would print a
    traceback for each folder above it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        make_output_folder(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        make_output_folder(Path(config.hydra.sweep.dir))


def make_output_folder(folder: Path) -> None:
    """Make ``folder``: one ``error:`` line if it cannot be written (a read-only disk, no
    permission, a file in the way) or its disk has less than ``MIN_FREE_MIB`` free."""
    from mnist_sweep import stores  # only now: it imports SQLAlchemy, which the tools reading config skip

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"error: cannot make the output folder {folder} ({stores.why_unwritable(folder, err)}): "
                         "set paths.outputs to a folder you can write") from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_MIB * 2**20:
        raise SystemExit(f"error: the disk holding {folder} is full ({free // 2**10} KiB free, a run needs "
                         f"{MIN_FREE_MIB} MiB to start): free space there, or set paths.outputs to another disk")


def describe_rules() -> str:
    """Every rule, a line each: what ``--help`` prints (conf/config.yaml's help footer)."""
    width = max(len(key) for key, _, _ in RULES)
    lines = [f"{key:<{width}}  {allowed}" for key, _, allowed in RULES]
    return "\n".join(lines + [allowed for _, _, allowed in CROSS_RULES])


def compose(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """The training config with command-line overrides, for entry points other than training;
    ``with_hydra`` keeps the ``hydra`` node (the sweeper's study storage lives there)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)


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


if not OmegaConf.has_resolver("config_rules"):  # Hydra's help is a string.Template: $ is escaped
    OmegaConf.register_new_resolver("config_rules", lambda: describe_rules().replace("$", "$$"))
