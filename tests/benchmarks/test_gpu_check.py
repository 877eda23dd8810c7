"""The GPU check's CPU path at toy sizes: every step's command and flags run for real, in the
check's order (correctness first, then speed), so the script cannot rot between the (rare) sessions
that have a GPU. Slow-ish: ~9 Python processes."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import dali_available
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
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1500)
    summary = (out / "summary.txt").read_text()
    log = (out / "check.log").read_text() if (out / "check.log").exists() else ""
    assert r.returncode == 0, f"gpu_check failed:\n{summary}\n--- log tail ---\n{log[-4000:]}"
    assert re.findall(r"^=== (\w+): ", summary, re.M) == list(ORDER), summary
    for name in ORDER:
        assert f"=== {name}: " + ("not run (needs CUDA" if name in GPU_ONLY else "rc=0") in summary, summary
    assert "decode DALI cpu vs torchvision" in summary and "images:" in summary and "resumed from" in summary
    assert "0 host syncs outside the logging window" in summary and "memory after epoch 3: RSS" in summary
    assert "failed: none; skipped: none" in summary


def test_the_budget_cuts_the_speed_steps_first(tmp_path):
    """A budget too small for everything: the checks still run (limits cut to what is left), the
    throughput steps are skipped. The Python commands are stubbed (PYTHON=true, so a check that
    greps their output fails): only the budgeting is under test, and it takes a second."""
    data = tmp_path / "data"
    (data / "train" / "c0").mkdir(parents=True)
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "DATA": str(data), "OUT": str(out),
           "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_BUDGET": "100", "PYTHON": "true"}
    subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, timeout=120)
    summary = (out / "summary.txt").read_text()
    for name in ("sanity", "train_resume", "eval", "fp32_graph_input", "step_check"):
        assert f"=== {name}: rc=" in summary, summary
    for name in ("pipeline", "pipeline_imagenet_sized", "train_throughput"):   # 150-200 s limits > 100
        assert f"=== {name}: SKIPPED (budget" in summary, summary


def test_gpu_check_refuses_missing_data(tmp_path):
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "DATA": str(tmp_path / "nowhere"),
           "OUT": str(tmp_path / "o"), "GPU_CHECK_WORK": str(tmp_path / "w"), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "nowhere/train not found" in (tmp_path / "o" / "summary.txt").read_text()
