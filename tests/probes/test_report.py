"""Reports: eval.json records, the side-by-side Markdown table, the PNG chart."""
from __future__ import annotations

import json

from probes.report import write_reports

META = {"arch": "alexnet", "width": 0.5, "head": "linear", "epochs": 3, "checkpoint": "runs/x/checkpoint.pt",
        "commit": "abc", "labels_per_class": 0, "seed": 0, "finetune": False}


def _m(t1, t5, n=40):
    return {"top1": t1, "top5": t5, "count": n}


def test_reports_side_by_side(tmp_path):
    results = {"pretrained": {"conv1": _m(30.0, 60.0), "conv2": _m(40.0, 70.0)},
               "random": {"conv1": _m(20.0, 50.0), "conv2": _m(15.0, 45.0)}}
    table = write_reports(results, META, tmp_path)
    assert "random-init top-1" in table and "pretrained top-1" in table and "+25.00" in table
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["pretrained"]["conv2"]["top1"] == 40.0 and data["random"]["conv1"]["num_val"] == 40
    assert data["pretrained"]["conv1"]["checkpoint"] == "runs/x/checkpoint.pt"
    assert {"head", "epochs", "commit", "labels_per_class"} <= set(data["random"]["conv1"])
    assert data["difference_top1"]["conv2"] == 25.0
    assert (tmp_path / "eval.md").read_text() == table
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_reports_single_model(tmp_path):
    table = write_reports({"random": {"conv4": _m(12.5, 40.0)}}, {**META, "checkpoint": None}, tmp_path)
    assert "random init top-1" in table and "difference" not in table
    assert "difference_top1" not in json.loads((tmp_path / "eval.json").read_text())
