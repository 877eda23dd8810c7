"""The GPU check's CPU path at toy sizes: every step's command and flags run for real, in the
check's order (correctness first, then speed), so the script cannot rot between the (rare) sessions
that have a GPU. Slow-ish: ~9 Python processes."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.scan import dali_available
from tests.pipelines.images import make_folder

REPO = Path(__file__).resolve().parents[2]
# The order of the steps: checks first, then the speed steps the budget cuts first.
ORDER = ("sanity", "cuda_tests", "train_resume", "eval", "fp32_graph_input", "smoke_test", "step_check",
         "pipeline", "pipeline_imagenet_sized", "train_throughput")
GPU_ONLY = ("cuda_tests", "smoke_test")


@pytest.mark.slow
@pytest.mark.skipif(not dali_available(), reason="nvidia.dali not installed (the check is DALI's)")
def test_gpu_check_cpu_path(tmp_path):
    data = tmp_path / "data"
    make_folder(data / "train", [8, 8], size=(48, 64))
    make_folder(data / "val", [3, 3], size=(48, 64), seed=1)
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "DATA": str(data), "OUT": str(out),
           "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_BUDGET": "1500", "PYTHON": sys.executable}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--report-only"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1500)   # CPU toy speeds: targets reported
    summary = (out / "summary.txt").read_text()
    log = (out / "check.log").read_text() if (out / "check.log").exists() else ""
    assert r.returncode == 0, f"gpu_check failed:\n{summary}\n--- log tail ---\n{log[-4000:]}"
    assert re.findall(r"^=== (\w+): ", summary, re.M) == list(ORDER), summary
    for name in ORDER:
        assert f"=== {name}: " + ("not run (needs CUDA" if name in GPU_ONLY else "rc=0") in summary, summary
    assert "decode DALI cpu vs torchvision" in summary and "images:" in summary and "resumed from" in summary
    assert "0 host syncs outside the logging window" in summary and "memory after epoch 3: RSS" in summary
    assert re.search(r"^target alexnet224: real input at [0-9.]+ of replayed \(target >= 0.90\)", summary,
                     re.M)
    assert "failed: none; not run: none; speed not run: none" in summary


def test_the_budget_cuts_the_speed_steps_first(tmp_path):
    """A budget too small for everything: the checks still run (limits cut to what is left), the
    throughput steps are skipped. The Python commands are stubbed (PYTHON=true, so a check that
    greps their output fails): only the budgeting is under test, and it takes a second."""
    data = tmp_path / "data"
    (data / "train" / "c0").mkdir(parents=True)
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "DATA": str(data), "OUT": str(out),
           "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_BUDGET": "100", "PYTHON": "true"}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    summary = (out / "summary.txt").read_text()
    for name in ("sanity", "train_resume", "eval", "fp32_graph_input", "step_check"):
        assert f"=== {name}: rc=" in summary, summary
    for name in ("pipeline", "pipeline_imagenet_sized", "train_throughput"):   # 150-200 s limits > 100
        assert f"=== {name}: SKIPPED (budget" in summary, summary
    assert r.returncode == 1 and "failed: train_resume" in r.stderr   # its grep found no 'resumed from'


def test_a_check_that_did_not_run_fails_the_script_and_is_named(tmp_path):
    """A budget too small for any check step: nothing was checked, so the exit status is not 0."""
    data = tmp_path / "data"
    (data / "train" / "c0").mkdir(parents=True)
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "DATA": str(data), "OUT": str(tmp_path / "out"),
           "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_BUDGET": "10", "PYTHON": "true"}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--report-only"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    checks = "sanity train_resume eval fp32_graph_input step_check"
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert f"gpu_check: not run, so not checked: {checks}" in r.stderr
    assert f"not run: {checks};" in r.stdout


FAKE_PYTHON = """#!/usr/bin/env bash
# Every command passes; train_throughput prints its table: AlexNet at 0.5 of replayed, ResNet-50 at 0.97.
case "$*" in
  *train_throughput.py*) cat <<'EOF'
| alexnet224 | alexnet x1 | 224 | 192 | bf16 | real (dali, 16 threads) | 5.00 | 960 | 3840 | 40% | 50% | 1.0 |
| alexnet224 | alexnet x1 | 224 | 192 | bf16 | synthetic (in memory) | 10.00 | 1920 | 7680 | 0% | - | - |
| resnet50_224 | resnet50 x1 | 224 | 64 | bf16 | real (dali, 16 threads) | 9.70 | 621 | 2483 | 2% | 3% | 1.0 |
| resnet50_224 | resnet50 x1 | 224 | 64 | bf16 | synthetic (in memory) | 10.00 | 640 | 2560 | 0% | - | - |
EOF
  ;;
  *) echo "resumed from stub" ;;
esac
"""


@pytest.mark.parametrize("report_only", [False, True])
def test_a_missed_throughput_target_is_printed_and_fails_unless_report_only(tmp_path, report_only):
    data = tmp_path / "data"
    (data / "train" / "c0").mkdir(parents=True)
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "DATA": str(data), "OUT": str(tmp_path / "out"),
           "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_BUDGET": "1000", "PYTHON": str(python)}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"] + ["--report-only"] * report_only, cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "target alexnet224: real input at 0.500 of replayed (target >= 0.90): MISSED" in summary
    assert "target resnet50_224: real input at 0.970 of replayed (target >= 0.95): met" in summary
    assert "failed: none; not run: none; speed not run: none; targets missed: alexnet224" in summary
    assert r.returncode == (0 if report_only else 4), (r.returncode, r.stderr, summary)


def test_gpu_check_refuses_missing_data_and_unknown_arguments(tmp_path):
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "DATA": str(tmp_path / "nowhere"),
           "OUT": str(tmp_path / "o"), "GPU_CHECK_WORK": str(tmp_path / "w"), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "nowhere/train not found" in (tmp_path / "o" / "summary.txt").read_text()
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--fast"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unknown argument --fast" in r.stderr
