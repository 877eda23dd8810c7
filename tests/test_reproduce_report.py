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
    (base / "semisup" / "scratch_k20" / "eval.json").write_text(json.dumps({"meta": ev["meta"], "random": {"block2": {"top1": 30.0}}}))
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


def test_dry_run_prints_every_stage(tmp_path, capsys):
    data = tmp_path / "cifar"
    (data / "train").mkdir(parents=True)
    reproduce_main(["--data", str(data), "--budget", "cpu-30min", "--runs", str(tmp_path / "r"), "--dry-run"])
    out = capsys.readouterr().out
    assert out.count("train.py") == 5          # main + 4 ablations
    # one_random: K=4 times the config's epochs, so steps and samples per step stay equal
    from rotnet.config import load_config
    epochs = load_config("configs/cifar10_nin_cpu.yaml").optim.epochs
    assert "data.rotation_mode=one_random" in out and f"optim.epochs={4 * epochs}" in out
    assert "--finetune" in out and "--labels-per-class 1000" in out
    assert "probe.epochs=50" in out
