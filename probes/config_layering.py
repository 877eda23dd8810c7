"""eval.py's config, in layers: the data and probe settings of --config, else the checkpoint's, the
overrides on top, the model always the checkpoint's."""
from __future__ import annotations

from pathlib import Path

from probes.checkpoint_lookup import resolve_checkpoint
from rotnet.checkpoint import differences, load_checkpoint
from rotnet.cli import UsageError
from rotnet.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config, migrate

DEFAULT_CONFIG = "configs/sample.yaml"


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
