"""Smoke test of the main job: train.py for a few steps, then eval.py on its checkpoint, on the
CPU (on the GPU when there is one: the GPU check runs this file).

The README's main command does the same at full length; this keeps the wiring honest in
seconds (tiny sample set, tiny AlexNet, a handful of steps). The entry points run in this
process (their `main(argv)`); the shared run is tests/conftest.py's `trained_run`, trained once.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as eval_cli
import visualize
from models.export import load_exported
from models.export import main as export_main
from tests.tiny_run import TINY_RUN, train_in_process

REPO = Path(__file__).resolve().parents[1]
# Two runs' per-epoch numbers: identical on the CPU. On CUDA (train.py takes the GPU when there is
# one, as in the GPU check) cudnn.benchmark may pick other convolution algorithms in another process:
# other rounding (TF32 convolutions), same maths. There the losses agree within CUDA_LOSS_RTOL
# (relative) and the accuracies within CUDA_ACC_ATOL (about 2 of the 120-224 samples of an epoch).
CUDA_LOSS_RTOL, CUDA_ACC_ATOL = 5e-3, 0.02


def assert_same_training(a: list[dict], b: list[dict]) -> None:
    """log.jsonl lines of two runs: loss and accuracies equal on the CPU, within the tolerances above
    on CUDA."""
    keys = ("loss", "rot_acc", "heldout_rot_acc")
    got, want = [[x[k] for k in keys] for x in a], [[x[k] for k in keys] for x in b]
    if not torch.cuda.is_available():
        assert got == want
        return
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g[0] == pytest.approx(w[0], rel=CUDA_LOSS_RTOL)
        assert g[1:] == pytest.approx(w[1:], abs=CUDA_ACC_ATOL)


def test_train_then_eval_end_to_end(trained_run, copied_run, sample_data, tmp_path, monkeypatch, capsys):
    out, stderr = trained_run
    common = [f"data.root={sample_data}", *TINY_RUN, f"train.output_dir={copied_run}"]
    assert "resolved config" in stderr and "rotated samples/GPU" in stderr

    # what the run folder holds: resolved config, per-epoch JSON lines, checkpoints
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    assert all(0 <= x["rot_acc"] <= 1 and x["loss"] > 0 and "heldout_rot_acc" in x for x in lines)
    assert (out / "config.yaml").is_file() and (out / "tensorboard").is_dir()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["epoch_step"] == 0 and ckpt["config"]["model"]["width"] == 0.25
    assert {"head.fc.weight", "trunk.conv1.0.weight"} <= set(ckpt["model"])   # unwrapped: no "module."

    # a second start with the same folder resumes and has nothing left to do
    stderr = train_in_process(["--config", "configs/sample.yaml", *common, "optim.epochs=2"])
    assert "resumed from" in stderr
    assert len((copied_run / "log.jsonl").read_text().splitlines()) == 2

    # longer, resumed: the held-out rotation pass runs every 2nd epoch and after the last one
    train_in_process(["--config", "configs/sample.yaml", *common, "optim.epochs=5",
                      "train.eval_rotation_every=2"])
    lines = [json.loads(x) for x in (copied_run / "log.jsonl").read_text().splitlines()]
    assert [(x["epoch"], "heldout_rot_acc" in x) for x in lines[2:]] == [(2, False), (3, True), (4, True)]

    # eval.py on that checkpoint, two layers in one pass, beside a random-init trunk
    ev = tmp_path / "eval"
    monkeypatch.chdir(REPO)
    capsys.readouterr()
    eval_cli.main(["--config", "configs/sample.yaml", "--checkpoint", str(copied_run), "--layer",
                   "conv2,conv5", "--epochs", "1", "--batch-size", "16", "--with-random", "--output-dir",
                   str(ev), *common[:3]])
    printed = "".join(capsys.readouterr())
    assert "conv2" in printed and "random" in printed.lower()
    result = json.loads((ev / "eval.json").read_text())
    assert (ev / "eval.md").is_file() and (ev / "eval.png").is_file()
    assert "conv5" in json.dumps(result)


def test_the_trained_run_exports_and_visualizes(trained_run, tmp_path):
    """The checkpoint as train.py wrote it: `python -m models.export --format native` keeps every trunk
    tensor (BatchNorm statistics included), and visualize.py draws each figure the run folder feeds."""
    out, _ = trained_run
    exported = export_main([str(out / "checkpoint.pt"), "--format", "native", "--out",
                            str(tmp_path / "t.safetensors")])
    trunk = load_exported(exported).state_dict()
    model = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    saved = {k[len("trunk."):]: v for k, v in model.items() if k.startswith("trunk.")}
    assert trunk.keys() == saved.keys() and all(torch.equal(trunk[k], saved[k]) for k in saved)
    written = visualize.main(["--run", str(out), "--images", "2", "--out", str(tmp_path / "fig" / "run")])
    assert sorted(p.name for p in written) == ["run_attention.png", "run_curves.png", "run_filters.png"]


@pytest.mark.slow
def test_bad_config_key_fails_fast_naming_it(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "optim.lrr=0.1", f"train.output_dir={tmp_path}/x"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "lrr" in r.stderr
    assert not (tmp_path / "x").exists()


def test_knn_monitor_logs_every_epoch_and_leaves_training_unchanged(sample_data, tmp_path, monkeypatch):
    """train.monitor_every=1: knn_top1 in every log.jsonl line, in [0, 100]; the losses are the
    same as those of the run without the monitor (it takes nothing from the training's RNG or loader;
    exactly on the CPU, see assert_same_training). The progress bar of a monitored epoch ends with
    the kNN top-1 too. lr 0.01: at the sample config's 0.05 this tiny net turns a rounding difference
    into a visible one within a few steps, which no tolerance on CUDA could absorb."""
    monkeypatch.setenv("ROTNET_PROGRESS", "1")
    common = [f"data.root={sample_data}", *TINY_RUN, "optim.epochs=2", "train.precision=fp32",
              "train.monitor_bank_per_class=4", "train.monitor_query_per_class=2", "loader.backend=torch",
              "loader.num_threads=0", "optim.schedule=[[0,0.01]]"]   # no worker processes: tiny runs
    logs, stderr = {}, {}
    for every in (1, 0):
        out = tmp_path / f"run{every}"
        stderr[every] = train_in_process(["--config", "configs/sample.yaml", *common,
                                          f"train.monitor_every={every}", f"train.output_dir={out}"])
        logs[every] = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert "knn_top1[conv3]=" in stderr[1] and "kNN monitor every 1 epochs on conv3" in stderr[1]
    assert re.search(r"epoch 1: [^\r\n]*knn_top1\[conv3\]=", stderr[1])   # the bar, not the log line
    assert all(set(x["knn_top1"]) == {"conv3"} and 0 <= x["knn_top1"]["conv3"] <= 100 for x in logs[1])
    assert not any("knn_top1" in x for x in logs[0])
    assert_same_training(logs[1], logs[0])


def test_pretraining_with_imagenets_flat_val(tmp_path, monkeypatch, capsys):
    """ImageNet's val as extracted (one flat folder, no labels): train.py pretrains and reports held-out
    rotation accuracy on it, with the kNN monitor off and a warning naming the conversion; eval.py,
    which needs the labels, stops in one line before writing anything."""
    from pipelines.sample_data import ensure_sample_data

    data = ensure_sample_data(seed=0, cache_dir=tmp_path / "cache", per_class_train=2, per_class_val=2)
    root = tmp_path / "imagenet"
    (root / "val").mkdir(parents=True)
    (root / "train").symlink_to(data / "train")
    for i, image in enumerate(sorted((data / "val").rglob("*.JPEG"))):
        (root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG").symlink_to(image)
    out = tmp_path / "run"
    common = [f"data.root={root}", "data.crop_size=64", "data.resize_size=72", "model.width=0.25",
              "train.precision=fp32", "loader.backend=torch", "loader.num_threads=0"]
    stderr = train_in_process(["--config", "configs/sample.yaml", *common, "optim.batch_size_per_gpu=8",
                               "optim.epochs=1", "train.monitor_every=1", f"train.output_dir={out}"])
    assert "the kNN monitor is off" in stderr and "python -m pipelines.imagenet_val" in stderr
    (line,) = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert line["steps"] == 2 and 0 <= line["heldout_rot_acc"] <= 1 and "knn_top1" not in line

    monkeypatch.chdir(REPO)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:   # any other exception (a traceback) fails the test
        eval_cli.main(["--config", "configs/sample.yaml", "--checkpoint", str(out),
                       "--output-dir", str(tmp_path / "eval"), f"data.root={root}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2
    assert last.startswith("error: ") and f"'{root / 'val'}' holds images without class folders" in last
    assert "python -m pipelines.imagenet_val" in last and not (tmp_path / "eval").exists()
