"""Export a pretrained trunk: torchvision/timm ResNet weights or rotnet's own format.

    python -m models.export runs/r50/checkpoint.pt --format torchvision     # -> ..._torchvision.safetensors
    python -m models.export runs/r50/checkpoint.pt --out r50.pth            # for detectron2's converter
    python -m models.export runs/nin/checkpoint.pt --format native          # any arch, any width

torchvision (= timm): resnet18/50 at width 1, torchvision's keys and shapes minus fc. native: every
arch and width, plus the header metadata `load_exported` rebuilds the trunk from (alexnet has no
BatchNorm in torchvision, nin no counterpart). .pth/.pt: a plain state_dict, no metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from models import MODELS, build_model
from models.rotnet import Trunk
from rotnet.atomic import write_bytes
from rotnet.checkpoint import atomic_save, load_checkpoint, settings_line
from rotnet.cli import ArgumentParser, InputError, fail
from rotnet.config import Config, ModelConfig, config_from_dict

FORMATS = ("torchvision", "timm", "native")
TORCHVISION_ARCHS = ("resnet18", "resnet50")
_TORCHVISION_CLASSIFIER = ("fc.weight", "fc.bias")


class ExportError(InputError):
    """A checkpoint or request that cannot be exported; the message names the file and the reason."""


# ---------------------------------------------------------------------------- checkpoint -> trunk

def trunk_from_checkpoint(path: str | Path) -> tuple[Trunk, Config, dict]:
    """(trunk in eval mode, its config, the raw checkpoint); refuses anything but a train.py checkpoint."""
    if str(path).endswith(".safetensors"):
        raise ExportError(f"{path} is already an export (.safetensors); pass the train.py checkpoint (.pt)")
    ckpt = load_checkpoint(path)   # weights_only: no code runs from the pickle; CheckpointError names it
    if not isinstance(ckpt, dict):
        raise ExportError(f"{path} is not a rotnet checkpoint (a {type(ckpt).__name__}, not a dict)")
    if "probes" in ckpt and "signature" in ckpt:
        raise ExportError(f"{path} is an eval.py probe state (probe_state_*.pt), not a pretraining "
                          "checkpoint; pass the train.py checkpoint the probes were trained on")
    missing = [k for k in ("model", "config") if k not in ckpt]
    if missing:
        keys = " or ".join(repr(k) for k in missing)
        raise ExportError(f"{path} is not a train.py checkpoint: no {keys} key (keys: {sorted(ckpt)[:8]})")
    cfg = config_from_dict(ckpt["config"], str(path))
    return build_model(cfg, cfg.train.seed, ckpt["model"], source=str(path)).trunk.eval(), cfg, ckpt


def metadata(cfg: Config, ckpt: dict, fmt: str, source: str | Path) -> dict[str, str]:
    """String metadata for the safetensors header (safetensors allows str -> str only)."""
    return {
        "format": fmt, "arch": cfg.model.arch, "width": repr(cfg.model.width),
        "num_blocks": str(cfg.model.num_blocks), "input_size": str(cfg.data.crop_size),
        "rotations": json.dumps(cfg.data.rotations), "mean": json.dumps(cfg.data.mean),
        "std": json.dumps(cfg.data.std), "epochs": str(ckpt.get("epoch", "unknown")),
        "commit": str(ckpt.get("commit", "unknown")), "config": json.dumps(ckpt["config"], sort_keys=True),
        "source": str(source),
    }


def check_torchvision_layout(trunk: Trunk, state: dict[str, torch.Tensor]) -> None:
    """Refuse, naming why, a trunk whose `state` is not torchvision's `arch()` minus the classifier."""
    if trunk.arch not in TORCHVISION_ARCHS:
        why = ("torchvision's AlexNet has no BatchNorm, biased convs and a dropout classifier"
               if trunk.arch == "alexnet" else f"torchvision has no {trunk.arch}")
        raise ExportError(f"{trunk.arch} cannot be exported as torchvision/timm weights ({why}); "
                          "use --format native and models.export.load_exported")
    if trunk.width != 1.0:
        raise ExportError(f"{trunk.arch} at width {trunk.width} has no torchvision counterpart (its ResNet "
                          "is width 1); use --format native and models.export.load_exported")
    import torchvision  # seconds of start-up, needed by this check only

    with torch.device("meta"):   # names and shapes only: no memory, no init
        reference = getattr(torchvision.models, trunk.arch)().state_dict()
    for key in _TORCHVISION_CLASSIFIER:
        reference.pop(key)
    wrong = sorted(k for k in state.keys() | reference.keys()
                   if k not in state or k not in reference or state[k].shape != reference[k].shape)
    if wrong:   # models/resnet.py promises torchvision's layout at width 1: a broken promise is a bug
        raise ExportError(f"{trunk.arch} trunk does not match torchvision's {trunk.arch} at keys {wrong[:5]}")


