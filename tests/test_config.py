import itertools

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate

from mnist_sweep.config import CONF_DIR, ConfigError, validate
from mnist_sweep.model import ConvNet
from mnist_sweep.train import DeviceError, pick_device


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


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
    cfg = compose_with()
    assert cfg.optim._target_ == "torch.optim.SGD" and cfg.optim.momentum > 0
    assert compose_with("model=deep").model.convs_per_block > cfg.model.convs_per_block


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("channels", [[8], [4, 8], [4, 8, 16], [2, 4, 8, 16]])
def test_output_shape_for_every_model_and_depth(model, channels):
    cfg = compose_with(f"model={model}", f"model.channels={channels}")
    net = instantiate(cfg.model).eval()
    assert net(torch.rand(5, 1, 28, 28) * 255).shape == (5, 10)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == len(channels) * cfg.model.convs_per_block


def test_too_deep_a_model_is_refused():
    with pytest.raises(ValueError, match="1 to 4 blocks"):
        ConvNet([2, 2, 2, 2, 2])


def test_model_standardises_raw_pixels_itself():
    net = ConvNet([4], batch_norm=False).eval()
    pixels = torch.rand(2, 1, 28, 28) * 255
    shifted = net.features(((pixels - 0.1307 * 255) / (0.3081 * 255)))
    assert torch.allclose(net(pixels), net.head(shifted))


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=0", "optim.lr must be > 0"),
        ("optim.lr=-0.1", "optim.lr must be > 0"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("epochs=0", "epochs must be >= 1"),
        ("device=tpu", "device must be one of auto, cpu, cuda, mps"),
        ("mlflow.model_format=onnx", "mlflow.model_format must be pt2, pickle or null"),
    ],
)
def test_validation_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_with(override))


@pytest.mark.parametrize("name", ["cuda:x", "cuda:7", "mps"])
def test_a_device_this_machine_lacks_is_a_clear_error(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=f"device={name} is not"):
        pick_device(name)
    assert pick_device("auto") == torch.device("cpu")


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
