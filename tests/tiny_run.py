"""Entry points run in this process, and the sizes of the tiny pretraining run the tests share.

A test that checks what a run does (not how a process exits) calls the entry point's `main(argv)`
here instead of starting `python train.py`: a Python start with torch costs seconds.
"""
import contextlib
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The tiny pretraining run: configs/sample.yaml's AlexNet at x0.25 and 64 px, 8 originals per step.
TINY_RUN = ["data.crop_size=64", "data.resize_size=72", "model.width=0.25", "optim.batch_size_per_gpu=8",
            "train.log_every=2"]


def train_in_process(argv: list[str]) -> str:
    """`python train.py ARGV` in this process (repo root; no progress bar unless ROTNET_PROGRESS=1);
    what it wrote to stderr. When it raises (SystemExit included), that text goes to sys.stderr first:
    to capsys, and to pytest's report of a failure."""
    import train  # here, not at the top: the modules that import this one need not pay for it

    err = io.StringIO()
    try:
        with contextlib.chdir(REPO), contextlib.redirect_stderr(err):
            train.main(argv)
    except BaseException:
        sys.stderr.write(err.getvalue())
        raise
    return err.getvalue()
