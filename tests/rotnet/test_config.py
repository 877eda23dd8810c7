"""Config loading: YAML into frozen dataclasses, dotted overrides, strict keys and types."""
import dataclasses

import pytest
import yaml

from rotnet.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    migrate,
    override,
    resolve_batch,
    save_config,
)


def test_a_config_is_frozen_and_override_makes_a_checked_copy():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 5
    new = override(cfg, {"train.max_steps": 5, "data.rotations": [0, 180]})
    assert (new.train.max_steps, new.data.rotations) == (5, [0, 180])
    assert (cfg.train.max_steps, cfg.data.rotations) == (0, [0, 90, 180, 270])
    with pytest.raises(ConfigError, match=r"unknown key train\.max_step=5; did you mean train\.max_steps"):
        override(cfg, {"train.max_step": 5})
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected int, got str"):
        override(cfg, {"train.max_steps": "5"})


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
    """Every key the file sets arrives with its value: none dropped, renamed or migrated away."""
    import yaml

    raw = yaml.safe_load(open(path)) or {}
    loaded = config_to_dict(load_config(path))
    assert raw and all(isinstance(section, dict) for section in raw.values()), path
    assert {(s, k): v for s, sec in raw.items() for k, v in sec.items()} == \
        {(s, k): loaded[s][k] for s, sec in raw.items() for k in sec}


# ------------------------------------------------------------------ enums, hints, global batch

def test_enum_fields_name_key_value_and_choices():
    for dotted, choices in [("loader.backend=foo", "auto, dali, torch"),
                            ("train.precision=fp8", "auto, bf16"), ("data.recipe=coco", "imagenet, cifar"),
                            ("loader.normalize=x", "auto, graph, trainer"),
                            ("data.rotation_mode=two", "all, one_random"),
                            ("model.arch=vgg", "alexnet, resnet18"),
                            ("probe.head=svm", "linear, mlp, conv")]:
        key, value = dotted.split("=")
        with pytest.raises(ConfigError, match=rf"{key}='{value}': expected one of {choices}"):
            load_config(None, [dotted])


def test_literal_choices_match_what_the_code_accepts():
    import typing

    from models import MODELS
    from pipelines.batch import NORMALIZE_MODES, RECIPES
    from probes.heads import HEADS
    from rotnet.config import DataConfig, LoaderConfig, ModelConfig, ProbeConfig

    def choices(cls, name):
        return set(typing.get_args(typing.get_type_hints(cls)[name]))
    assert choices(ModelConfig, "arch") == set(MODELS)
    assert choices(ProbeConfig, "head") == set(HEADS)
    assert choices(LoaderConfig, "normalize") == set(NORMALIZE_MODES)
    assert choices(DataConfig, "recipe") == set(RECIPES)
    assert choices(DataConfig, "rotation_mode") == {"all", "one_random"}   # pipelines/batch.py's contract


