"""visualize.py end to end on a tiny random-init checkpoint, a fake log.jsonl and eval.json."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import visualize
from models import build_model
from rotnet.config import config_from_dict, config_to_dict


def _tiny_run(tmp_path):
    cfg = config_from_dict({"data": {"crop_size": 32, "resize_size": 32, "root": str(tmp_path / "data"),
                                     "val_dir": "test"},
                            "model": {"arch": "nin", "width": 0.125, "num_blocks": 4},
                            "train": {"output_dir": str(tmp_path / "run")}})
    net = build_model(cfg, 0)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": net.state_dict(), "config": config_to_dict(cfg), "epoch": 2}, run / "checkpoint.pt")
    with open(run / "log.jsonl", "w") as f:
        for e in range(3):
            f.write(json.dumps({"epoch": e, "loss": 1.2 - 0.3 * e, "rot_acc": 0.4 + 0.1 * e,
                                "heldout_rot_acc": 0.38 + 0.1 * e, "lr": 0.1,
                                **({"knn_top1": {"block2": 30.0 + e}} if e % 2 else {})}) + "\n")
    for c in ("cat", "dog"):
        d = tmp_path / "data" / "test" / c
        d.mkdir(parents=True)
        for i in range(2):
            pixels = torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(d / f"{i}.jpg")
    layer = {"top1": 50.0, "top5": 90.0}
    ev = {"meta": {"head": "conv", "epochs": 1, "arch": "nin", "labels_per_class": 0},
          "pretrained": {f"block{k}": dict(layer, top1=60.0 - k) for k in range(1, 5)},
          "random": {f"block{k}": dict(layer, top1=40.0) for k in range(1, 5)}}
    (run / "eval.json").write_text(json.dumps(ev))
    return run


def test_visualize_writes_all_figures(tmp_path):
    run = _tiny_run(tmp_path)
    out = tmp_path / "figs" / "tiny"
    written = visualize.main(["--run", str(run), "--eval-json", str(run / "eval.json"),
                              "--images", "3", "--out", str(out)])
    names = sorted(p.name for p in written)
    assert names == ["tiny_attention.png", "tiny_curves.png", "tiny_filters.png", "tiny_layers.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size < 200_000


def test_attention_maps_shape_and_range():
    cfg = config_from_dict({"data": {"crop_size": 32}, "model": {"arch": "nin", "width": 0.125}})
    net = build_model(cfg, 0)
    maps = visualize.attention_maps(net.trunk.eval(), torch.randn(2, 3, 32, 32), power=2)
    assert list(maps) == net.trunk.layer_names
    for m in maps.values():
        assert m.shape == (2, 32, 32) and m.min() >= 0 and m.max() <= 1 + 1e-6


def test_random_checkpoint_and_missing_inputs_are_skipped(tmp_path):
    run = _tiny_run(tmp_path)
    (run / "log.jsonl").unlink()
    written = visualize.main(["--run", str(run), "--data-root", str(tmp_path / "missing"),
                              "--out", str(tmp_path / "r")])
    assert [p.name for p in written] == ["r_filters.png"]


def test_random_init_from_config(tmp_path):
    run = _tiny_run(tmp_path)
    (run / "checkpoint.pt").unlink()
    (run / "config.yaml").write_text("model: {arch: nin, width: 0.125}\n"
                                     "data: {crop_size: 32, resize_size: 32}\n")
    written = visualize.main(["--run", str(run), "--checkpoint", "random",
                              "--data-root", str(tmp_path / "data"), "--split", "test", "--images", "2",
                              "--out", str(tmp_path / "q")])
    assert sorted(p.name for p in written) == ["q_attention.png", "q_curves.png", "q_filters.png"]


def test_curves_gain_a_knn_panel_when_the_log_has_it(tmp_path, monkeypatch):
    run = _tiny_run(tmp_path)
    panels = []
    real = visualize.subplots
    monkeypatch.setattr(visualize, "subplots", lambda *a, **kw: panels.append(a[:2]) or real(*a, **kw))
    visualize.plot_curves(visualize.read_log(run / "log.jsonl"), "t", tmp_path / "c.png")
    lines = [x for x in (run / "log.jsonl").read_text().splitlines() if "knn_top1" not in x]
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    visualize.plot_curves(visualize.read_log(run / "log.jsonl"), "t", tmp_path / "d.png")
    assert panels == [(1, 3), (1, 2)]


def test_a_bad_eval_json_is_one_line(tmp_path, capsys):
    bad = tmp_path / "eval.json"
    bad.write_text("{not json")
    missing = tmp_path / "none.json"
    for path, message in ((bad, "eval.json: not JSON"), (missing, "none.json: file not found")):
        with pytest.raises(SystemExit, match=message):
            visualize.main(["--eval-json", str(path), "--out", str(tmp_path / "f" / "x")])
        assert capsys.readouterr().err.endswith("\n") and not list(tmp_path.glob("f/*.png"))
