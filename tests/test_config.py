"""The config: every group composes and builds, every rule in config.RULES is one line, and
--help lists them all."""

import itertools
import re
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate

from conftest import assert_one_line_error, compose_with, options, run_cli
from mnist_sweep import config
from mnist_sweep.config import CONF_DIR, RULES, ConfigError, describe_rules, validate
from mnist_sweep.model import ConvNet


"""The config: every group composes and builds, every rule in config.RULES is one line, and
--help lists them all."""


@pytest.mark.parametrize(
    "model,optim,scheduler", list(itertools.product(options("model"), options("optim"), options("scheduler")))
)
def test_every_group_combination_composes_and_instantiates(model, optim, scheduler):
    cfg = compose_with(f"model={model}", f"optim={optim}", f"scheduler={scheduler}")
    validate(cfg)
    net = instantiate(cfg.model)
    optimizer = instantiate(cfg.optim)(net.parameters())
    schedule = instantiate(cfg.scheduler)(optimizer, total_steps=10)
    assert isinstance(net, ConvNet)
    # the one-cycle schedule peaks at optim.lr and starts div_factor below it
    assert schedule.get_last_lr()[0] == pytest.approx(cfg.optim.lr / cfg.scheduler.div_factor)
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_the_groups_offer_what_the_docs_promise():
    assert {"shallow", "deep"} <= set(options("model"))
    assert {"sgd", "adam"} <= set(options("optim"))
    assert {"none", "shift", "affine"} <= set(options("augment"))
    cfg = compose_with()
    assert cfg.optim._target_ == "torch.optim.SGD" and cfg.optim.momentum > 0
    assert compose_with("model=deep").model.convs_per_block > cfg.model.convs_per_block


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lr=0"], "optim.lr must be > 0, got 0"),
        (["optim.lr=-0.1"], "optim.lr must be > 0"),
        (["optim.lr=abc"], "optim.lr must be > 0, got 'abc'"),
        (["data.batch_size=0"], "data.batch_size must be >= 1"),
        (["data.eval_batch_size=0"], "data.eval_batch_size must be >= 1"),
        (["epochs=0"], "epochs must be >= 1"),
        (["threads=-1"], "threads must be >= 0"),
        (["device=tpu"], "device must be one of auto, cpu, cuda, mps"),
        (["mlflow.model_format=onnx"], "mlflow.model_format must be pt2, pickle or null"),
        (["mlflow.log_models=some"], "mlflow.log_models must be best or all, got 'some'"),
        (["model.kernel_size=4"], "model.kernel_size must be a positive odd integer .*, got 4"),
        (["model.kernel_size=-1"], "model.kernel_size must be a positive odd integer"),
        (["model.kernel_size=3.0"], "model.kernel_size must be a positive odd integer"),
        (["model.downsample=avg"], "model.downsample must be pool, stride or stride_first, got 'avg'"),
        (["model.channels=[]"], r"model.channels must be a positive width, or a list of 1 to 4 positive widths, "
                                r"one per block, got \[\]"),
        (["model.channels=[8,8,8,8,8]"], "model.channels must be a positive width, or a list of 1 to 4"),
        (["model.channels=[8,0]"], "model.channels must be a positive width, or a list"),
        (["model.channels=[8,true]"], "model.channels must be a positive width, or a list"),
        (["model.channels=0"], "model.channels must be a positive width, or a list .*, got 0"),
        (["model.channels=16.0"], "model.channels must be a positive width, or a list"),
        (["augment=shift", "augment.shift=14"], r"augment.shift must be an integer in \[0, 14\), got 14"),
        (["augment.shift=-1"], r"augment.shift must be an integer in \[0, 14\)"),
        (["augment.shift=1.5"], r"augment.shift must be an integer in \[0, 14\)"),
        (["augment=affine", "augment.degrees=-5"], r"augment.degrees must be in \[0, 180\], got -5"),
        (["augment=affine", "augment.scale=1.0"], r"augment.scale must be in \[0, 1\), got 1.0"),
        (["data.val_size=-1"], r"data.val_size must be >= 0 \(0: no validation split\), got -1"),
        (["model.convs_per_block=0"], "model.convs_per_block must be an integer >= 1"),
        (["model.batch_norm=maybe"], "model.batch_norm must be true or false, got 'maybe'"),
        (["model.dropout=1.5"], r"model.dropout must be in \[0, 1\), got 1.5"),
        (["model.dropout=1"], r"model.dropout must be in \[0, 1\)"),
        (["model.dropout=-0.1"], r"model.dropout must be in \[0, 1\)"),
        (["model.dropout=null"], r"model.dropout must be in \[0, 1\), got null"),
        (["optim.momentum=1.0"], r"optim.momentum must be in \[0, 1\)"),
        (["optim.momentum=-0.5"], r"optim.momentum must be in \[0, 1\)"),
        (["optim.momentum=0"], "optim.nesterov=true needs optim.momentum > 0, got optim.momentum=0"),
        (["optim.nesterov=yes"], "optim.nesterov must be true or false"),
        (["optim.weight_decay=-1e-4"], "optim.weight_decay must be >= 0"),
        (["optim=adam", "optim.weight_decay=-1e-4"], "optim.weight_decay must be >= 0"),
        (["optim=adam", "optim.betas=[0.9,1.0]"], r"optim.betas must be two floats in \[0, 1\)"),
        (["optim=adam", "optim.betas=[0.9]"], r"optim.betas must be two floats in \[0, 1\)"),
        (["optim=adam", "optim.betas=[0,0.5]"], r"optim.betas must be two floats .*, got \[0, 0.5\]"),
        (["scheduler.pct_start=0"], r"scheduler.pct_start must be in \(0, 1\)"),
        (["scheduler.pct_start=1"], r"scheduler.pct_start must be in \(0, 1\)"),
        (["scheduler.div_factor=0"], "scheduler.div_factor must be > 0"),
        (["scheduler.final_div_factor=-1"], "scheduler.final_div_factor must be > 0"),
        (["scheduler.cycle_momentum=1"], "scheduler.cycle_momentum must be true or false"),
        (["mlflow.system_metrics_interval=0"], r"mlflow.system_metrics_interval must be > 0 \(seconds"),
    ],
)
def test_every_documented_constraint_is_a_one_line_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate(compose_with(*overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["model.kernel_size=5", "model.channels=[8]", "model.dropout=0.5", "model.convs_per_block=2"],
    ["model.channels=8", "augment=affine", "augment.shift=13", "augment.degrees=180", "augment.scale=0.9"],
    ["optim.momentum=0", "optim.nesterov=false", "optim.weight_decay=0"],
    ["optim=adam", "optim.betas=[0.0,0.5]"],
    ["scheduler.pct_start=0.9", "scheduler.cycle_momentum=false"],
])
def test_values_inside_the_constraints_pass_and_build(overrides):
    """Each constraint is no tighter than torch: what validate accepts builds and runs a step."""
    cfg = compose_with(*overrides)
    validate(cfg)
    net = instantiate(cfg.model)
    optimizer = instantiate(cfg.optim)(net.parameters())
    schedule = instantiate(cfg.scheduler)(optimizer, total_steps=10)
    images = instantiate(cfg.augment)(torch.rand(2, 1, 28, 28) * 255, torch.Generator().manual_seed(0))
    net(images).sum().backward()
    optimizer.step()
    schedule.step()


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="epochs=abc") as err:
        compose_with("epochs=abc")
    assert "could not be converted to Integer" in str(err.value.__cause__)


