"""benchmarks/reproduce_report.py renders results.md and the semi-sup curve from fake stage outputs."""
from __future__ import annotations

import json

from benchmarks.reproduce_cifar import main as reproduce_main
from benchmarks.reproduce_report import plot_semisup, write_results


def _stage(d, **extra):
    d.mkdir(parents=True, exist_ok=True)
    (d / "step.json").write_text(json.dumps({"cmd": "python x.py", "rc": 0, "wall_s": 60.0, "commit": "abc",
                                             "machine": {"cpu": "test", "cores": 2, "gpu": None}, **extra}))


def _eval(d, pre, rnd=None, head="mlp"):
    ev = {"meta": {"head": head, "epochs": 1, "labels_per_class": 0},
          "pretrained": {f"block{i}": {"top1": v} for i, v in enumerate(pre, 1)}}
    if rnd:
        ev["random"] = {f"block{i}": {"top1": v} for i, v in enumerate(rnd, 1)}
    _stage(d)
    (d / "eval.json").write_text(json.dumps(ev))


def test_results_md_tables_bars_and_notes_kept(tmp_path):
    base = tmp_path / "runs" / "cpu-30min"
    _stage(base / "main")
    (base / "main" / "pretrain").mkdir(parents=True)
    (base / "main" / "pretrain" / "log.jsonl").write_text(
        json.dumps({"epoch": 0, "step": 10, "loss": 1.0, "rot_acc": 0.8, "heldout_rot_acc": 0.85}) + "\n")
    _eval(base / "main" / "eval_mlp", [70, 75, 65, 50], [50, 50, 45, 40])
    _eval(base / "ablation_one_random" / "eval_mlp", [69, 74, 64, 49])
    _eval(base / "semisup" / "rotnet_k20", [0, 40])
    ev = json.loads((base / "semisup" / "rotnet_k20" / "eval.json").read_text())
    (base / "semisup" / "scratch_k20").mkdir(parents=True)
    scratch = {"meta": ev["meta"], "random": {"block2": {"top1": 30.0}}}
    (base / "semisup" / "scratch_k20" / "eval.json").write_text(json.dumps(scratch))
    results = tmp_path / "results.md"
    results.write_text("old\n<!-- notes -->\nkeep me\n<!-- /notes -->\nold tail\n")
    write_results(tmp_path / "runs", results, tmp_path / "figs", tmp_path)
    text = results.read_text()
    assert "keep me" in text and "old tail" not in text
    assert "| block2 | 75.00 | 50.00 | 25.00 | 89.06 |" in text
    assert "| held-out rotation accuracy ≥ 80% | yes | 85.00 |" in text
    assert "best block2, worst block4" in text
    assert "| 20 | 40.00 | 30.00 | 10.00 |" in text
    assert plot_semisup(base / "semisup", tmp_path / "s.png", "x").stat().st_size > 0
    assert "same budget and probe as the main run" in text
    assert "| 0/90/180/270 (default, main run) | 85.00 | 70.00 |" in text


def test_ablations_at_their_own_budget_face_their_own_default(tmp_path):
    base = tmp_path / "runs" / "cpu-30min"
    _stage(base / "main")
    _eval(base / "main" / "eval_mlp", [70, 75, 65, 50], [50, 50, 45, 40])
    for name, accs in {"rot_4": [60, 66, 60, 45], "rot_0_180": [58, 61, 55, 44]}.items():
        (base / f"ablation_{name}" / "pretrain").mkdir(parents=True)
        (base / f"ablation_{name}" / "pretrain" / "log.jsonl").write_text(
            json.dumps({"epoch": 0, "step": 5, "loss": 1.0, "rot_acc": 0.7, "heldout_rot_acc": 0.7}) + "\n")
        _stage(base / f"ablation_{name}")
        _eval(base / f"ablation_{name}" / "eval_mlp", accs)
    results = tmp_path / "results.md"
    write_results(tmp_path / "runs", results, tmp_path / "figs", tmp_path)
    text = results.read_text()
    assert "each pretrained 1 epoch(s), a smaller budget than the main run" in text
    rows = [line for line in text.splitlines()
            if line.startswith("| 0/90/180/270") or line.startswith("| rot_0_180")]
    assert rows[0].startswith("| 0/90/180/270 (default) | 70.00 | 60.00 | 66.00 |")
    assert rows[1].startswith("| rot_0_180 | 70.00 | 58.00 | 61.00 |") and len(rows) == 2


def test_dry_run_prints_every_stage(tmp_path, capsys):
    data = tmp_path / "cifar"
    (data / "train").mkdir(parents=True)
    reproduce_main(["--data", str(data), "--budget", "cpu-30min", "--runs", str(tmp_path / "r"), "--dry-run"])
    out = capsys.readouterr().out
    assert out.count("train.py") == 6          # main + the default and 4 ablations at their budget
    # one_random: K=4 times the ablation budget's epochs, so steps and samples per step stay equal
    one_random = next(line for line in out.splitlines() if "data.rotation_mode=one_random" in line)
    assert one_random.endswith("optim.epochs=4 optim.schedule=[[0.0, 0.05], [2.4, 0.01], [3.4, 0.002]] "
                               f"train.output_dir={tmp_path}/r/cpu-30min/ablation_one_random/pretrain")
    rot4 = next(line for line in out.splitlines() if "ablation_rot_4" in line and "train.py" in line)
    assert "optim.epochs=1 " in rot4 and "data.rotations" not in rot4
    assert "--finetune" in out and "--labels-per-class 1000" in out
    assert "probe.epochs=50" in out
