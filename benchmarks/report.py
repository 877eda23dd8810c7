"""What the benchmark scripts share for their reports in docs/benchmarks.md: a one-line machine
description, an append-only writer, and the ledger that keeps the log append-only. The commit
comes from rotnet.checkpoint.git_commit().

    from benchmarks.report import append_block, machine, publish
    python -m benchmarks.report --ledger      # after adding blocks: protect their lines too

The ledger (docs/benchmarks.ledger) holds a short hash of every line of docs/benchmarks.md as
recorded; tests/benchmarks/test_report.py fails when a line it holds was edited or removed, so
the check needs no git history (a shallow CI checkout has none).
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import platform
from pathlib import Path

import torch

from rotnet.atomic import write_text

LOG = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
LEDGER = LOG.with_suffix(".ledger")
TITLE = "# Benchmarks\n\nAppend-only results of the scripts in benchmarks/.\n"


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """'AMD EPYC (family 25 model 1; AVX2, no native bf16)': the model name alone does not tell a
    Zen 3 from a Zen 4 EPYC, whose speeds differ ~2x here (bf16 is native on one only), so the
    family/model and the vector features that decide train.precision=auto come with it."""
    cpu = platform.processor() or platform.machine() or "cpu"
    try:
        with open(cpuinfo) as f:
            head = f.read().split("\n\n", 1)[0]   # the first processor's block
    except OSError:
        return cpu
    fields = dict(line.split(":", 1) for line in head.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no native bf16"
    where = f"family {fields['cpu family']} model {fields['model']}; " if "cpu family" in fields else ""
    return f"{fields.get('model name', cpu)} ({where}{isa}, {bf16})"


def machine(device: torch.device | str | None = None) -> str:
    """'CPU model (details), N cores[, GPU name], torch X'. The GPU is named when `device` is a cuda
    device, or, with no device given, when CUDA is available (then device 0)."""
    text = f"{cpu_name()}, {os.cpu_count()} cores"
    if device is None:
        if torch.cuda.is_available():
            text += f", GPU {torch.cuda.get_device_name(0)}"
    elif torch.device(device).type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    return f"{text}, torch {torch.__version__}"


def append_block(path: str | Path, text: str, heading: str | None = None, intro: str = "") -> None:
    """Add `text` to the report at `path`, creating it (title + one-line description) if missing.

    Without `heading`, `text` is written verbatim at the end of the file. With `heading` (a
    '## ...' line), it goes at the end of that section, which is created at the end of the file
    (followed by `intro`, if any) the first time. Nothing already there is changed."""
    path = Path(path)
    if heading is None:
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as f:
            if new:
                f.write(TITLE)
            f.write(text)
        return
    doc = path.read_text(encoding="utf-8") if path.exists() else TITLE
    if heading not in doc:
        doc = doc.rstrip("\n") + f"\n\n{heading}\n" + (f"\n{intro.strip(chr(10))}\n" if intro else "")
    start = doc.index(heading) + len(heading)
    nxt = doc.find("\n## ", start)
    end = len(doc) if nxt < 0 else nxt + 1
    doc = doc[:end].rstrip("\n") + "\n\n" + text.strip("\n") + "\n" + ("\n" + doc[end:] if nxt >= 0 else "")
    write_text(path, doc)   # a kill mid-write must not cost the file its earlier blocks


def publish(text: str, out: str | Path, heading: str, intro: str = "", write: bool = True) -> None:
    """Print a script's block, then (write=True, i.e. without --no-write) add it under `heading`."""
    print(text)
    if write:
        append_block(out, text, heading=heading, intro=intro)
        print(f"added to {out}")


# ---------------------------------------------------------------------------- the append-only ledger

def line_hashes(text: str) -> list[str]:
    """12 hex digits of each line's SHA-256: the ledger's form of a file's lines."""
    return [hashlib.sha256(line.encode()).hexdigest()[:12] for line in text.splitlines()]


def lost_lines(old: list[str], new: list[str]) -> list[int]:
    """Indices of the lines of `old` that `new` does not keep in order (edited, removed or moved);
    lines inserted anywhere are fine. Works on lines or on their hashes."""
    ops = difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
    return [i for tag, i1, i2, _, _ in ops if tag in ("replace", "delete") for i in range(i1, i2)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Record docs/benchmarks.md's lines in its ledger.")
    ap.add_argument("--ledger", action="store_true", required=True,
                    help="rewrite docs/benchmarks.ledger; refused if the log lost a line the ledger holds")
    ap.parse_args(argv)
    text = LOG.read_text(encoding="utf-8")
    lost = lost_lines(LEDGER.read_text().split(), line_hashes(text)) if LEDGER.exists() else []
    if lost:
        raise SystemExit(f"{LOG}: lines {[i + 1 for i in lost]} of the recorded log were edited or removed")
    write_text(LEDGER, "\n".join(line_hashes(text)) + "\n")


if __name__ == "__main__":
    main()
