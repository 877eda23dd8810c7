"""Every CLI ends bad input in one line: `error: ...` last on stderr, exit code 2, no traceback,
and nothing already written is changed.

Each case calls the entry point's `main(argv)` in this process, as its `__main__` block does, and
fails before any training step: an exception other than SystemExit (what a traceback would show)
fails the test. A Python start with torch costs ~8 s, so the real processes run once per entry point
in the slow tier (test_each_entry_point_as_a_process). The checks of every value, key and type
live in tests/rotnet/test_config.py; this sweep keeps one case per kind of input per CLI.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rotnet.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
SAMPLE = "configs/sample.yaml"


@pytest.fixture(autouse=True)
def _as_the_cli_runs(monkeypatch):
    """The repo root as working directory (the cases name configs/...), no progress bars, CPU."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ROTNET_PROGRESS", "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`python ARGS` (a script, or -m MODULE) run in-process through its main(argv); what it printed
    and the exit code it would have had. Any exception but SystemExit propagates (fails the test)."""
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    module, argv = (args[1], args[2:]) if args[0] == "-m" else (args[0].removesuffix(".py"), args[1:])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = importlib.import_module(module).main(argv)
            code = result if isinstance(result, int) else 0   # `sys.exit(main())` for the int ones
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_process(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`python ARGS` as a real process in the repo root (CPU, no progress bars)."""
    env = {**os.environ, "ROTNET_PROGRESS": "0", "CUDA_VISIBLE_DEVICES": ""}
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def cases(*rows) -> list:
    """pytest params (args, expected texts) named by their arguments."""
    return [pytest.param(args, expected, id=" ".join(args)) for args, expected in rows]


def assert_one_line_error(p: subprocess.CompletedProcess, *expected: str, strict: bool = True) -> str:
    """The last stderr line is the only `error:` line and names every `expected` text; exit 2; no
    traceback. strict: it is the only line at all (no log or note before it)."""
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    assert p.returncode == 2, p.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), p.stderr[-3000:]
    assert sum(line.startswith("error") for line in lines) == 1, p.stderr[-3000:]
    if strict:
        assert len(lines) == 1, p.stderr[-3000:]
    for text in expected:
        assert text in lines[-1], lines[-1]
    return lines[-1]


# ---------------------------------------------------------------------------- train.py

TRAIN = ["train.py", "--config", SAMPLE, "train.output_dir=TMP/run"]


@pytest.mark.parametrize("args,expected", cases(
    (["loader.backend=foo"], ["loader.backend='foo'", "auto, dali, torch"]),
    (["train.precision=fp8"], ["train.precision='fp8'", "auto, bf16, fp16, fp32"]),
    (["optim.lr=0.1"], ["optim.lr=0.1", "optim.schedule"]),
    (["optim.schedule=[[1,0.1]]"], ["optim.schedule: epochs must start at 0"]),   # before the folder
    (["no.such=1"], ["no.such=1", "no section no", "data, loader, model, optim, train, probe"]),
    (["data.backend=torch"], ["data.backend='torch'", "moved to loader.backend"]),   # the key before loader:
    (["optim.epochs=many"], ["optim.epochs", "expected int", "'many'"]),
    (["data.root=/nonexistent/imagenet"], ["data.root='/nonexistent/imagenet'", "no train/ folder"]),
    (["optim.global_batch_size=100", "optim.batch_size_per_gpu=32"],
     ["optim.global_batch_size=100", "optim.batch_size_per_gpu=32 x 1 GPUs = 32"]),
    (["--config", "TMP/missing.yaml"], ["config file not found", "missing.yaml"]),
    (["--no-such-flag"], ["--no-such-flag", "--help"]),
))
def test_train_bad_input(tmp_path, args, expected):
    assert_one_line_error(run_cli([*TRAIN, *args], tmp_path), *expected)
    assert not (tmp_path / "run").exists()                    # failed before writing anything


@pytest.fixture
def existing_run(tmp_path) -> Path:
    """A run folder as an earlier run left it: checkpoint.pt (its config: sample AlexNet) and log.jsonl."""
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"config": config_to_dict(load_config(REPO / SAMPLE))}, run / "checkpoint.pt")
    (run / "log.jsonl").write_text('{"epoch": 0, "loss": 1.2}\n')
    return run


@pytest.mark.parametrize("args,expected,strict", [
    (["loader.backend=foo"], ["loader.backend='foo'"], True),
    # gets as far as the resume check: the checkpoint is refused, naming what differs
    (["model.arch=nin", "train.precision=fp32", "loader.backend=torch", "train.eval_rotation_every=0"],
     ["checkpoint is from a different model/config",
      "model.arch: checkpoint has 'alexnet', this run has 'nin'"],
     False),
])
def test_train_failed_rerun_keeps_what_was_written(tmp_path, existing_run, args, expected, strict):
    before = {name: (existing_run / name).read_bytes() for name in ("checkpoint.pt", "log.jsonl")}
    assert_one_line_error(run_cli([*TRAIN, *args], tmp_path), *expected, strict=strict)
    assert {name: (existing_run / name).read_bytes() for name in before} == before
    assert not (existing_run / "config.yaml").exists()


