"""The evaluation protocols (`ProbeProtocol`, `KnnProtocol`): what one eval.py run does, whose signed
fields go to eval.json and the resume signature."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from rotnet.config import Config, config_to_dict
from rotnet.distributed import DistInfo

UNSIGNED = {"signed": False}   # field metadata: a Protocol field that does not change the numbers


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
