"""benchmarks/reproduce_imagenette.py: the Imagenette bars, the results.md section, the commands it runs."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks.reproduce_imagenette import bars, main, write_section
from benchmarks.reproduce_report import write_results

ALEX = ["conv1", "conv2", "conv3", "conv4", "conv5"]
RES = ["conv1", "layer1", "layer2", "layer3", "layer4"]


def test_alexnet_bars_best_against_best_and_middle_layer_shape():
    rnd = dict(zip(ALEX, [55.2, 55.7, 55.0, 53.8, 52.6]))
    calibration = dict(zip(ALEX, [59.8, 67.8, 70.2, 68.9, 66.9]))   # a calibration run: +14.5
    (name, ok, val), (_, shape_ok, _) = bars("alexnet", calibration, rnd)
    assert not ok and "+14.50" in val and shape_ok
    good = dict(calibration, conv3=70.8)
    assert [ok for _, ok, _ in bars("alexnet", good, rnd)] == [True, True]
    conv5_best = dict(good, conv5=71.0)
    assert [ok for _, ok, _ in bars("alexnet", conv5_best, rnd)] == [True, False]


def test_resnet_bars_need_every_deep_stage_ten_points_up():
    rnd = dict(zip(RES, [59.1, 54.1, 50.1, 46.6, 43.9]))
    calibration = dict(zip(RES, [57.0, 58.7, 57.8, 58.1, 52.9]))
    assert [ok for _, ok, _ in bars("resnet18", calibration, rnd)] == [False, False, True, False]
    good = dict(zip(RES, [57.0, 62.0, 64.2, 62.0, 54.0]))
    checks = bars("resnet18", good, rnd)
    assert [ok for _, ok, _ in checks] == [True, True, True, True]
    assert checks[0][2] == "layer2 64.20 vs random conv1 59.10: +5.10"


def _run(base, arch, wall_s, pre, rnd):
    run = base / arch
    (run / "pretrain").mkdir(parents=True)
    (run / "pretrain" / "log.jsonl").write_text(
        json.dumps({"epoch": 0, "step": 148, "loss": 1.0, "rot_acc": 0.6, "heldout_rot_acc": 0.7}) + "\n")
    rec = {"cmd": f"python train.py --config configs/x_{arch}.yaml", "rc": 0, "wall_s": wall_s,
           "commit": "abc", "machine": {"cpu": "AMD EPYC", "cores": 2, "gpu": None},
           "load_before": [0.1, 0, 0], "load_after": [2.0, 0, 0]}
    (run / "step.json").write_text(json.dumps(rec))
    (run / "eval_linear").mkdir()
    (run / "eval_linear" / "step.json").write_text(json.dumps(dict(rec, cmd="python eval.py", wall_s=300.0)))
    names = ALEX if arch == "alexnet" else RES
    (run / "eval_linear" / "eval.json").write_text(json.dumps(
        {"meta": {"head": "linear", "epochs": 10},
         "pretrained": {n: {"top1": v} for n, v in zip(names, pre)},
         "random": {n: {"top1": v} for n, v in zip(names, rnd)}}))


def test_section_written_beside_cifar_and_kept_by_the_cifar_report(tmp_path):
    runs = tmp_path / "runs"
    _run(runs / "cpu-30min", "alexnet", 1500.0, [60, 68, 72, 69, 66], [55, 56, 55, 54, 52])
    _run(runs / "cpu-30min", "resnet18", 1900.0, [57, 60, 62, 61, 53], [59, 54, 50, 47, 44])
    results = tmp_path / "results.md"
    results.write_text("# CIFAR\n<!-- notes -->\ncifar notes\n<!-- /notes -->\n")
    write_section(runs, results, tmp_path / "figs", tmp_path)
    text = results.read_text()
    assert text.startswith("# CIFAR\n<!-- notes -->\ncifar notes")
    assert "| conv3 | 72.00 | 55.00 | 17.00 |" in text
    assert ("| best layer ≥ 15 points above random init's best layer | yes | "
            "conv3 72.00 vs random conv2 56.00: +16.00 |") in text
    assert "| pretraining ≤ 30 min (train.py wall time) | NO | 31.7 min |" in text     # resnet18: 1900 s
    assert "| layer4 ≥ 10 points above random-init layer4 | NO | +9.00 |" in text
    assert "load average 1 min before → after: 0.10 → 2.00" in text
    # hand-written notes survive a regeneration; the CIFAR generator keeps the whole block
    results.write_text(text.replace("<!-- imagenette notes -->\n", "<!-- imagenette notes -->\nmy note\n"))
    write_section(runs, results, tmp_path / "figs", tmp_path)
    assert results.read_text().count("my note") == 1
    write_results(tmp_path / "cifar_runs", results, tmp_path / "figs", tmp_path)
    text = results.read_text()
    assert "cifar notes" in text and "my note" in text and "| conv3 | 72.00 | 55.00 | 17.00 |" in text


def _fake_imagenette(root):
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (120, 100), (40 * i, 90, 200)).save(root / split / cls / f"{i}.JPEG")
    return root


def test_dry_run_prints_the_pipeline_per_model(tmp_path, capsys):
    data = _fake_imagenette(tmp_path / "nette")
    main(["--data", str(data), "--budget", "cpu-30min", "--runs", str(tmp_path / "r"), "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert sum("train.py --config configs/imagenette_alexnet_cpu.yaml" in line for line in out) == 1
    assert sum("train.py --config configs/imagenette_resnet18_cpu.yaml" in line for line in out) == 1
    evals = [line for line in out if "eval.py" in line]
    assert len(evals) == 2
    assert all("--layer all --head linear --with-random --precision fp32" in line for line in evals)
    assert not any("--epochs" in line for line in evals)            # the config's probe.epochs
    assert sum("visualize.py" in line for line in out) == 2
    assert not (tmp_path / "r").exists()


def test_bad_model_and_missing_val_are_one_line_errors(tmp_path, capsys):
    data = _fake_imagenette(tmp_path / "nette")
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--models", "vgg", "--dry-run"])
    assert "unknown model(s) ['vgg']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(data / "train"), "--dry-run"])
    assert "expected ImageNet layout" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_budget_end_to_end(tmp_path):
    """Real train.py, eval.py and visualize.py on 2 classes x 3 tiny photos (AlexNet x0.25, 1 epoch)."""
    data = _fake_imagenette(tmp_path / "nette")
    results, figs = tmp_path / "results.md", tmp_path / "figs"
    main(["--data", str(data), "--budget", "smoke", "--models", "alexnet", "--runs", str(tmp_path / "r"),
          "--figures", str(figs), "--results", str(results), "loader.num_threads=1"])
    text = results.read_text()
    assert "### alexnet, budget `smoke`" in text and "| conv5 |" in text
    assert "held-out rotation acc" in text and (figs / "imagenette_alexnet_smoke_layers.png").is_file()
