"""Start-up stays cheap: the entry points import no heavy optional library before they need it.

`train.py --help` or a bad key should cost little more than `import torch`; torchvision alone
adds about as much again, so it, DALI, OpenCV, matplotlib, TensorBoard, W&B and MLflow are imported
in the functions that use them. One subprocess imports every CLI module and lists what got loaded.
"""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI_MODULES = ["train", "eval", "visualize", "pipelines.scan", "pipelines.imagenet_val",
               "pipelines.pack_shards", "models.export"]
HEAVY = ["torchvision", "nvidia.dali", "cv2", "matplotlib", "torch.utils.tensorboard", "tensorboard", "wandb",
         "mlflow"]


def test_entry_points_import_no_heavy_optional_library():
    code = ("import importlib, sys\n"
            f"for m in {CLI_MODULES!r}: importlib.import_module(m)\n"
            f"print(' '.join(h for h in {HEAVY!r} if h in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [], f"imported at start-up: {out.stdout.strip()}"


@pytest.mark.parametrize("module", [m for m in CLI_MODULES if "." in m] + ["pipelines.sample_data"])
def test_each_python_m_tool_starts_without_a_warning(module):
    """`python -m PACKAGE.TOOL --help` prints its help and nothing on stderr: a tool that its package's
    __init__ imports makes runpy warn ("found in sys.modules ... unpredictable behaviour")."""
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr
    assert out.stderr == ""
