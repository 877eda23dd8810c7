"""Export a pretrained trunk for use outside rotnet: torchvision/timm ResNet weights or rotnet's own format.

    python -m models.export runs/r50/checkpoint.pt --format torchvision            # -> ..._torchvision.safetensors
    python -m models.export runs/r50/checkpoint.pt --format torchvision --out r50.pth   # detectron2's converter
    python -m models.export runs/nin/checkpoint.pt --format native                 # any arch, any width

Formats:
  torchvision  resnet18/resnet50 at width 1 only: the trunk's state_dict, whose keys and shapes are
               exactly torchvision's `resnet18()`/`resnet50()` minus the classifier, so
               `model.load_state_dict(sd, strict=False)` reports only fc.weight/fc.bias missing.
  timm         the same file: timm's resnet18/resnet50 use torchvision's key names and shapes
               (checked with timm 1.0.31; timm is not a rotnet dependency).
  native       rotnet's trunk format for every arch and width: trunk state_dict plus the metadata
               `load_exported(path)` needs to rebuild it. The only route for alexnet and nin:
               torchvision's AlexNet has the same channel counts at width 1 but no BatchNorm, biased
               convs and a dropout classifier, so RotNet's AlexNet weights do not load into it; NIN has
               no torchvision counterpart.

Files are .safetensors (a tensor container that loads without pickle) with string metadata in the
header: format, arch, width, num_blocks, input_size, rotations, mean, std, epochs, commit, config
(the resolved training config as JSON), source. `--out X.pth` (torchvision/timm only) writes a plain
torch state_dict instead, for tools that `torch.load` (detectron2's convert-torchvision-to-d2.py);
it carries no metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models import build_trunk
from models.rotnet import seeded_rotnet
from models.trunk import ProbeTrunk
from rotnet.atomic import atomic_path
from rotnet.checkpoint import load_checkpoint
from rotnet.cli import ArgumentParser, InputError, fail
from rotnet.config import Config, ConfigError, config_from_dict

FORMATS = ("torchvision", "timm", "native")
TORCHVISION_ARCHS = ("resnet18", "resnet50")
_TORCHVISION_CLASSIFIER = ("fc.weight", "fc.bias")


class ExportError(InputError):
    """A checkpoint or request that cannot be exported; the message names the file and the reason."""


# ---------------------------------------------------------------------------- checkpoint -> trunk

def trunk_from_checkpoint(path: str | Path) -> tuple[ProbeTrunk, Config, dict]:
    """(trunk with the checkpoint's weights in eval mode, its config, the raw checkpoint dict).

    The one place this module reads a checkpoint (models.rotnet.seeded_rotnet builds and loads the
    net, as for eval.py and visualize.py). Refuses, naming why, anything that is not a pretraining checkpoint.
    """
    if str(path).endswith(".safetensors"):
        raise ExportError(f"{path} is already an export (.safetensors); pass the train.py checkpoint (.pt)")
    try:
        ckpt = load_checkpoint(path)   # weights_only: no code runs from the pickle
    except RuntimeError as e:   # torch's own reason is often bare ("KeyError: 101" for a text file)
        cause = e.__cause__ or e
        raise ExportError(f"{path} is not a train.py checkpoint: torch.load fails "
                          f"({type(cause).__name__}: {(str(cause).splitlines() or [''])[0]})") from None
    if not isinstance(ckpt, dict):
        raise ExportError(f"{path} is not a rotnet checkpoint (a {type(ckpt).__name__}, not a dict)")
    if "probes" in ckpt and "signature" in ckpt:
        raise ExportError(f"{path} is an eval.py probe state (probe_state_*.pt), not a pretraining checkpoint; "
                          "pass the train.py checkpoint the probes were trained on")
    missing = [k for k in ("model", "config") if k not in ckpt]
    if missing:
        raise ExportError(f"{path} is not a train.py checkpoint: no {' or '.join(repr(k) for k in missing)} key "
                          f"(keys: {sorted(ckpt)[:8]})")
    cfg = config_from_dict(ckpt["config"], str(path))
    try:
        rotnet = seeded_rotnet(cfg, cfg.train.seed, ckpt["model"])   # the shared checkpoint -> RotNet loader
    except RuntimeError as e:   # torch lists every key over several lines: keep the start of the first list
        detail = (str(e).splitlines()[1:] or [str(e)])[0].strip()
        raise ExportError(f"{path}: weights do not match its config (model.arch={cfg.model.arch}, "
                          f"width={cfg.model.width}): {detail[:200]}") from None
    return rotnet.trunk.eval(), cfg, ckpt


# ---------------------------------------------------------------------------- trunk -> tensors + metadata

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


def check_torchvision_layout(trunk: ProbeTrunk, state: dict[str, torch.Tensor]) -> None:
    """Refuse, naming why, a trunk whose `state` is not torchvision's `arch()` state_dict minus the classifier."""
    if trunk.arch not in TORCHVISION_ARCHS:
        why = ("torchvision's AlexNet has no BatchNorm, biased convs and a dropout classifier"
               if trunk.arch == "alexnet" else f"torchvision has no {trunk.arch}")
        raise ExportError(f"{trunk.arch} cannot be exported as torchvision/timm weights ({why}); "
                          "use --format native and models.export.load_exported")
    if trunk.width != 1.0:
        raise ExportError(f"{trunk.arch} at width {trunk.width} has no torchvision counterpart (torchvision's "
                          "ResNet is width 1); use --format native and models.export.load_exported")
    import torchvision   # here, not at the top: it costs every start-up of the CLI ~3 s

    with torch.device("meta"):   # names and shapes only: no memory, no init
        reference = getattr(torchvision.models, trunk.arch)().state_dict()
    for key in _TORCHVISION_CLASSIFIER:
        reference.pop(key)
    wrong = sorted(k for k in state.keys() | reference.keys()
                   if k not in state or k not in reference or state[k].shape != reference[k].shape)
    if wrong:   # models/resnet.py promises torchvision's layout at width 1: a broken promise is a bug
        raise ExportError(f"{trunk.arch} trunk does not match torchvision's {trunk.arch} at keys {wrong[:5]}")


def export(checkpoint: str | Path, fmt: str, out: str | Path, force: bool = False) -> Path:
    """Write the trunk of `checkpoint` in format `fmt` to `out` (.safetensors, or .pth/.pt for
    torchvision/timm). An existing `out` is kept unless `force`. Returns `out`."""
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
    state = {k: v.detach().contiguous() for k, v in trunk.state_dict().items()}   # safetensors wants contiguous
    if fmt != "native":
        check_torchvision_layout(trunk, state)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:   # an interrupted export never leaves a truncated file under its name
        if as_torch:
            torch.save(state, tmp)   # tensors only: loads with torch.load(weights_only=True)
        else:
            save_file(state, tmp, metadata=metadata(cfg, ckpt, fmt, checkpoint))
    return out


# ---------------------------------------------------------------------------- loading an export

def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a rotnet .safetensors export (no tensors are read)."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_exported(path: str | Path) -> ProbeTrunk:
    """Rebuild a rotnet trunk (eval mode, CPU) from any .safetensors this module wrote.

    Native files hold every arch; torchvision/timm files are resnets whose keys are the trunk's
    own, so they load here too. Then use it as in rotnet: `trunk(x)`, `trunk.features(x, layers)`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"export not found: {path}")
    if path.suffix != ".safetensors":   # .pth exports carry no metadata to rebuild the trunk from
        raise ExportError(f"{path}: load_exported reads the .safetensors exports only")
    meta = read_metadata(path)
    need = [k for k in ("arch", "width", "num_blocks", "input_size") if k not in meta]
    if need:
        raise ExportError(f"{path} is not a rotnet export: its metadata lacks {need}")
    trunk = build_trunk(meta["arch"], width=float(meta["width"]), num_blocks=int(meta["num_blocks"]),
                        input_size=int(meta["input_size"]))
    trunk.load_state_dict(load_file(str(path)), strict=True)
    return trunk.eval()


# ---------------------------------------------------------------------------- CLI

def default_out(checkpoint: str | Path, fmt: str) -> Path:
    """runs/x/checkpoint.pt -> runs/x/checkpoint_torchvision.safetensors (beside the checkpoint)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_{fmt}.safetensors")


def main(argv=None) -> Path:
    ap = ArgumentParser(prog="python -m models.export", description=__doc__)
    ap.add_argument("checkpoint", help="a train.py checkpoint (runs/NAME/checkpoint.pt or epoch_NNNN.pt)")
    ap.add_argument("--format", default="torchvision", choices=FORMATS,
                    help="torchvision/timm: resnet18/50 at width 1, loads into torchvision's or timm's "
                         "resnet with only fc missing; native: any arch (alexnet, nin, other widths), "
                         "read back with models.export.load_exported (default: torchvision)")
    ap.add_argument("--out", help="output file: .safetensors (default: CHECKPOINT_FORMAT.safetensors beside the "
                                  "checkpoint), or .pth/.pt for a plain torch state_dict (torchvision/timm only; "
                                  "for detectron2's converter; no metadata)")
    ap.add_argument("--force", action="store_true", help="overwrite --out if it exists (default: refuse)")
    args = ap.parse_intermixed_args(argv)
    out = args.out or default_out(args.checkpoint, args.format)
    try:
        written = export(args.checkpoint, args.format, out, force=args.force)
    except (ExportError, ConfigError, OSError, RuntimeError) as e:   # one line, no traceback
        fail(str(e).splitlines()[0])
    print(f"wrote {written} ({args.format})")
    return written


if __name__ == "__main__":
    main()
