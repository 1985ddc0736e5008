"""Every model configuration shipped with Ultralytics predicts bus.jpg inside a FeatureLogger
and yields one grid for every non-head stage whose output is a 4-D tensor."""

from pathlib import Path

import pytest
import torch

ultralytics = pytest.importorskip("ultralytics")  # the optional extra; `make test` installs it

from ultralytics import RTDETR, YOLO  # noqa: E402
from ultralytics.utils import ASSETS  # noqa: E402

from tbfeat import FeatureLogger  # noqa: E402

from .helpers import read_events  # noqa: E402

CONFIG_ROOT = Path(ultralytics.__file__).parent / "cfg" / "models"
CONFIGS = sorted(str(p.relative_to(CONFIG_ROOT)) for p in CONFIG_ROOT.rglob("*.yaml"))
# Configurations whose build itself needs the network (pretrained torchvision backbones).
NEEDS_DOWNLOAD = {"11/yolo11-cls-resnet18.yaml"}


def build(config: str):
    path = str(CONFIG_ROOT / config)
    return RTDETR(path) if "rtdetr" in Path(config).name else YOLO(path)


def four_d_layers(model) -> set[str]:
    """Keys of the non-head layers that output 4-D tensors, found with plain torch hooks."""
    net = model.model
    layers = net.model
    found: set[str] = set()

    def hook(mod, args, out):
        items = out if isinstance(out, (list, tuple)) else [out]
        if any(isinstance(t, torch.Tensor) and t.dim() == 4 for t in items):
            found.add(f"{mod.i:02d}_{mod.type.rsplit('.', 1)[-1]}")

    heads = [m for m in layers if m is layers[-1] or type(m).__module__.endswith("modules.head")]
    handles = [m.register_forward_hook(hook) for m in layers if m not in heads]
    training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.rand(1, 3, 64, 64))
    finally:
        net.train(training)
        for h in handles:
            h.remove()
    return found


def test_the_list_covers_every_family():
    families = {c.split("/")[0] for c in CONFIGS}
    assert {"v3", "v5", "v6", "v8", "v9", "v10", "11", "12", "rt-detr"} <= families
    assert len(CONFIGS) >= 60


@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in NEEDS_DOWNLOAD])
def test_config_logs_one_grid_per_non_head_4d_stage(config, tmp_path):
    model = build(config)
    with FeatureLogger(model, logdir=tmp_path) as logger:
        model.predict(ASSETS / "bus.jpg", imgsz=64, verbose=False)
    tags = read_events(tmp_path).Tags()["images"]
    logged = {t.split("/")[1] for t in tags}
    expected = four_d_layers(model)
    assert expected, config
    assert logged == expected
    assert all(t.endswith("/bus") for t in tags)
    assert all(not m._forward_hooks for m in model.model.modules())
    assert not any(s.module is model.model.model[-1] for s in logger.stages)  # head skipped


@pytest.mark.parametrize("config", sorted(NEEDS_DOWNLOAD))
def test_configs_that_download_weights_to_build_fail_without_tbfeat(config):
    # Ultralytics itself cannot build these offline; when it can, move them to the list above.
    with pytest.raises(Exception, match="urlopen|Name or service|download|connect"):
        build(config)
