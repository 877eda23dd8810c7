"""benchmarks/train_throughput.py: a stop signal ends the benchmark at once; it must not take
train.py's graceful stop and write a checkpoint into the config's train.output_dir."""
import signal
import subprocess
import sys
import time

import pytest

from tests.test_train_distributed import REPO, run_env, tail


@pytest.mark.slow
def test_sigterm_kills_the_benchmark_without_writing_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "benchmarks/train_throughput.py", "--only", "sample", "--steps", "100000",
           "--repeats", "1", "--out", "", f"train.output_dir={out}", "model.width=0.25", "data.crop_size=64",
           "data.resize_size=64", "train.eval_rotation_every=0"]
    p = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    seen = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:         # the line printed after build_run armed its handlers
            line = p.stderr.readline()
            seen.append(line)
            if "built:" in line or not line:
                break
        assert "built:" in seen[-1], tail("".join(seen))
        time.sleep(1.0)                            # into the timed loop
        p.send_signal(signal.SIGTERM)
        rest = p.communicate(timeout=60)[1]
    finally:
        p.kill()
    assert p.returncode == -signal.SIGTERM, tail("".join(seen) + rest)
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
