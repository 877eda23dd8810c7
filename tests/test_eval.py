"""eval.py end to end on a tiny random-init "checkpoint" and a PIL-made image folder.

Every run is 1-2 epochs over 24 images of 3 classes, so the whole file takes seconds.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import eval as eval_cli
import probes.engine
from models import build_model
from rotnet.checkpoint import atomic_save, load_checkpoint
from rotnet.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 8, 4
NIN_LAYERS = ["block1", "block2", "block3"]
# Tiny tensors: one intra-op thread is faster, and immune to other jobs on shared cores.
pytestmark = pytest.mark.usefixtures("one_thread")


def _images(root: Path) -> None:
    """root/{train,val}/cNN/*.jpg: flat colour + a class-dependent bar, 40x48 px."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            d = root / split / f"c{c:02d}"
            d.mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=g)
                px[:, 10 * c: 10 * c + 8] = 255
                Image.fromarray(px.numpy()).save(d / f"{i}.jpg")


def _config(tmp: Path, arch: str = "nin", crop: int = 32) -> Path:
    raw = {"data": {"root": str(tmp / "data"), "crop_size": crop, "resize_size": crop + 4, "min_scale": 0.5},
           "loader": {"backend": "torch", "num_threads": 0},
           "model": {"arch": arch, "width": 0.125, "num_blocks": 3},
           "train": {"output_dir": str(tmp / f"run_{arch}"), "channels_last": False},
           "probe": {"epochs": 2, "batch_size_per_gpu": 8, "schedule": [[0, 0.01], [1, 0.002]]}}
    path = tmp / f"{arch}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _checkpoint(cfg_path: Path) -> Path:
    """A random-init RotNet saved like train.py saves it: 'model', 'config', 'epoch', 'commit'."""
    cfg = load_config(cfg_path)
    model = build_model(cfg, 123)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True)
    atomic_save({"model": model.state_dict(), "config": config_to_dict(cfg), "epoch": 1, "commit": "test"},
                out / "checkpoint.pt")
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    _images(tmp / "data")
    cfg = _config(tmp)
    return {"tmp": tmp, "cfg": cfg, "ckpt": _checkpoint(cfg)}


def _run(setup, *args, out=None):
    out = out or setup["tmp"] / f"out_{abs(hash(args))}"
    eval_cli.main(["--config", str(setup["cfg"]), "--output-dir", str(out), *args])
    return out


def test_default_checkpoint_outputs_and_val_counting(setup):
    eval_cli.main(["--config", str(setup["cfg"]), "--epochs", "1"])      # no --checkpoint: the run's latest
    out = setup["ckpt"].parent / "eval_linear"
    data = json.loads((out / "eval.json").read_text())
    assert list(data["pretrained"]) == NIN_LAYERS and "random" not in data
    for rec in data["pretrained"].values():
        assert rec["num_val"] == CLASSES * VAL_PER_CLASS                  # every val image counted once
        assert rec["checkpoint"] == str(setup["ckpt"]) and rec["epochs"] == 1 and rec["head"] == "linear"
    assert "| block2 |" in (out / "eval.md").read_text()
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    lines = (out / "eval_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]


def test_frozen_trunk_is_untouched_end_to_end(setup, monkeypatch):
    built = []
    real = eval_cli.build_model
    monkeypatch.setattr(eval_cli, "build_model", lambda *a: built.append(real(*a)) or built[-1])
    out = _run(setup, "--checkpoint", str(setup["ckpt"]), "--epochs", "1")
    saved = {k[len("trunk."):]: v for k, v in load_checkpoint(setup["ckpt"])["model"].items()
             if k.startswith("trunk.")}
    after = built[0].trunk.state_dict()                                   # params AND BN running stats
    assert set(after) == set(saved) and all(torch.equal(after[k].cpu(), saved[k]) for k in saved)
    assert load_checkpoint(out / "probe_state_pretrained.pt")["trunk"] is None


def test_finetune_changes_trunk(setup):
    out = _run(setup, "--checkpoint", str(setup["ckpt"]), "--epochs", "1", "--finetune", "--layer", "block3")
    trunk = load_checkpoint(out / "probe_state_pretrained.pt")["trunk"]
    saved = load_checkpoint(setup["ckpt"])["model"]
    assert any(not torch.equal(v, saved["trunk." + k]) for k, v in trunk.items())


def test_resume_continues_at_next_epoch_and_refuses_changes(setup, monkeypatch):
    out = setup["tmp"] / "resume"
    real = probes.engine.train_one_epoch
    seen = []

    def dies_in_epoch_2(*a, **kw):
        if a[4] == 1:                                                     # epoch index 1 = second epoch
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(probes.engine, "train_one_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, "--checkpoint", str(setup["ckpt"]), out=out)
    assert load_checkpoint(out / "probe_state_pretrained.pt")["epoch"] == 1
    assert not (out / "eval.json").exists()

    monkeypatch.setattr(probes.engine, "train_one_epoch",
                        lambda *a, **kw: seen.append(a[4]) or real(*a, **kw))
    _run(setup, "--checkpoint", str(setup["ckpt"]), out=out)
    assert seen == [1]                                                    # only the missing epoch ran
    assert [json.loads(x)["epoch"] for x in (out / "eval_log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "eval.json").read_text())["pretrained"]["block1"]["epochs"] == 2

    with pytest.raises(SystemExit, match="schedule"):
        _run(setup, "--checkpoint", str(setup["ckpt"]), "--lr", "0.5", out=out)


def test_with_random_side_by_side_and_labels_per_class(setup):
    out = _run(setup, "--checkpoint", str(setup["ckpt"]), "--epochs", "1", "--with-random", "--layer",
               "block2,block1", "--labels-per-class", "3")
    data = json.loads((out / "eval.json").read_text())
    assert list(data["pretrained"]) == ["block1", "block2"] == list(data["random"])
    assert data["random"]["block1"]["checkpoint"].startswith("random init")
    assert data["pretrained"]["block1"]["labels_per_class"] == 3
    assert set(data["difference_top1"]) == {"block1", "block2"}
    table = (out / "eval.md").read_text()
    assert "random-init top-1" in table and "difference" in table
    history = load_checkpoint(out / "probe_state_random.pt")["history"]
    assert history[0]["block1"]["train_top1"] >= 0


def test_random_checkpoint_alone(setup):
    eval_cli.main(["--config", str(setup["cfg"]), "--checkpoint", "random", "--epochs", "1",
                   "--layer", "block1"])
    data = json.loads((setup["ckpt"].parent / "eval_linear_random" / "eval.json").read_text())
    assert list(data) == ["meta", "random"] and data["meta"]["checkpoint"] is None


def test_alexnet_mlp_head(tmp_path):
    _images(tmp_path / "data")
    cfg = _config(tmp_path, arch="alexnet", crop=64)
    ckpt = _checkpoint(cfg)
    eval_cli.main(["--config", str(cfg), "--checkpoint", str(ckpt), "--head", "mlp", "--epochs", "1"])
    data = json.loads((ckpt.parent / "eval_mlp" / "eval.json").read_text())
    assert list(data["pretrained"]) == ["conv4", "conv5"]               # paper Table 4 heads


@pytest.mark.parametrize("args,message", [
    (["--layer", "conv4"], "valid choices: block1, block2, block3"),
    (["--layer", "block1,block7"], "block7"),
    (["--checkpoint", "/nonexistent/ck.pt"], "checkpoint not found"),
])
def test_bad_input_names_it(setup, args, message):
    with pytest.raises(SystemExit, match=message):
        eval_cli.main(["--config", str(setup["cfg"]), *([] if "--checkpoint" in args else
                                                        ["--checkpoint", str(setup["ckpt"])]), *args])


def test_bad_checkpoint_is_one_line_and_a_bug_keeps_its_traceback(setup, tmp_path, monkeypatch, capsys):
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint\n")
    with pytest.raises(SystemExit, match=f"cannot load checkpoint {garbage}"):
        _run(setup, "--checkpoint", str(garbage))
    assert capsys.readouterr().err.count("\n") == 1

    def broken(*a):
        raise RuntimeError("a bug in building the trunk")

    monkeypatch.setattr(eval_cli, "build_model", broken)
    with pytest.raises(RuntimeError, match="a bug in building the trunk"):   # not turned into one line
        _run(setup, "--checkpoint", str(setup["ckpt"]))


def test_missing_default_checkpoint_says_run_train_first(setup, tmp_path):
    with pytest.raises(SystemExit, match="train.py"):
        eval_cli.main(["--config", str(setup["cfg"]), f"train.output_dir={tmp_path / 'empty'}"])


@pytest.mark.slow
def test_cli_subprocess_all_layers(setup):
    out = setup["tmp"] / "cli"
    env = {**os.environ, "ROTNET_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "eval.py", "--config", str(setup["cfg"]), "--checkpoint",
                           str(setup["ckpt"]), "--layer", "all", "--epochs", "1", "--output-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| block3 |" in proc.stdout
    assert sorted(json.loads((out / "eval.json").read_text())["pretrained"]) == NIN_LAYERS


@pytest.mark.slow
def test_two_ranks_count_every_val_image_once(setup):
    """gloo, 2 CPU processes; 12 val images at 5 per batch per rank means padded val batches."""
    out = setup["tmp"] / "ddp"
    env = {**os.environ, "ROTNET_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2",
                           "eval.py", "--config", str(setup["cfg"]), "--checkpoint", str(setup["ckpt"]),
                           "--epochs", "1", "--batch-size", "5", "--output-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "eval.json").read_text())
    assert data["meta"]["world_size"] == 2
    assert all(rec["num_val"] == CLASSES * VAL_PER_CLASS for rec in data["pretrained"].values())


def test_knn_head_all_layers_with_random(setup):
    """--head knn: no training, every layer, beside random init; counts, meta and wall time reported."""
    out = _run(setup, "--checkpoint", str(setup["ckpt"]), "--head", "knn", "--layer", "all", "--with-random",
               "--knn-k", "5", "--precision", "fp32")
    data = json.loads((out / "eval.json").read_text())
    assert list(data["pretrained"]) == NIN_LAYERS == list(data["random"])
    assert all(rec["num_val"] == CLASSES * VAL_PER_CLASS and 0 <= rec["top1"] <= rec["top5"] <= 100
               for rec in data["pretrained"].values())
    assert data["meta"]["knn"]["k"] == 5 and data["meta"]["epochs"] == 0
    assert set(data["meta"]["wall_time_s"]) == {"pretrained", "random"}
    table = (out / "eval.md").read_text()
    assert "k-NN (k=5" in table and "wall time: RotNet pretrained" in table
    assert not list(out.glob("probe_state_*"))                            # nothing trained, nothing to resume


def test_a_run_killed_in_the_random_trunk_keeps_the_pretrained_report(setup, monkeypatch):
    """kNN has no resumable state: eval.json/md must hold the pretrained numbers before the random
    trunk starts, so a kill (here: an error) during it loses nothing already measured."""
    real, calls = eval_cli.knn_probe, []

    def dies_on_random(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during the random-init trunk")
        return real(*a, **kw)

    monkeypatch.setattr(eval_cli, "knn_probe", dies_on_random)
    out = setup["tmp"] / "out_killed"
    with pytest.raises(KeyboardInterrupt):
        _run(setup, "--checkpoint", str(setup["ckpt"]), "--head", "knn", "--layer", "all", "--with-random",
             "--knn-k", "5", "--precision", "fp32", out=out)
    data = json.loads((out / "eval.json").read_text())
    assert list(data["pretrained"]) == NIN_LAYERS and "random" not in data
    assert set(data["meta"]["wall_time_s"]) == {"pretrained"} and "block1" in (out / "eval.md").read_text()


def test_knn_refuses_finetune(setup):
    with pytest.raises(SystemExit, match="drop --finetune"):
        _run(setup, "--checkpoint", str(setup["ckpt"]), "--head", "knn", "--finetune")


@pytest.mark.slow
def test_knn_two_ranks_equal_one_rank(setup):
    """gloo, 2 processes, 5 images per batch: shards of unequal size, bank all-gathered, counts
    summed; the numbers are those of one process."""
    one = _run(setup, "--checkpoint", str(setup["ckpt"]), "--head", "knn", "--batch-size", "5",
               "--precision", "fp32")
    out = setup["tmp"] / "knn_ddp"
    env = {**os.environ, "ROTNET_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2",
                           "eval.py", "--config", str(setup["cfg"]), "--checkpoint", str(setup["ckpt"]),
                           "--head", "knn", "--batch-size", "5", "--precision", "fp32",
                           "--output-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, single = (json.loads((d / "eval.json").read_text()) for d in (out, one))
    assert two["meta"]["world_size"] == 2
    for layer in NIN_LAYERS:
        assert two["pretrained"][layer]["num_val"] == CLASSES * VAL_PER_CLASS
        assert (two["pretrained"][layer]["top1"], two["pretrained"][layer]["top5"]) == \
               (single["pretrained"][layer]["top1"], single["pretrained"][layer]["top5"])


def test_a_model_override_against_the_checkpoint_is_refused_in_one_line(setup, capsys):
    with pytest.raises(SystemExit) as exc:
        _run(setup, "--checkpoint", str(setup["ckpt"]), "model.arch=resnet18")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith(
        "error: model.arch: checkpoint has 'nin', this run has 'resnet18': the model comes from the "
        f"checkpoint {setup['ckpt']}, so a model.* override cannot change it"), err


def test_the_settings_from_the_checkpoint_are_named_in_one_line(setup, capsys):
    _run(setup, "--checkpoint", str(setup["ckpt"]), "--epochs", "1", "model.arch=nin")   # its own value: fine
    said = [line for line in capsys.readouterr().err.splitlines() if "settings from the checkpoint" in line]
    assert len(said) == 1 and f"{setup['ckpt']}: model.arch=nin model.width=0.125" in said[0]
    assert f"data.*, probe.* from --config {setup['cfg']}, overrides on top" in said[0]


def test_a_full_disk_is_one_line_naming_the_file(setup, capsys, full_disk):
    with pytest.raises(SystemExit) as exc:
        _run(setup, "--checkpoint", str(setup["ckpt"]), "--epochs", "1", out=full_disk)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "Traceback" not in "\n".join(err)
    assert re.match(rf"error: disk full writing {full_disk}/\S+: it needs \d+ bytes, \d+ bytes free", err[-1])
    assert not [n for n in os.listdir(full_disk) if n.startswith(".tmp-")]


def test_a_second_eval_on_a_busy_folder_is_refused_and_changes_nothing(setup, capsys):
    """Another live eval.py (here, a process holding the folder's lock) owns the output folder: one
    line naming it, exit 2, its files untouched; train.lock=false runs anyway (lockless mounts)."""
    from rotnet.cli import UsageExit
    from rotnet.runlock import LOCK
    from tests.test_train_errors import HOLD

    out, args = setup["tmp"] / "busy", ("--checkpoint", "random", "--epochs", "1", "--layer", "block1")
    out.mkdir()
    (out / "eval_log.jsonl").write_text('{"epoch": 1}\n')
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UsageExit):
            _run(setup, *args, out=out)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"error: {out} is in use by another run (host "), line
        assert sorted(os.listdir(out)) == sorted([LOCK, "eval_log.jsonl"])
        assert (out / "eval_log.jsonl").read_text() == '{"epoch": 1}\n'
        _run(setup, *args, "train.lock=false", out=out)
        assert json.loads((out / "eval.json").read_text())["random"]["block1"]["epochs"] == 1
    finally:
        holder.kill()
        holder.wait()