@pytest.mark.parametrize("dotted, says", [
    ("data.rotations=[]", r"data.rotations=\[\]: at least two angles"),
    ("data.rotations=[90]", r"data.rotations=\[90\]: at least two angles"),   # was a traceback
    ("data.rotations=[0,30,90]", r"data.rotations: \[30\] are not multiples of 45"),
    ("data.rotations=[0,360]", r"data.rotations: \[360\] are not multiples of 45"),
    ("data.rotations=[0,90,90]", "data.rotations has duplicates"),
    ("data.crop_size=0", "data.crop_size=0: must be at least 1"),
    ("model.arch=nin model.num_blocks=2", "model.num_blocks=2: nin has 3, 4 or 5 blocks"),
    ("loader.reads_in_flight=0", "loader.reads_in_flight=0: must be at least 1"),
    ("optim.schedule=[[5,0.1]]", r"optim.schedule: epochs must start at 0 and increase, got \[5\.0\]"),
    ("optim.schedule=[[0,0.1],[20,0.01],[10,0.001]]", "optim.schedule: epochs must start at 0 and increase"),
    ("optim.schedule=[[0,0.1,3]]", r"optim.schedule: expected a non-empty list of \[epoch, lr\] pairs"),
    ("optim.schedule=[]", "optim.schedule: expected a non-empty list"),
    ("probe.schedule=[[0,-0.1]]", "probe.schedule: an lr below 0"),
    ("optim.global_batch_size=-8", "optim.global_batch_size=-8: must be at least 0"),
    ("optim.epochs=0", "optim.epochs=0: must be at least 1"),
    ("optim.momentum=-0.9", r"optim.momentum=-0.9: must be at least 0"),
    ("optim.momentum=0", r"optim.nesterov=true needs optim.momentum > 0"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs=-1.0: must be at least 0"),
    ("probe.weight_decay=-1", "probe.weight_decay=-1.0: must be at least 0"),
    ("probe.batch_size_per_gpu=0", "probe.batch_size_per_gpu=0: must be at least 1"),
    ("train.log_every=0", "train.log_every=0: must be at least 1"),   # was a ZeroDivisionError mid-epoch
    ("train.keep_last=-1", "train.keep_last=-1: must be at least 0"),
    ("train.monitor_bank_per_class=0", "train.monitor_bank_per_class=0: must be at least 1"),
    ("loader.prefetch=0", "loader.prefetch=0: must be at least 1"),
    ("loader.num_threads=-1", "loader.num_threads=-1: must be at least 0"),
    ("loader.hw_decoder_load=1.5", r"loader.hw_decoder_load=1.5: a share, in \[0, 1\]"),
    ("model.width=0", "model.width=0.0: the channel multiplier must be > 0"),
    ("data.min_scale=0", r"data.min_scale=0.0: .* in \(0, 1\]"),
    ("data.min_scale=1.5", r"data.min_scale=1.5: .* in \(0, 1\]"),
    ("data.resize_size=200", "data.resize_size=200 is below data.crop_size=224: .* padded with black"),
    ("data.std=[0.2,0,0.2]", "every std above 0"),
    ("data.mean=[0.5,0.5]", "one value for every channel or three"),
])
def test_values_a_type_cannot_check_fail_at_load_naming_the_key(dotted, says):
    overrides = dotted.split()
    with pytest.raises(ConfigError, match=says):
        load_config(None, overrides)
    values = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}
    with pytest.raises(ConfigError, match=says):   # also a config changed afterwards
        override(load_config(None), values)


@pytest.mark.parametrize("dotted", [
    "model.num_blocks=7",                                           # only nin has blocks
    "data.recipe=cifar data.crop_size=32 data.resize_size=8",       # cifar's eval does not resize
    "data.mean=[0.5] data.std=[0.25]",                              # one value for every channel
    "optim.momentum=0 optim.nesterov=false",
    "train.keep_last=0 train.max_steps=0 loader.num_threads=0",     # 0: none kept, no limit, in-process
])
def test_edge_values_that_mean_something_load(dotted):
    load_config(None, dotted.split())


