"""eval.py's arguments -> one evaluation: checkpoint lookup, config layering, layers, schedule, and
the protocol objects (`ProbeProtocol`, `KnnProtocol`) whose signed fields go to eval.json and resume.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from probes.heads import valid_layers
from rotnet.checkpoint import differences, find_checkpoint, load_checkpoint
from rotnet.cli import UsageError
from rotnet.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config, migrate
from rotnet.distributed import DistInfo

DEFAULT_CONFIG = "configs/sample.yaml"

UNSIGNED = {"signed": False}   # field metadata: a Protocol field that does not change the numbers

def resolve_config(config: str | None, checkpoint: str | None,
                   overrides: list[str]) -> tuple[Config, Config, Path | None, dict | None]:
    """(cfg, trained, checkpoint path, checkpoint). cfg: data and probe settings of `config`, else the
    checkpoint's, overrides on top, model always the checkpoint's. trained: the config that made the
    trunk (the checkpoint's, or cfg for 'random')."""
    name = config or DEFAULT_CONFIG
    cfg = load_config(name, overrides)
    path = resolve_checkpoint(checkpoint, cfg.train.output_dir, name)
    if path is None:
        return cfg, cfg, None, None
    ckpt = load_checkpoint(path)
    refuse_model_overrides(path, ckpt["config"], overrides)
    raw = config_to_dict(cfg) if config else apply_overrides(migrate(ckpt["config"]), overrides)
    cfg = config_from_dict({**raw, "model": ckpt["config"]["model"]}, f"{path} config + overrides")
    return cfg, config_from_dict(ckpt["config"], str(path)), path, ckpt


def refuse_model_overrides(path: Path, saved: dict, overrides: list[str]) -> None:
    """UsageError when a `model.*` override asks for another model than checkpoint `path` holds: the
    trunk is the checkpoint's, so the override cannot apply (the checkpoint's own value is fine)."""
    asked = [ov for ov in overrides if ov.split("=", 1)[0].strip().startswith("model.")]
    saved = migrate(saved)
    diffs = differences(saved, apply_overrides(saved, asked), [ov.split("=", 1)[0].strip() for ov in asked])
    if diffs:
        raise UsageError(f"{'; '.join(diffs)}: the model comes from the checkpoint {path}, so a model.* "
                         "override cannot change it; drop the override, or pass another --checkpoint")


def resolve_checkpoint(arg: str | None, output_dir: str, config_name: str) -> Path | None:
    """Checkpoint file; None for 'random'. None: the latest of `output_dir`; a folder: its checkpoint.pt."""
    if arg == "random":
        return None
    p = Path(output_dir if arg is None else arg)
    if arg is not None and p.is_file():
        return p
    found = find_checkpoint(p)
    if found is None and arg is None:
        raise UsageError(f"no checkpoint in {output_dir}/ (train.output_dir of {config_name}). Run "
                         f"`python train.py --config {config_name}` first, or pass --checkpoint PATH, "
                         "or --checkpoint random for the random-init baseline.")
    if found is None:
        raise UsageError(f"no checkpoint.pt in folder {p}; pass the checkpoint file itself" if p.is_dir() else
                         f"checkpoint not found: {p} (pass a checkpoint file, a run folder, or 'random')")
    return found


def parse_layers(text: str, trunk, head: str) -> list[str]:
    """'conv4' | 'conv2,conv4' | 'all' -> validated layers, shallow to deep, no duplicates."""
    valid = valid_layers(head, trunk)
    if text.strip() == "all":
        return valid
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in wanted if name not in valid]
    if bad or not wanted:
        where = f"--head {head} on {trunk.arch}" if valid != list(trunk.layer_names) else trunk.arch
        raise UsageError(f"--layer {text!r}: unknown layer(s) {', '.join(bad) or '(none given)'} for "
                         f"{where}; valid choices: {', '.join(valid)} or all")
    return sorted(set(wanted), key=valid.index)


def stretch_schedule(table: list[list[float]], from_epochs: int, to_epochs: int,
                     lr: float | None) -> list[list[float]]:
    """(epoch, lr) table for `to_epochs` epochs; lr given: scaled so the first entry equals it.
    Milestones are not rounded: a 1-2 epoch run would collapse every stage onto epoch 0."""
    if from_epochs < 1 or to_epochs < 1:
        raise UsageError(f"epochs must be >= 1 (probe.epochs={from_epochs}, --epochs={to_epochs})")
    f = to_epochs / from_epochs
    g = 1.0 if lr is None else lr / table[0][1]
    return [[round(e * f, 4), float(f"{v * g:.6g}")] for e, v in table]


@dataclass
class Protocol:
    """What both protocols share. Fields without UNSIGNED change the numbers: they go to eval.json's
    meta and the resume signature. Each protocol adds `meta()` and `summary()` (for the log)."""
    head: str
    layers: list[str]
    batch_size: int
    precision: str
    seed: int
    labels_per_class: int
    info: DistInfo = field(metadata=UNSIGNED)   # its world_size is signed
    cfg: Config = field(metadata=UNSIGNED)      # its data (not its loader) and probe SGD are signed

    def signed(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("signed", True)}


@dataclass
class ProbeProtocol(Protocol):
    """Trained probes (--head linear/mlp/conv): `probes.engine.fit_probes`."""
    epochs: int
    schedule: list[list[float]]
    finetune: bool
    val_every: int = field(metadata=UNSIGNED)   # extra val scores for the log only
    out: Path = field(metadata=UNSIGNED)        # probe_state_*.pt and eval_log.jsonl

    def meta(self) -> dict:
        return {**self.signed(), "model_selection": "none (last epoch)"}

    def summary(self) -> str:
        stretched = self.epochs != self.cfg.probe.epochs
        return (f"{self.epochs} epochs, (epoch, lr) schedule {self.schedule}"
                + (f", milestones stretched from probe.epochs={self.cfg.probe.epochs}" if stretched else ""))

    def signature(self, kind: str, checkpoint: str) -> dict:
        """Everything that changes the numbers of the `kind` run (resume refuses a mismatch)."""
        raw = config_to_dict(self.cfg)
        return {"model": kind, "checkpoint": checkpoint, **self.signed(), "world_size": self.info.world_size,
                "data": raw["data"],
                "probe": {k: raw["probe"][k] for k in ("momentum", "nesterov", "weight_decay")}}


@dataclass
class KnnProtocol(Protocol):
    """Weighted k-NN on frozen features (--head knn): `probes.knn.knn_probe`."""
    # reported under meta["knn"], not among the signed fields
    k: int = field(metadata=UNSIGNED)      # neighbours that vote
    t: float = field(metadata=UNSIGNED)    # vote temperature: weight exp(cosine / t)
    pool: str = field(metadata=UNSIGNED)   # avg | grid (probes.knn.POOLS)

    def meta(self) -> dict:
        d = self.cfg.data
        return {**self.signed(), "epochs": 0, "model_selection": "none (no training)",
                "knn": {"k": self.k, "T": self.t, "pool": self.pool, "similarity": "cosine",
                        "bank": f"{d.train_dir} (eval recipe)", "queries": d.val_dir}}

    def summary(self) -> str:
        return f"k={self.k}, T={self.t}, {self.pool} pooling, no training"