# ---------------------------------------------------------------------------- eval.py

EVAL = ["eval.py", "--config", SAMPLE, "train.output_dir=TMP/run"]


@pytest.mark.parametrize("args,expected", cases(
    (["--checkpoint", "random", "loader.backend=foo"], ["loader.backend='foo'", "auto, dali, torch"]),
    (["--checkpoint", "random", "probe.lr=0.1"], ["probe.lr=0.1", "probe.schedule"]),
    (["--checkpoint", "random", "probe.schedule=[[0,0.1],[5,-1]]"], ["probe.schedule: an lr below 0"]),
    (["--checkpoint", "random", "--lr", "0"], ["argument --lr: 0: must be above 0", "--help"]),
    (["--checkpoint", "random", "--batch-size", "-1"], ["argument --batch-size: -1: must be at least 1"]),
    (["--checkpoint", "random", "--head", "knn", "--knn-t", "0"], ["argument --knn-t: 0: must be above 0"]),
    (["--checkpoint", "random", "--epochs", "x"], ["argument --epochs: invalid int value: 'x'"]),
    (["--checkpoint", "random", "--lr", "0.1", "probe.schedule=[[0,0],[5,0.01]]"],
     ["its first lr, which is 0"]),
    (["--checkpoint", "TMP/nonexistent.pt"], ["checkpoint not found", "nonexistent.pt"]),
    (["--checkpoint", SAMPLE], ["cannot load checkpoint", "sample.yaml"]),   # not a checkpoint file
    (["--checkpoint", "random", "--layer", "conv9"], ["--layer 'conv9'", "conv1, conv2"]),
    (["--checkpoint", "random", "--precision", "fp8"], ["--precision", "fp8", "--help"]),
    # flags and overrides interleaved: parsed, then the bad data.root is what stops it
    (["data.root=/nonexistent/in", "--checkpoint", "random", "--layer", "conv4", "probe.epochs=1"],
     ["data.root='/nonexistent/in'", "no train/ folder"]),
))
def test_eval_bad_input(tmp_path, args, expected):
    assert_one_line_error(run_cli([*EVAL, *args], tmp_path), *expected)
    assert not (tmp_path / "run").exists()


def test_eval_missing_config(tmp_path):
    assert_one_line_error(run_cli(["eval.py", "--config", "TMP/missing.yaml"], tmp_path),
                          "config file not found")


@pytest.mark.parametrize("args,named", [
    ([*TRAIN, "train.output_dir=TMP/afile/run"], "train.output_dir"),
    ([*EVAL, "--checkpoint", "random", "--output-dir", "TMP/afile"], "--output-dir"),
    (["visualize.py", "--checkpoint", "random", "--config", SAMPLE, "--out", "TMP/afile/fig"],
     "--out's folder"),
    (TRAIN, "ROTNET_CACHE"),   # the sample data's cache folder (the sample config's data.root is "")
], ids=["train", "eval", "visualize", "sample-cache"])
def test_an_output_folder_that_cannot_be_made_is_named(tmp_path, monkeypatch, args, named):
    """A file where the folder should be (a typo, a stale path): one line naming the setting, not a
    traceback from mkdir; the file is left as it was."""
    (tmp_path / "afile").write_text("mine")
    if named == "ROTNET_CACHE":
        monkeypatch.setenv("ROTNET_CACHE", str(tmp_path / "afile"))
    assert_one_line_error(run_cli(args, tmp_path), f"{named}=", "cannot make this folder")
    assert (tmp_path / "afile").read_text() == "mine"


# ---------------------------------------------------------------------------- visualize.py

@pytest.mark.parametrize("args,expected", cases(
    (["--config", "TMP/missing.yaml", "--checkpoint", "random"], ["config file not found"]),
    (["--config", "TMP/bad.yaml", "--checkpoint", "random"], ["loader.backend='foo'", "auto, dali, torch"]),
    (["--checkpoint", "TMP/nonexistent.pt"], ["checkpoint not found"]),
    (["--run", "TMP/norun"], ["no checkpoint and no config"]),
))
def test_visualize_bad_input(tmp_path, args, expected):
    (tmp_path / "bad.yaml").write_text("loader:\n  backend: foo\n")
    # visualize notes skipped figures on stderr before failing: the error is still the last line
    assert_one_line_error(run_cli(["visualize.py", "--out", "TMP/fig/x", *args], tmp_path), *expected,
                          strict=False)
    assert not list(tmp_path.glob("fig/*.png"))


# ---------------------------------------------------------------------------- python -m models.export

@pytest.mark.parametrize("args,expected", cases(
    (["TMP/nonexistent.pt"], ["nonexistent.pt"]),
    ([SAMPLE, "--format", "native", "--out", "TMP/x.safetensors"], ["sample.yaml"]),
))
def test_export_bad_input(tmp_path, args, expected):
    assert_one_line_error(run_cli(["-m", "models.export", *args], tmp_path), *expected)
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------- python -m pipelines.scan