def test_unknown_group_option_lists_the_options():
    with pytest.raises(MissingConfigException) as err:
        compose_with("model=nope")
    assert "shallow" in str(err.value) and "deep" in str(err.value)


def test_state_is_anchored_in_the_checkout_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_with()
    assert cfg.mlflow.tracking_uri == f"sqlite:///{CONF_DIR.parent}/outputs/mlflow.db?timeout=60"
    assert cfg.data.root == str(CONF_DIR.parent / "data")


def test_help_lists_every_rule_from_their_one_home(capsys):
    """``python -m mnist_sweep --help`` prints the rules from config.RULES: no hand-written copy."""
    listed = describe_rules().splitlines()
    assert [line.split()[0] for line in listed[:len(RULES)]] == [key for key, _, _ in RULES]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    footer = cfg.hydra.help.footer
    assert all(line.replace("$", "$$") in footer for line in listed)
    assert re.search(r"^mlflow\.tracking_uri +set \(stores=server reads it from \$\$MLFLOW_TRACKING_URI\)$", footer,
                     re.MULTILINE)  # a dollar sign doubled: Hydra's help would read $X as a variable


def test_the_output_folder_is_made_before_hydra_writes_there_or_its_fault_is_one_line(tmp_path, monkeypatch):
    config.make_output_folder(tmp_path / "outputs" / "runs" / "1")
    assert (tmp_path / "outputs" / "runs" / "1").is_dir()
    in_the_way = tmp_path / "notes.txt"
    in_the_way.write_text("")
    with pytest.raises(SystemExit) as exit_:
        config.make_output_folder(in_the_way / "runs")
    assert str(exit_.value) == (f"error: cannot make the output folder {in_the_way / 'runs'} ({in_the_way} is a "
                                "file, not a folder): set paths.outputs to a folder you can write")
    monkeypatch.setattr(config.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**19))
    with pytest.raises(SystemExit, match=r"^error: the disk holding .+ is full \(512 KiB free, a run needs 1 MiB"):
        config.make_output_folder(tmp_path / "outputs")


@pytest.mark.slow  # four processes
@pytest.mark.parametrize("where", ["a file in the way", "a read-only disk"])
def test_outputs_that_cannot_be_written_are_one_line_for_a_run_and_a_sweep(overrides, tmp_path, small_disk, where):
    """Up to ~30 s a case on a loaded machine: a run and a sweep, each its own process, as a user meets the error."""
    if where == "a file in the way":
        (tmp_path / "notes.txt").write_text("")
        outputs, why = tmp_path / "notes.txt" / "outputs", "is a file, not a folder"
    else:
        outputs, why = small_disk("1m", read_only=True) / "outputs", "Read-only file system"
    for mode in ([], ["-m"]):
        done = run_cli("mnist_sweep", *mode, *overrides, f"paths.outputs={outputs}")
        assert_one_line_error(done, f"cannot make the output folder {outputs}", why, "set paths.outputs")
        assert done.stdout == ""  # nothing began