def test_unknown_keys_get_hints():
    with pytest.raises(ConfigError, match=r"unknown key optim\.lr=0\.1; the lr lives in optim\.schedule"):
        load_config(None, ["optim.lr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key optim\.epoch=3; did you mean optim\.epochs\?"):
        load_config(None, ["optim.epoch=3"])
    with pytest.raises(ConfigError,
                       match=r"unknown key no\.such=1 \(no section no\); sections: data, loader"):
        load_config(None, ["no.such=1"])
    with pytest.raises(ConfigError, match=r"data\.rotations=\[0,.*not valid YAML"):
        load_config(None, ["data.rotations=[0,"])


# ------------------------------------------------------------------ configs stored by older versions

# A checkpoint's config from before `loader:` existed, while train.eval_rotation was a bool and
# data.sample_seed picked the sample set (its data.root, resolved, already names the set).
OLD = {"data": {"root": "/d", "crop_size": 64, "backend": "torch", "num_threads": 0, "resident": True,
                "dali_rotate_in_graph": False, "sample_seed": 3},
       "train": {"eval_rotation": False, "eval_rotation_every": 3}}


def test_migrate_moves_loader_keys_and_the_eval_rotation_bool_and_drops_the_sample_seed():
    new = migrate(OLD)
    assert new["data"] == {"root": "/d", "crop_size": 64}
    assert new["loader"] == {"backend": "torch", "num_threads": 0, "resident": True,
                             "dali_rotate_in_graph": False}
    assert new["train"] == {"eval_rotation_every": 0}             # false: off, whatever N said
    assert OLD["data"]["backend"] == "torch"                      # a copy: the checkpoint's dict is untouched
    on = migrate({"train": {"eval_rotation": True, "eval_rotation_every": 3}})
    assert on == {"train": {"eval_rotation_every": 3}}            # true: N stays
    # an override already under loader: (eval.py applies them before parsing) wins over the old key
    assert migrate({**OLD, "loader": {"backend": "dali"}})["loader"]["backend"] == "dali"


def test_stored_configs_are_migrated_and_todays_are_unchanged():
    cfg = config_from_dict(OLD, "ckpt.pt")
    assert (cfg.loader.backend, cfg.loader.num_threads, cfg.loader.resident) == ("torch", 0, True)
    assert cfg.data.crop_size == 64 and cfg.train.eval_rotation_every == 0
    shipped = load_config("configs/imagenette_alexnet_cpu.yaml")
    today = config_to_dict(shipped)
    assert migrate(today) == today and config_from_dict(today) == shipped


def test_old_keys_in_a_users_yaml_name_the_new_key(tmp_path):
    """A user's file is not migrated: the error names where the key lives now, so it is fixed once."""
    with pytest.raises(ConfigError, match=r"unknown key data\.backend='torch'; .*moved to loader\.backend"):
        load_config(None, ["data.backend=torch"])
    with pytest.raises(ConfigError, match=r"data\.sample_seed=3; .*pipelines\.sample_data --seed N"):
        load_config(None, ["data.sample_seed=3"])
    p = tmp_path / "old.yaml"
    p.write_text("train:\n  eval_rotation: false\n")
    with pytest.raises(ConfigError, match=r"old\.yaml.*eval_rotation=False; .*train\.eval_rotation_every"):
        load_config(p)


def _cfg(**optim):
    return load_config(None, [f"optim.{k}={v}" for k, v in optim.items()])


@pytest.mark.parametrize("optim,world,expected", [
    ({}, 1, (192, 192)),                                                  # defaults: per GPU 192
    ({"batch_size_per_gpu": 32}, 2, (64, 32)),                            # per GPU set: global derived
    ({"global_batch_size": 192, "batch_size_per_gpu": 0}, 1, (192, 192)),  # the paper, one GPU
    ({"global_batch_size": 192, "batch_size_per_gpu": 0}, 8, (192, 24)),   # the paper, 8 GPUs
    ({"global_batch_size": 192, "batch_size_per_gpu": 24}, 8, (192, 24)),  # both agree (resolved)
])
def test_resolve_batch(optim, world, expected):
    cfg = resolve_batch(_cfg(**optim), world)
    assert (cfg.optim.global_batch_size, cfg.optim.batch_size_per_gpu) == expected
    assert resolve_batch(cfg, world) == cfg                               # a resolved batch stays


@pytest.mark.parametrize("optim,world,message", [
    ({"global_batch_size": 192, "batch_size_per_gpu": 0}, 5,
     r"optim\.global_batch_size=192 does not divide over 5 GPUs"),
    ({"global_batch_size": 192}, 8,                                       # per GPU left at its default 192
     r"optim\.global_batch_size=192 but optim\.batch_size_per_gpu=192 x 8 GPUs = 1536: set one"),
    ({"global_batch_size": 0, "batch_size_per_gpu": 0}, 1, r"set one of them"),
])
def test_resolve_batch_refuses(optim, world, message):
    with pytest.raises(ConfigError, match=message):
        resolve_batch(_cfg(**optim), world)