def export(checkpoint: str | Path, fmt: str, out: str | Path, force: bool = False) -> Path:
    """Write the trunk of `checkpoint` as `fmt` to `out`, kept if it exists unless `force`; returns `out`."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    as_torch = out.suffix in (".pth", ".pt")
    if not as_torch and out.suffix != ".safetensors":
        raise ExportError(f"{out}: use a .safetensors name (or .pth/.pt for a plain torch state_dict)")
    if as_torch and fmt == "native":
        raise ExportError(f"{out}: native exports are .safetensors only (their metadata rebuilds the trunk)")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to overwrite it")
    trunk, cfg, ckpt = trunk_from_checkpoint(checkpoint)
    print(settings_line(checkpoint, ckpt["config"], f"data.crop_size={cfg.data.crop_size} "
                        f"data.rotations={cfg.data.rotations}, mean and std too (an export takes no "
                        "overrides)"), flush=True)
    state = {k: v.detach().contiguous() for k, v in trunk.state_dict().items()}   # as safetensors wants
    if fmt != "native":
        check_torchvision_layout(trunk, state)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # atomic (an interrupted export never leaves a truncated file), serialised in memory first (a full
        # disk is a DiskFullError naming the bytes needed)
        if as_torch:
            atomic_save(state, out)   # tensors only: loads with torch.load(weights_only=True)
        else:
            write_bytes(out, save(state, metadata=metadata(cfg, ckpt, fmt, checkpoint)))
    except OSError as e:   # read-only disk, a file where a folder should be: the --out path is bad
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from e
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a rotnet .safetensors export (no tensors are read)."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_exported(path: str | Path) -> Trunk:
    """Rebuild a rotnet trunk (eval mode, CPU) from any .safetensors this module wrote (any format)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"export not found: {path}")
    if path.suffix != ".safetensors":   # .pth exports carry no metadata to rebuild the trunk from
        raise ExportError(f"{path}: load_exported reads the .safetensors exports only")
    meta = read_metadata(path)
    need = [k for k in ("arch", "width", "num_blocks", "input_size") if k not in meta]
    if need or meta.get("arch") not in MODELS:
        raise ExportError(f"{path} is not a rotnet export: its metadata lacks {need} or names an unknown "
                          f"arch {meta.get('arch')!r}")
    model = ModelConfig(arch=meta["arch"], width=float(meta["width"]), num_blocks=int(meta["num_blocks"]))
    trunk = MODELS[model.arch](model, int(meta["input_size"]))
    trunk.load_state_dict(load_file(str(path)), strict=True)
    return trunk.eval()


def default_out(checkpoint: str | Path, fmt: str) -> Path:
    """runs/x/checkpoint.pt -> runs/x/checkpoint_torchvision.safetensors (beside the checkpoint)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_{fmt}.safetensors")


def main(argv=None) -> Path:
    ap = ArgumentParser(prog="python -m models.export", description=__doc__)
    ap.add_argument("checkpoint", help="a train.py checkpoint (runs/NAME/checkpoint.pt or epoch_NNNN.pt)")
    ap.add_argument("--format", default="torchvision", choices=FORMATS,
                    help="torchvision/timm (default): resnet18/50 at width 1, loads with only fc missing; "
                         "native: any arch and width, read back with models.export.load_exported")
    ap.add_argument("--out", help="a .safetensors file (default: CHECKPOINT_FORMAT.safetensors beside it), "
                                  "or .pth/.pt: a plain state_dict for detectron2's converter (no metadata)")
    ap.add_argument("--force", action="store_true", help="overwrite --out if it exists (default: refuse)")
    args = ap.parse_intermixed_args(argv)
    out = args.out or default_out(args.checkpoint, args.format)
    try:
        written = export(args.checkpoint, args.format, out, force=args.force)
    except InputError as e:   # bad checkpoint, config or --out: one line
        fail(e)
    print(f"wrote {written} ({args.format})")
    return written


if __name__ == "__main__":
    main()
