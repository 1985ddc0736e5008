"""The environment the README's set-up produces: a torch/torchvision pair that works."""

import torch
import torchvision


def test_torchvision_nms_runs_on_cpu():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = torchvision.ops.nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_core_imports_without_ultralytics():
    import subprocess
    import sys

    code = (
        "import sys, tbfeat, torch\n"
        "tbfeat.FeatureLogger(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))\n"
        "assert 'ultralytics' not in sys.modules, 'core imported ultralytics'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pip_flags_can_be_overridden_for_mirrors():
    """``--isolated`` by default; ``make setup PIP_FLAGS=`` keeps the user's pip
    configuration (a package mirror). ``make -n -B`` prints the commands, runs none."""
    import shutil
    import subprocess
    from pathlib import Path

    import pytest

    if shutil.which("make") is None:
        pytest.fail("make is needed to build this project (the README's commands)")
    root = Path(__file__).resolve().parents[1]

    def pip_lines(*args):
        out = subprocess.run(["make", "-n", "-B", "setup", *args], cwd=root, text=True,
                             capture_output=True, check=True).stdout  # fmt: skip
        return [line for line in out.splitlines() if "pip install" in line]

    default, mirror = pip_lines(), pip_lines("PIP_FLAGS=")
    assert len(default) == len(mirror) == 2
    assert all(" --isolated " in line for line in default)
    assert not any("--isolated" in line for line in mirror)
