"""Config loading: YAML into dataclasses, dotted overrides, strict keys and types."""
import pytest

from rotnet.config import ConfigError, Config, load_config, save_config


def test_defaults_and_sample_config_load():
    assert isinstance(load_config(None), Config)
    cfg = load_config("configs/sample.yaml")
    assert cfg.model.arch == "alexnet" and cfg.data.root == ""


def test_dotted_overrides_parse_as_yaml():
    cfg = load_config("configs/sample.yaml", ["optim.weight_decay=1e-4", "data.rotations=[0,180]",
                                               "train.compile=true", "model.width=1"])
    assert cfg.optim.weight_decay == 1e-4
    assert cfg.data.rotations == [0, 180]
    assert cfg.train.compile is True
    assert cfg.model.width == 1.0 and isinstance(cfg.model.width, float)   # int widened to float


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim.*lrr"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown key.*colour"):
        load_config(None, ["data.colour=red"])
    with pytest.raises(ConfigError, match="unknown key.*datta"):
        load_config(None, ["datta.root=x"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"optim\.epochs: expected int, got str"):
        load_config(None, ["optim.epochs=many"])
    with pytest.raises(ConfigError, match=r"train\.channels_last: expected bool"):
        load_config(None, ["train.channels_last=3"])
    with pytest.raises(ConfigError, match=r"data\.rotations\[1\]: expected int"):
        load_config(None, ["data.rotations=[0,x]"])
    with pytest.raises(ConfigError, match=r"optim\.schedule: expected a list"):
        load_config(None, ["optim.schedule=0.1"])


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["optim.epochs"])


def test_round_trip(tmp_path):
    cfg = load_config("configs/sample.yaml", ["optim.epochs=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("configs/*.yaml")))
def test_every_shipped_config_loads(path):
    load_config(path)
