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
