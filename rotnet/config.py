"""Typed run configuration: YAML -> frozen dataclasses, dotted CLI overrides, strict checking (a typo
fails at once, naming the key, instead of falling back to a default).

    cfg = load_config("configs/sample.yaml", ["optim.epochs=5", "data.root=/data/imagenet"])
    cfg = override(cfg, {"train.max_steps": 20})       # a changed copy; a Config is never written into

What a run derives from cfg (the batch, the precision, the sample-data root) is filled in once, by
train.resolve, and saved as resolved (config.yaml, checkpoints).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from rotnet.atomic import write_text
from rotnet.cli import InputError


class ConfigError(InputError):
    """A config file or override is wrong; the message names the file and key."""


def _at_least(low, section: str, obj, *names: str) -> None:
    """What a type cannot say is checked in each section's __post_init__, wherever a config is made (a
    file, an override, code), so a bad value stops a run before anything is written."""
    for name in names:
        if getattr(obj, name) < low:
            raise ConfigError(f"{section}.{name}={getattr(obj, name)!r}: must be at least {low}")


def check_schedule(table: list[list[float]], name: str) -> None:
    """An (epoch, lr) table: [epoch, lr] pairs, epochs from 0 upwards, no lr below 0; else ConfigError."""
    if not table or any(len(row) != 2 for row in table):
        raise ConfigError(f"{name}: expected a non-empty list of [epoch, lr] pairs, got {table!r}")
    epochs = [row[0] for row in table]
    if epochs[0] != 0 or epochs != sorted(epochs):
        raise ConfigError(f"{name}: epochs must start at 0 and increase, got {epochs}")
    if any(row[1] < 0 for row in table):
        raise ConfigError(f"{name}: an lr below 0 in {table!r}")


def _check_sgd(section: str, hp) -> None:
    """SGD settings of optim or probe: the table, epochs, momentum (nesterov needs some), weight decay."""
    check_schedule(hp.schedule, f"{section}.schedule")
    _at_least(1, section, hp, "epochs")
    _at_least(0, section, hp, "momentum", "weight_decay")
    if hp.nesterov and hp.momentum == 0:
        raise ConfigError(f"{section}.nesterov=true needs {section}.momentum > 0 (the paper: 0.9)")


@dataclass(frozen=True)
class DataConfig:
    """What the data IS: every field changes the numbers, so resume and probe checks compare them all."""
    root: str = ""                 # ImageNet-layout folder (SPLIT/CLASS/IMG); "" = built-in sample data
    train_dir: str = "train"       # sub-folder of root used for pretraining / probe training
    val_dir: str = "val"           # sub-folder of root used for held-out rotation accuracy / probe val
    file_list: str = ""            # optional list written by `python -m pipelines.scan` (bad files removed)
    format: Literal["folder", "shards"] = "folder"   # shards: `python -m pipelines.pack_shards` output
    recipe: Literal["imagenet", "cifar"] = "imagenet"   # imagenet: resized crop; cifar: pad-4 crop; both flip
    crop_size: int = 224           # square output side; rotations of a square crop stack exactly
    resize_size: int = 256         # val recipe: resize shorter side, then center-crop crop_size
    min_scale: float = 0.08        # random-resized-crop lower area bound
    rotations: list[int] = field(default_factory=lambda: [0, 90, 180, 270])  # paper Table 2 sets
    rotation_mode: Literal["all", "one_random"] = "all"   # one_random: one rotation of each crop
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def __post_init__(self):
        rots = self.rotations
        if len(rots) < 2:
            raise ConfigError(f"data.rotations={rots}: at least two angles to tell apart; the paper's set "
                              "is [0, 90, 180, 270]")
        bad = [r for r in rots if r % 45 or not 0 <= r < 360]
        if bad:
            raise ConfigError(f"data.rotations: {bad} are not multiples of 45 in [0, 360)")
        if len(set(rots)) != len(rots):
            raise ConfigError(f"data.rotations has duplicates: {rots}")
        _at_least(1, "data", self, "crop_size")
        if self.recipe == "imagenet" and self.resize_size < self.crop_size:
            raise ConfigError(f"data.resize_size={self.resize_size} is below data.crop_size="
                              f"{self.crop_size}: the eval crop would be padded with black (ImageNet: 256)")
        if not 0 < self.min_scale <= 1:
            raise ConfigError(f"data.min_scale={self.min_scale}: the smallest crop's share of the image "
                              "area, in (0, 1] (ImageNet: 0.08)")
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean) or min(self.std) <= 0:
            raise ConfigError(f"data.mean={self.mean}, data.std={self.std}: one value for every channel or "
                              "three (RGB) each, and every std above 0")


@dataclass(frozen=True)
class LoaderConfig:
    """How the data is LOADED: speed and memory only, so a resumed run or probe may change these."""
    backend: Literal["auto", "dali", "torch"] = "auto"   # auto: dali when importable
    resident: bool = False         # decode once, keep uint8 images in (GPU) memory; for CIFAR-sized sets
    num_threads: int = 4           # DALI CPU threads / DataLoader workers per process
    prefetch: int = 2              # batches queued ahead
    # DALI: samples read at once per rank (threads), files or shard members, to hide the storage's
    # latency (Lustre/GPFS/NFS: ms a read); at least 1. docs/pipelines.md, "What to tune".
    reads_in_flight: int = 64
    hw_decoder_load: float = 0.65  # DALI mixed decoder: share of images sent to the A100/H100 HW decoder
    # nvJPEG bytes per training decoder thread (0: DALI's defaults); every rank pins them: docs/pipelines.md
    device_memory_padding: int = 0
    host_memory_padding: int = 0
    normalize: Literal["auto", "graph", "trainer"] = "auto"  # auto: graph on GPU, trainer on CPU
    dali_rotate_in_graph: bool = False   # CPU only: false: OpenCV resizes/flips/rotates (faster)

    def __post_init__(self):
        _at_least(0, "loader", self, "num_threads", "device_memory_padding", "host_memory_padding")
        _at_least(1, "loader", self, "prefetch", "reads_in_flight")
        if not 0 <= self.hw_decoder_load <= 1:
            raise ConfigError(f"loader.hw_decoder_load={self.hw_decoder_load}: a share, in [0, 1]")


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["alexnet", "resnet18", "resnet50", "nin"] = "alexnet"   # the keys of models.MODELS
    width: float = 1.0             # channel multiplier; <1 gives CPU-sized variants
    num_blocks: int = 4            # nin only: 3, 4 or 5

    def __post_init__(self):
        if self.width <= 0:
            raise ConfigError(f"model.width={self.width}: the channel multiplier must be > 0")
        if self.arch == "nin" and self.num_blocks not in (3, 4, 5):
            raise ConfigError(f"model.num_blocks={self.num_blocks}: nin has 3, 4 or 5 blocks")


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 30
    # ORIGINAL images per step: set ONE (the other 0, or agreeing; `resolve_batch`). Paper: global 192.
    global_batch_size: int = 0
    batch_size_per_gpu: int = 192
    # (epoch, lr) table: lr = the last entry whose epoch <= current epoch. Paper: 0.01, /10 at 10, 20.
    schedule: list[list[float]] = field(default_factory=lambda: [[0, 0.01], [10, 0.001], [20, 0.0001]])
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    scale_lr: bool = False         # every lr *= global_batch / ref_batch (Goyal et al. 2017)
    ref_batch: int = 256
    warmup_epochs: float = 0.0     # linear warm-up from 0 (use with scale_lr for large batches)

    def __post_init__(self):
        _check_sgd("optim", self)
        _at_least(1, "optim", self, "ref_batch")
        _at_least(0, "optim", self, "warmup_epochs", "global_batch_size", "batch_size_per_gpu")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/sample"  # checkpoints, config.yaml, log.jsonl, tensorboard; resumes from here
    lock: bool = True              # one live run per output_dir (rotnet/runlock.py); false: no lock at all
    seed: int = 0
    # auto: bf16 where the hardware has it, else fp16 on GPUs, fp32 on CPUs (emulated bf16 is slow)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"   # fp16 adds a GradScaler
    channels_last: bool = True
    compile: bool = False          # torch.compile the model
    sync_bn: bool = False          # SyncBatchNorm across ranks
    keep_last: int = 2             # rolling checkpoints kept
    save_every: int = 0            # also keep a numbered copy every N epochs (0: never)
    log_every: int = 10            # steps between progress-bar / TensorBoard updates
    # where scalars go besides log.jsonl: tensorboard, wandb, mlflow (rotnet/progress.py, docs/training.md)
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    max_steps: int = 0             # stop after this many steps in total (0: no limit); for smoke tests
    # Held-out rotation accuracy on data.val_dir every N epochs and after the last; 0 = off.
    eval_rotation_every: int = 1
    # kNN top-1 (probes/knn.py, docs/eval.md) every N epochs and after the last; 0 = off; needs class folders
    monitor_every: int = 0
    monitor_layers: list[str] = field(default_factory=list)  # [] = the trunk's middle probe layer
    monitor_bank_per_class: int = 20    # bank: seeded K-per-class subset of data.train_dir (eval recipe)
    monitor_query_per_class: int = 10   # queries: seeded subset of data.val_dir; 0 = the whole split

    def __post_init__(self):
        _at_least(0, "train", self, "keep_last", "save_every", "max_steps", "eval_rotation_every",
                  "monitor_every", "monitor_query_per_class")
        _at_least(1, "train", self, "log_every", "monitor_bank_per_class")


@dataclass(frozen=True)
class ProbeConfig:
    """Frozen-layer evaluation defaults (eval.py); CLI flags override them."""
    head: Literal["linear", "mlp", "conv"] = "linear"   # probes.heads.HEADS
    epochs: int = 35
    batch_size_per_gpu: int = 192
    # (epoch, lr) table; the original linear-probe schedule: 0.01, /5 at epochs 5, 15, 25.
    schedule: list[list[float]] = field(default_factory=lambda: [[0, 0.01], [5, 0.002], [15, 0.0004],
                                                                 [25, 0.00008]])
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4

    def __post_init__(self):
        _check_sgd("probe", self)
        _at_least(1, "probe", self, "batch_size_per_gpu")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def _check(value, tp, where: str):
    """Return `value` converted to type `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}={value!r}: expected one of {', '.join(map(str, choices))}")
        return value
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:   # YAML reads "5e-4" as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


LOADER_KEYS = tuple(f.name for f in dataclasses.fields(LoaderConfig))

# Unknown keys people type for a setting that lives elsewhere: the hint names where.
_LR = "the lr lives in optim.schedule, an (epoch, lr) table, e.g. optim.schedule=[[0,0.1],[10,0.01]]"
_BATCH = "the batch is optim.global_batch_size (all GPUs) or optim.batch_size_per_gpu"
PITFALLS = {
    "optim.lr": _LR, "optim.learning_rate": _LR,
    "probe.lr": "the probe lr lives in probe.schedule, an (epoch, lr) table (or eval.py --lr)",
    "optim.batch_size": _BATCH, "train.batch_size_per_gpu": _BATCH, "data.batch_size": _BATCH,
    "train.epochs": "the number of epochs is optim.epochs (probes: probe.epochs)",
    "model.name": "the architecture is model.arch",
    "train.eval_rotation": "the held-out rotation pass is train.eval_rotation_every (N epochs; 0 = off)",
    "data.sample_seed": "data.root \"\" is the sample set of seed 0; for another, set data.root to the "
                        "folder that `python -m pipelines.sample_data --seed N` prints",
    **{f"data.{k}": f"data.{k} moved to loader.{k} (how data is loaded, not what it is)"
       for k in LOADER_KEYS},
}


def _unknown_key(name: str, value, where: str, known: list[str]) -> ConfigError:
    """Unknown key `name` of section `where` ('' = top level): a pitfall hint, close spellings or the keys."""
    key = f"{where}.{name}" if where else name
    shown = f"{key}={value!r}"
    if isinstance(value, dict) and len(value) == 1:   # `no.such=1` reads {'no': {'such': 1}}
        (sub, v), = value.items()
        shown = f"{key}.{sub}={v!r}"
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if key in PITFALLS:
        hint = PITFALLS[key]
    elif close:
        hint = "did you mean " + " or ".join(f"{where}.{c}" if where else c for c in close) + "?"
    else:
        hint = f"{'keys of ' + where if where else 'sections'}: {', '.join(known)}"
    return ConfigError(f"unknown key {shown}{'' if where else f' (no section {name})'}; {hint}")


def _from_dict(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise _unknown_key(str(unknown[0]), raw[unknown[0]], where, known)
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value or {}, key)
        else:
            kwargs[name] = _check(value, tp, key)
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def _parse(raw: dict, source: str) -> Config:
    try:
        return _from_dict(Config, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def migrate(raw: dict) -> dict:
    """A copy of a config stored by an older rotnet (checkpoint, export), in today's form.

    A user's YAML is not migrated: its old keys stop with an error naming the new one.
    """
    raw = copy.deepcopy(raw)
    if not isinstance(raw, dict):
        return raw
    data, train = raw.get("data"), raw.get("train")
    moved = {k: data.pop(k) for k in LOADER_KEYS if k in data} if isinstance(data, dict) else {}
    if moved:
        raw["loader"] = {**moved, **(raw.get("loader") or {})}
    if isinstance(train, dict) and train.pop("eval_rotation", True) is False:
        train["eval_rotation_every"] = 0
    if isinstance(data, dict):   # stored with data.root already resolved, so the seed said nothing more
        data.pop("sample_seed", None)
    return raw


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    """A stored config (a checkpoint's, an export's) -> Config, through `migrate`; strict after that."""
    return _parse(migrate(raw), source)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Copy of a raw config dict with `key.sub=value` overrides applied, values parsed as YAML."""
    raw = copy.deepcopy(raw)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key.sub=value")
        key, text = ov.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"override {ov!r}: the value is not valid YAML (quote strings with "
                              "YAML special characters, close brackets: data.rotations=[0,180])") from None
        _set_dotted(raw, key.strip(), value)
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML at `path` (None: all defaults), apply `key.sub=value` overrides, check types."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:   # a folder, no permission
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    source = (str(path) if path else "<defaults>") + (" + overrides" if overrides else "")
    return _parse(apply_overrides(raw, overrides), source)


def resolve_batch(cfg: Config, world_size: int) -> Config:
    """cfg with both optim.global_batch_size and optim.batch_size_per_gpu set from the one given."""
    o = cfg.optim
    if o.global_batch_size == 0:
        if o.batch_size_per_gpu == 0:
            raise ConfigError("optim.global_batch_size=0 and optim.batch_size_per_gpu=0: set one of them, "
                              "e.g. optim.global_batch_size=192 (the paper's AlexNet batch)")
        return override(cfg, {"optim.global_batch_size": o.batch_size_per_gpu * world_size})
    if o.batch_size_per_gpu == 0:
        if o.global_batch_size % world_size:
            raise ConfigError(f"optim.global_batch_size={o.global_batch_size} does not divide over "
                              f"{world_size} GPUs (ranks); use a multiple of {world_size}, or another "
                              "number of GPUs")
        return override(cfg, {"optim.batch_size_per_gpu": o.global_batch_size // world_size})
    if o.batch_size_per_gpu * world_size != o.global_batch_size:
        raise ConfigError(f"optim.global_batch_size={o.global_batch_size} but optim.batch_size_per_gpu="
                          f"{o.batch_size_per_gpu} x {world_size} GPUs = {o.batch_size_per_gpu * world_size}"
                          ": set one of them and the other to 0 (optim.batch_size_per_gpu=0 derives it from "
                          "the global batch)")
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def override(cfg: Config, values: dict[str, object]) -> Config:
    """A copy of cfg with dotted keys set ({"train.max_steps": 20}), checked like a loaded config."""
    raw = config_to_dict(cfg)
    for key, value in values.items():
        _set_dotted(raw, key, value)
    return _parse(raw, "override " + ", ".join(values))


def save_config(cfg: Config, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
