"""W&B and MLflow beside TensorBoard (rotnet/progress.py): the same scalars as log.jsonl, one run
across a resume with no step twice, eval.py's table in the same run.

The default tier needs neither package: the config check, the one-line "pip install" error and the
no-step-twice rule (on a stand-in tracker). Tests marked `trackers` run the real packages offline
(W&B offline files, an MLflow SQLite store) and read back what they wrote; .ci/run installs both.
"""
from __future__ import annotations

import glob
import itertools
import json
import struct
from pathlib import Path

import pytest
import torch

import eval as eval_cli
from rotnet import progress
from rotnet.config import ConfigError, load_config
from rotnet.preemption import REQUEUE_EXIT_CODE, StopFlag
from tests.test_train_distributed import load_ckpt, make_random_dataset, train_args
from tests.tiny_run import TINY_RUN, train_in_process

BOTH = "train.loggers=[tensorboard,wandb,mlflow]"


def test_unknown_logger_is_one_config_error():
    with pytest.raises(ConfigError, match=r"train.loggers\[1\]='comet': expected one of tensorboard, wandb"):
        load_config("configs/sample.yaml", ["train.loggers=[tensorboard,comet]"])


def test_missing_package_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    real = progress.importlib.util.find_spec
    monkeypatch.setattr(progress.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_in_process(["train.loggers=[tensorboard,wandb]", f"train.output_dir={out}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: train.loggers asks for wandb, which is not installed: pip install wandb"]
    assert not out.exists()


class FakeRun:
    """Stands in for a tracker backend: records what it was sent."""
    made: list[FakeRun] = []

    def __init__(self, out: Path, run_id: str | None, params: dict | None):
        self.id, self.params, self.points, self.closed = run_id or f"run{len(self.made)}", params, [], None
        self.made.append(self)

    def log(self, scalars, step):
        self.points += [(k, step) for k in scalars]

    def close(self, finished):
        self.closed = finished


def test_resumed_run_continues_the_run_and_skips_steps_it_already_got(tmp_path, monkeypatch):
    """A run that died after logging step 10 but was checkpointed at step 6: the resumed ones reopen
    the same tracker run and send nothing at or before step 10, even after dying again before it."""
    monkeypatch.setattr(progress, "BACKENDS", {"wandb": FakeRun})
    FakeRun.made = []
    cfg = load_config("configs/sample.yaml", ["train.loggers=[wandb]", f"train.output_dir={tmp_path}"])
    first = progress.open_trackers(cfg, {}, "abc")
    assert first.runs["wandb"].params["commit"] == "abc" and first.runs["wandb"].params["train"]["loggers"]
    for step in range(1, 11):
        first.log({"train/loss": 1.0}, step)
    first.log({"epoch/loss": 1.0}, 10)   # an epoch record shares its last window's step
    ids = first.ids()                    # what the checkpoint at step 6 kept

    again = progress.open_trackers(cfg, ids, "abc")
    assert again.ids() == ids and again.runs["wandb"].params is None   # continued, parameters not resent
    for step in range(7, 10):            # dies again before step 10: it sent nothing
        again.log({"train/loss": 1.0}, step)
    third = progress.open_trackers(cfg, ids, "abc")
    for step in range(7, 13):
        third.log({"train/loss": 1.0}, step)
    third.close(finished=True)
    points = [p for t in (first, again, third) for p in t.runs["wandb"].points]
    assert [s for k, s in points if k == "train/loss"] == list(range(1, 13))
    assert ("epoch/loss", 10) in points and third.runs["wandb"].closed is True

    fresh = progress.open_trackers(cfg, {}, "abc")   # no checkpoint: a new run gets every step
    fresh.log({"train/loss": 1.0}, 1)
    assert fresh.ids() != ids and fresh.runs["wandb"].points == [("train/loss", 1)]


def test_tensorboard_alone_opens_no_tracker(tmp_path):
    assert progress.open_trackers(load_config(None, [f"train.output_dir={tmp_path}"]), {}, "abc") is None


def test_eval_log_to_a_run_without_one_is_refused(trained_run, capsys):
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--checkpoint", str(trained_run[0]), "--head", "knn", "--log-to", "mlflow"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mlflow" in err[0], err


# --- the real packages, offline ------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    """Both packages, offline, quiet; the default MLflow store (OUTPUT_DIR/mlflow.db)."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)


def wandb_history(out: Path, run_id: str) -> list[dict]:
    """Every history row of every offline segment of W&B run `run_id` under `out`, in order:
    the .wandb files are LevelDB-style logs (32 KiB blocks of CRC, length, type, data) of protobufs."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}*" / f"run-{run_id}.wandb"))):
        data, pos, chunk = Path(path).read_bytes(), 7, b""   # 7: the ':W&B' file header
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if kind == 0:   # the end of a block
                pos += left
                continue
            chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):   # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunk)
                chunk = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                 for i in record.history.item})
    return rows


def mlflow_points(out: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of MLflow run `run_id` in OUTPUT_DIR/mlflow.db."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(progress.mlflow_uri(out))
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
            for k in client.get_run(run_id).data.metrics}


def wandb_points(out: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The W&B history in mlflow_points' form: x = global_step."""
    points: dict[str, list] = {}
    for row in wandb_history(out, run_id):
        for k, v in row.items():
            if not k.startswith("_") and k != "global_step" and isinstance(v, (int, float)):
                points.setdefault(k, []).append((row["global_step"], float(v)))
    return {k: sorted(v) for k, v in points.items()}


@pytest.mark.trackers
def test_two_epochs_send_log_jsonl_scalars_to_both(sample_data, tmp_path, offline):
    out = tmp_path / "run"
    train_in_process(["--config", "configs/sample.yaml", f"data.root={sample_data}", *TINY_RUN,
                      "optim.epochs=2", f"train.output_dir={out}", BOTH])
    ids = load_ckpt(out)["trackers"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for points in (wandb_points(out, ids["wandb"]), mlflow_points(out, ids["mlflow"])):
        for r in records:
            for k, v in r.items():   # knn_top1 {layer: %} goes as epoch/knn_top1/<layer>
                values = {f"epoch/{k}/{sub}": x for sub, x in v.items()} if isinstance(v, dict) else {
                    f"epoch/{k}": v}
                for key, x in values.items():
                    if isinstance(x, (int, float)) and k != "epoch":
                        assert (r["step"], pytest.approx(float(x))) in points[key], key
            assert (r["step"], r["epoch"]) in points["epoch"]
        assert [s for s, _ in points["train/loss"]] == [2, 4]   # log_every 2, 2 steps an epoch
        assert {"train/rot_acc", "train/lr", "train/img/s", "epoch/heldout_rot_acc"} <= set(points)

    from mlflow.tracking import MlflowClient

    run = MlflowClient(progress.mlflow_uri(out)).get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.data.params["optim.epochs"] == "2"
    assert run.data.params["commit"] == load_ckpt(out)["commit"]


@pytest.mark.trackers
def test_preempted_resumed_and_crashed_run_is_one_run_with_no_step_twice(tmp_path, offline, monkeypatch):
    """6 steps an epoch, 2 epochs: preempted after step 4 (exit 3, the runs marked stopped), resumed
    and stopped at step 10, then sent back to the epoch-0 checkpoint (step 6), as after a crash that
    lost the later one: the last run trains steps 7-10 again but sends only 11, 12 and the last
    epoch's record, to the same runs. (The stop at step 10 wrote a partial epoch record, as in
    log.jsonl.)"""
    data = make_random_dataset(tmp_path / "data", n=24)
    out = tmp_path / "run"
    args = train_args(out, data, "optim.batch_size_per_gpu=4", "optim.epochs=2", BOTH)[1:]
    with monkeypatch.context() as m:   # a stop signal seen at the end of step 4
        steps = itertools.count(1)
        m.setattr(StopFlag, "should_stop", lambda self, window_end: next(steps) == 4)
        with pytest.raises(SystemExit) as e:
            train_in_process(args)
    assert e.value.code == REQUEUE_EXIT_CODE and load_ckpt(out)["step"] == 4
    ids = load_ckpt(out)["trackers"]
    from mlflow.tracking import MlflowClient

    assert MlflowClient(progress.mlflow_uri(out)).get_run(ids["mlflow"]).info.status == "KILLED"
    train_in_process([*args, "train.max_steps=10"])
    (out / "checkpoint_0001.pt").replace(out / "checkpoint.pt")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6
    train_in_process(args)
    assert load_ckpt(out)["trackers"] == ids and load_ckpt(out)["step"] == 12
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["complete"]) for r in records] == [(6, True), (10, False), (12, True)]

    assert len(glob.glob(str(out / "wandb" / f"offline-run-*-{ids['wandb']}*"))) == 3   # three segments
    for points in (wandb_points(out, ids["wandb"]), mlflow_points(out, ids["mlflow"])):
        assert [s for s, _ in points["train/loss"]] == list(range(1, 13))
        assert [s for s, _ in points["epoch/loss"]] == [6, 10, 12]
        for k, p in points.items():
            assert len({s for s, _ in p}) == len(p), f"{k}: a step twice"
    assert MlflowClient(progress.mlflow_uri(out)).get_run(ids["mlflow"]).info.status == "FINISHED"


@pytest.mark.trackers
def test_eval_adds_its_table_and_figure_to_the_training_run(sample_data, tmp_path, offline):
    out = tmp_path / "run"
    train_in_process(["--config", "configs/sample.yaml", f"data.root={sample_data}", *TINY_RUN,
                      "optim.epochs=1", f"train.output_dir={out}", BOTH])
    ids, step = load_ckpt(out)["trackers"], load_ckpt(out)["step"]
    for tracker in ("wandb", "mlflow"):
        eval_cli.main(["--checkpoint", str(out), "--head", "knn", "--layer", "conv2,conv3",
                       "--log-to", tracker, f"data.root={sample_data}"])
    results = json.loads((out / "eval_knn" / "eval.json").read_text())["pretrained"]

    row = next(r for r in wandb_history(out, ids["wandb"]) if "eval/eval_knn/table/_type" in r)
    assert row["global_step"] == step and row["eval/eval_knn/table/nrows"] == 2
    (table,) = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / row["eval/eval_knn/table/path"]))
    table = json.loads(Path(table).read_text())
    assert [r[1:3] for r in table["data"]] == [[la, results[la]["top1"]] for la in ("conv2", "conv3")]
    assert row["eval/eval_knn/figure/_type"] == "image-file"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(progress.mlflow_uri(out))
    logged = json.loads(Path(client.download_artifacts(ids["mlflow"], "eval_knn/table.json", str(tmp_path)))
                        .read_text())
    assert dict(zip(logged["columns"], logged["data"][1]))["top1"] == results["conv3"]["top1"]
    assert {a.path for a in client.list_artifacts(ids["mlflow"], "eval_knn")} >= {"eval_knn/eval.png"}
