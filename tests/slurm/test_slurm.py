"""slurm/train.sbatch on a real SLURM cluster: a job completes; USR1 -> checkpoint -> requeue -> resume;
scancel -> checkpoint, no requeue.

Needs a running cluster with one node of >= 2 CPUs (CI: `bash .ci/slurm-setup.sh`, then
`pytest -m slurm`); skipped with the reason otherwise. Jobs run train.py on CPU with 2 tasks
(gloo), in both launch modes of slurm/lib.sh: srun (one task per rank) and torchrun (one
task running torchrun with a c10d rendezvous). No accounting on the test cluster, so there is
no sacct: job states come from `scontrol show job`.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from tests.test_train_distributed import (
    PY,
    REPO,
    free_port,
    load_ckpt,
    make_random_dataset,
    run_env,
    tail,
    train_args,
)

pytestmark = pytest.mark.slurm   # slow too, but its own tier: it needs a cluster

TASKS = 2
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
               "DEADLINE", "PREEMPTED"}



def read_log(path) -> str:
    """The job's log as text. It is read while the job writes it, so a read can end inside a
    multi-byte character of the progress bar: replace it rather than fail."""
    return path.read_text(errors="replace")


def training(log) -> bool:
    """Whether the progress bar (ROTNET_PROGRESS=1) shows >= 3 steps of epoch 0 done. The bar moves
    every train.log_every steps, so the first count it shows after 0 is 10."""
    steps = re.findall(r"epoch 0:[^\r\n|]*\|[^|]*\|\s*(\d+)/", read_log(log) if log.exists() else "")
    return bool(steps) and max(map(int, steps)) >= 3


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (start a test cluster: bash .ci/slurm-setup.sh)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T %c"], capture_output=True, text=True,
                             timeout=15).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {e}"
    nodes = [line.split() for line in out.splitlines() if line.strip()]
    if not any(s.rstrip("*~#$") in ("idle", "mixed") and int(c) >= TASKS for s, c in nodes):
        return f"no idle SLURM node with >= {TASKS} CPUs (sinfo: {out.strip() or 'nothing'})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def job(jid: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=15)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_for(jid: str, pred, timeout: float, what: str, log=None) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job(jid)
        if pred(info):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", jid], timeout=15)
    pytest.fail(f"job {jid}: {what} not seen in {timeout}s (last: {info.get('JobState')})\n"
                + (tail(read_log(log)) if log is not None and log.exists() else ""))


def submit(out, data, log, mode: str, *overrides: str) -> str:
    cmd = ["sbatch", "--parsable", f"--ntasks-per-node={TASKS}", "--cpus-per-task=1", "--gpus-per-node=0",
           "--time=10", f"--job-name=rotnet-test-{mode}", f"--output={log}",
           "slurm/train.sbatch", *train_args(out, data, *overrides)[1:]]   # [1:]: the script runs train.py
    env = run_env(ROTNET_DIR=REPO, PYTHON=PY, MODE=mode, ROTNET_PROGRESS=1, RDZV_PORT=free_port())
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_train_job_completes_and_writes_checkpoint(tmp_path, mode):
    data = make_random_dataset(tmp_path / "data", n=16)            # 2 ranks x 4: 2 steps
    out, log = tmp_path / "run", tmp_path / "job.out"
    jid = submit(out, data, log, mode, "optim.batch_size_per_gpu=4", "optim.epochs=1")
    info = wait_for(jid, lambda j: j.get("JobState") in DONE_STATES, 180, "end of job", log)
    text = read_log(log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), tail(text)
    assert f"launcher {'slurm' if mode == 'srun' else 'torchrun'} | world size {TASKS}" in text
    ckpt = load_ckpt(out)
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"], ckpt["world_size"]) == (1, 0, 2, TASKS)


@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_usr1_checkpoints_requeues_and_resumes(tmp_path, mode):
    """USR1 to the batch shell (what --signal=B:USR1@120 does before the time limit)."""
    # One long epoch (2 ranks x 4: 500 steps): the stop lands a second or two of steps after the
    # signal, far from the epoch's end. With short epochs it sometimes fell on an epoch's last step,
    # whose resume point is the next epoch's start, and this test would not see a mid-epoch resume.
    data = make_random_dataset(tmp_path / "data", n=4000)
    out, log, epochs = tmp_path / "run", tmp_path / "job.out", 1
    jid = submit(out, data, log, mode, "optim.batch_size_per_gpu=4", f"optim.epochs={epochs}")

    wait_for(jid, lambda _: training(log), 180, "training under way", log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True, timeout=15)
    wait_for(jid, lambda j: j.get("Restarts") == "1" and j.get("JobState") == "PENDING", 120, "requeue", log)
    # A requeued job is held back (BeginTime = now + 2 min by default); let it start sooner, but
    # not within the same few seconds: slurmd still lists the old run's credential as revoked
    # and kills the relaunch ("Job credential revoked", job FAILED 1:0).
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=True, timeout=15)
    info = wait_for(jid, lambda j: j.get("JobState") in DONE_STATES, 240, "end of requeued job", log)

    text = read_log(log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), tail(text)
    stop = re.search(r"checkpoint written at epoch (\d+) step (\d+); exiting with code 3", text)
    assert stop, tail(text)
    epoch, step = map(int, stop.groups())
    assert 0 < step < 500, "the stop must be mid-epoch"
    resumed = f"resumed from {out / 'checkpoint.pt'}: epoch {epoch}, step in epoch {step}"
    assert "requeueing job" in text and resumed in text, tail(text)
    ckpt = load_ckpt(out)
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (epochs, 0, 500 * epochs)


def test_scancel_checkpoints_and_is_not_requeued(tmp_path):
    """A plain scancel TERMs the shell too: the run checkpoints, the job stays cancelled."""
    data = make_random_dataset(tmp_path / "data", n=400)
    out, log = tmp_path / "run", tmp_path / "job.out"
    jid = submit(out, data, log, "srun", "optim.batch_size_per_gpu=4", "optim.epochs=3")
    wait_for(jid, lambda _: training(log), 180, "training under way", log)
    subprocess.run(["scancel", jid], check=True, timeout=15)
    info = wait_for(jid, lambda j: j.get("JobState") in DONE_STATES, 120, "end of job", log)
    time.sleep(3)   # a wrongly requeued job would show up as PENDING again
    text = read_log(log)
    assert job(jid).get("JobState") == "CANCELLED" and info.get("Restarts") == "0", tail(text)
    assert "not requeueing" in text, tail(text)
    # The stop lands at the next logging window after the signal, mid-epoch or at the epoch's end
    # (then "epoch 1 step 0"): either way the checkpoint holds exactly that point, past the start.
    stop = re.search(r"stop signal received: checkpoint written at epoch (\d+) step (\d+)", text)
    assert stop, tail(text)
    ckpt = load_ckpt(out)
    assert (ckpt["epoch"], ckpt["epoch_step"]) == tuple(map(int, stop.groups())) and ckpt["step"] >= 10