def flat_beside_classes(tmp_path: Path) -> None:
    """TMP/data: train/ with a class folder, val/ flat (ImageNet's val as extracted)."""
    from PIL import Image

    for path in (tmp_path / "data" / "train" / "n01440764" / "a.JPEG", tmp_path / "data" / "val" / "b.JPEG"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path, format="JPEG")


@pytest.mark.parametrize("args,expected", cases(
    (["/nonexistent"], ["image folder not found", "/nonexistent"]),
    (["TMP/data"], ["mixes splits of class folders (train) and folders of loose images (val)",
                    "pipelines.imagenet_val"]),
    (["TMP/data/train", "--out", "TMP/blocker/{split}.txt"], ["cannot write the file list", "blocker"]),
    (["TMP/data/train", "--workers", "0"], ["argument --workers: 0: must be at least 1"]),
))
def test_scan_bad_input(tmp_path, args, expected):
    flat_beside_classes(tmp_path)
    (tmp_path / "blocker").write_text("a file where --out needs a folder")
    p = run_cli(["-m", "pipelines.scan", "--out", "TMP/lists/{split}.txt", *args], tmp_path)
    assert_one_line_error(p, *expected)
    assert not (tmp_path / "lists").exists()


# ------------------------------------------------------------------------ python -m pipelines.imagenet_val

@pytest.mark.parametrize("args,expected", cases(
    (["--labels", "TMP/missing.csv"], ["missing.csv"]),
    (["--labels", "TMP/labels.csv"], ["labels.csv:2: a label for ILSVRC2012_val_00000001, but"]),
))
def test_imagenet_val_bad_input(tmp_path, args, expected):
    flat_beside_classes(tmp_path)
    (tmp_path / "labels.csv").write_text("ImageId,PredictionString\n"
                                         "ILSVRC2012_val_00000001,n01440764 1 2 3 4\n")
    p = run_cli(["-m", "pipelines.imagenet_val", "TMP/data/val", "--train-dir", "TMP/data/train",
                 "--out", "TMP/data/val_classes", *args], tmp_path)
    assert_one_line_error(p, *expected)
    assert sorted(os.listdir(tmp_path / "data")) == ["train", "val"]


# ---------------------------------------------------------------------------- python -m pipelines.pack_shards

def test_shards_bad_input(tmp_path):
    """A missing folder, then an unreadable file after a first shard was written: one line each; the
    written shard stays complete under its name, nothing half-written, no manifest."""
    p = run_cli(["-m", "pipelines.pack_shards", "TMP/nowhere", "--out", "TMP/sh"], tmp_path)
    assert_one_line_error(p, "image folder not found", "nowhere")
    assert not (tmp_path / "sh").exists()
    for i, name in enumerate(["a.jpg", "b.jpg", "c.JPEG"]):
        (tmp_path / "src" / "c0").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "c0" / name).write_bytes(b"\xff\xd8\xff" + bytes([i]) * 100)
    os.symlink(tmp_path / "missing", tmp_path / "src" / "c0" / "d.jpg")     # listed, cannot be opened
    p = run_cli(["-m", "pipelines.pack_shards", "TMP/src", "--out", "TMP/sh", "--shard-size", "1",
                 "--workers", "1", "--seed", "3"], tmp_path)   # seed 3 packs d.jpg third, after two shards
    assert_one_line_error(p, "cannot read", "d.jpg")
    tars = sorted(path.name for path in (tmp_path / "sh").glob("*.tar"))
    assert len(tars) == 2 and all((tmp_path / "sh" / t).stat().st_size % 10240 == 0 for t in tars)
    assert not (tmp_path / "sh" / "manifest.json").exists() and not list((tmp_path / "sh").glob(".tmp-*"))
    (tmp_path / "blocker").write_text("a file where --out needs a folder")
    p = run_cli(["-m", "pipelines.pack_shards", "TMP/src", "--out", "TMP/blocker/sh"], tmp_path)
    assert_one_line_error(p, "--out=", "blocker/sh", "cannot make this folder")


# ---------------------------------------------------------------------------- the real processes

@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["train.py", *TRAIN[1:], "loader.backend=foo"],
    ["eval.py", "--checkpoint", "TMP/nonexistent.pt"],
    ["visualize.py", "--run", "TMP/norun", "--out", "TMP/fig/x"],
    ["-m", "models.export", "TMP/nonexistent.pt"],
    ["-m", "pipelines.scan", "TMP/data", "--out", "TMP/lists/{split}.txt"],
    ["-m", "pipelines.imagenet_val", "TMP/data/val", "--train-dir", "TMP/data/train", "--labels",
     "TMP/missing.csv"],
    ["-m", "pipelines.pack_shards", "TMP/nowhere", "--out", "TMP/sh"],
], ids=lambda args: args[0] if args[0] != "-m" else args[1])
def test_each_entry_point_as_a_process(tmp_path, args):
    """The `__main__` block of each entry point: as a real process, the one line and exit code that
    its main(argv) gives in-process above, and no traceback."""
    flat_beside_classes(tmp_path)
    line = assert_one_line_error(run_process(args, tmp_path), strict=False)
    assert line == assert_one_line_error(run_cli(args, tmp_path), strict=False)
