"""torchvision detectors and classifiers, checkpoints, and the plain training-loop example."""

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tbfeat import FeatureLogger, list_stages
from tbfeat.integrations.torchvision import build, load_checkpoint

from .helpers import read_events

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"min_size": 128, "max_size": 160}  # keep the R50 detectors quick on a CPU

# builder -> (builder kwargs, expected stage keys)
RESNET_FPN = ["00_stem", "01_layer1", "02_layer2", "03_layer3", "04_layer4"]
RCNN_KEYS = RESNET_FPN + ["05_fpn_0", "06_fpn_1", "07_fpn_2", "08_fpn_3", "09_fpn_pool"]
P6P7_KEYS = RESNET_FPN + ["05_fpn_0", "06_fpn_1", "07_fpn_2", "08_fpn_p6", "09_fpn_p7"]
DETECTORS = {
    "fasterrcnn_resnet50_fpn": (
        SMALL,
        RCNN_KEYS,
    ),
    "fasterrcnn_resnet50_fpn_v2": (
        SMALL,
        RCNN_KEYS,
    ),
    "maskrcnn_resnet50_fpn": (
        SMALL,
        RCNN_KEYS,
    ),
    "keypointrcnn_resnet50_fpn": (
        SMALL,
        RCNN_KEYS,
    ),
    "retinanet_resnet50_fpn": (
        SMALL,
        P6P7_KEYS,
    ),
    "fcos_resnet50_fpn": (
        SMALL,
        P6P7_KEYS,
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        SMALL,
        ["00_Conv2dNormActivation"]
        + [f"{i:02d}_InvertedResidual" for i in range(1, 16)]
        + ["16_Conv2dNormActivation", "17_fpn_0", "18_fpn_1", "19_fpn_pool"],
    ),
    "ssd300_vgg16": ({}, [f"{i:02d}_level_{i}" for i in range(6)]),
    "ssdlite320_mobilenet_v3_large": ({}, [f"{i:02d}_level_{i}" for i in range(6)]),
}


def transformed_size(model, image):
    """The (H, W) of the batch the detector's own transform makes of one image."""
    model.eval()
    with torch.no_grad():
        return tuple(model.transform([image])[0].tensors.shape[-2:])


@pytest.mark.parametrize("arch", sorted(DETECTORS))
def test_detector_logs_body_stages_and_every_feature_level(arch, tmp_path):
    kwargs, keys = DETECTORS[arch]
    model = build(arch, weights_backbone=None, **kwargs)
    assert [s.key for s in list_stages(model)] == keys
    image = torch.rand(3, 120, 150)
    logger = FeatureLogger(model, logdir=tmp_path, max_channels=8)
    feats = logger.log([image], step=2, names=["img"])
    logger.close()
    acc = read_events(tmp_path)
    assert sorted(acc.Tags()["images"]) == sorted(
        [f"{kind}/{k}/img" for kind in ("cam", "features") for k in keys] + ["input/img"]
    )
    # the levels are those of the transformed (resized, normalized, padded) image
    h, w = transformed_size(model, image)
    # which is written for the class activation maps to lie over, each at its stage's size
    assert [(e.width, e.height) for e in acc.Images("input/img")] == [(w, h)]
    cam_sizes = {k: (e.width, e.height) for k in keys for e in acc.Images(f"cam/{k}/img")}
    assert all(max(size) <= 128 and size[0] < w for size in cam_sizes.values())
    first_level = next(iter(feats.values()))
    if not arch.startswith("ssd"):  # FPN levels: the transformed size over a power of two
        assert h / first_level.shape[-2] == w / first_level.shape[-1] in (4, 8, 16, 32)
    level_key = keys[len(keys) - len(feats)]
    (event,) = acc.Images(f"features/{level_key}/img")
    th, tw = first_level.shape[-2:]
    if max(th, tw) > 128:
        s = 128 / max(th, tw)
        th, tw = max(1, round(th * s)), max(1, round(tw * s))
    channels = min(8, first_level.shape[1])
    assert (event.width, event.height) == (channels * (tw + 1) - 1, th)
    assert cam_sizes[level_key] == (tw, th)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    "arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"]
)
def test_classifier_logs_its_blocks(arch, tmp_path):
    model = build(arch)
    stages = list_stages(model)
    expanded = [s for s in stages if "." in s.name]
    if arch != "resnet18":
        assert len(expanded) >= 4  # features / trunk_output unrolled into blocks
    logger = FeatureLogger(model, logdir=tmp_path, max_channels=4)
    logger.log(torch.rand(1, 3, 64, 64), step=0)
    logger.close()
    tags = read_events(tmp_path).Tags()
    logged = {t.split("/")[1] for t in tags["images"] if not t.startswith("input/")}
    outputs = {}

    def record(key):
        def hook(module, args, out):
            outputs.setdefault(key, out.dim())

        return hook

    handles = [s.module.register_forward_hook(record(s.key)) for s in stages]
    model.eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    for h in handles:
        h.remove()
    assert logged == {k for k, d in outputs.items() if d == 4}
    assert {t.split("/")[1] for t in tags["histograms"]} == set(outputs)


def test_detector_inputs_batched_tensor_path_and_pil(tmp_path):
    model = build("fasterrcnn_mobilenet_v3_large_fpn", weights_backbone=None, **SMALL)
    path = tmp_path / "street.png"
    Image.fromarray(np.full((90, 120, 3), 200, np.uint8)).save(path)
    pil = Image.fromarray(np.zeros((60, 60), np.uint8))
    logger = FeatureLogger(model, logdir=tmp_path / "a", stages=["fpn_0"])
    logger.log(torch.rand(2, 3, 80, 80), step=0)
    logger.log([path, pil], step=1)
    logger.close()
    acc = read_events(tmp_path / "a")
    assert [t for t in acc.Tags()["images"] if t.startswith("features/")] == [
        "features/17_fpn_0/0",
        "features/17_fpn_0/1",
        "features/17_fpn_0/street",
    ]
    assert [e.step for e in acc.Images("features/17_fpn_0/1")] == [0, 1]


def test_heads_run_only_when_a_chosen_stage_is_in_them(tmp_path):
    model = build("fasterrcnn_mobilenet_v3_large_fpn", weights_backbone=None, **SMALL)
    logger = FeatureLogger(model, logdir=tmp_path, stages=["rpn.head.conv"])
    out = logger.log([torch.rand(3, 64, 64)], step=0)
    logger.close()
    assert isinstance(out, list) and set(out[0]) == {"boxes", "labels", "scores"}
    # the RPN head runs once per FPN level (0, 1, pool) within one forward
    assert [t for t in read_events(tmp_path).Tags()["images"] if t.startswith("features/")] == [
        "features/20.00_rpn.head.conv/0",
        "features/20.00_rpn.head.conv/call1/0",
        "features/20.00_rpn.head.conv/call2/0",
    ]


def test_adapt_raises_for_what_no_adapter_takes_and_integrations_decline():
    import torchvision
    from torch import nn

    from tbfeat.adapters import ModelAdapter, adapt
    from tbfeat.integrations import torchvision as integration

    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got builtins\.str$"):
        adapt("resnet18")
    transform = torchvision.transforms.ToTensor()  # torchvision's, but no model
    assert integration.adapter_for(transform) is None
    with pytest.raises(TypeError, match=r"got torchvision\.transforms\.transforms\.ToTensor$"):
        adapt(transform)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert integration.adapter_for(plain) is None
    assert integration.adapter_for_structure(plain) is None
    assert type(adapt(plain)) is ModelAdapter and adapt(plain).module is plain
    resnet = build("resnet18")
    assert type(integration.adapter_for(resnet)) is integration.ClassifierAdapter
    assert type(adapt(resnet)) is integration.ClassifierAdapter


def test_checkpoints_load_safely_and_mismatches_name_the_keys(tmp_path):
    model = build("fasterrcnn_mobilenet_v3_large_fpn", weights_backbone=None, num_classes=4)
    ref = tmp_path / "model_3.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=0.1)}, ref)
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    loaded = load_checkpoint(ref, "fasterrcnn_mobilenet_v3_large_fpn")
    assert loaded.epoch == 3 and loaded.extras["epoch"] == 3 and loaded.extras["args"].lr == 0.1
    assert not loaded.model.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    loaded2 = load_checkpoint(bare, "fasterrcnn_mobilenet_v3_large_fpn")
    assert loaded2.extras == {} and loaded2.epoch is None
    assert loaded2.model.roi_heads.box_predictor.cls_score.out_features == 4
    with pytest.raises(
        ValueError, match=r"does not fit fasterrcnn_resnet50_fpn: missing \d+ keys, e\.g\. "
    ):
        load_checkpoint(ref, "fasterrcnn_resnet50_fpn")
    with pytest.raises(ValueError, match="did you mean 'fasterrcnn_resnet50_fpn'"):
        load_checkpoint(ref, "fasterrcnn_resnet50_fnp")
    evil = tmp_path / "evil.pth"
    torch.save({"model": model.state_dict(), "hook": subprocess.Popen}, evil)
    with pytest.raises(ValueError, match="cannot read checkpoint .*evil.pth"):
        load_checkpoint(evil, "fasterrcnn_mobilenet_v3_large_fpn")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(ref.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(truncated, "fasterrcnn_mobilenet_v3_large_fpn")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pth", "resnet18")


def test_training_loop_example_logs_every_epoch_and_saves_reference_checkpoints(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train_torchvision.py"),
            "--out",
            str(out),
            "--arch",
            "fasterrcnn_mobilenet_v3_large_fpn",
            "--epochs",
            "2",
            "--iters",
            "2",
            "--imgsz",
            "96",
            "--min-size",
            "96",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    acc = read_events(out)
    assert [e.step for e in acc.Images("features/19_fpn_pool/probe1")] == [1, 2]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    for epoch in (0, 1):
        loaded = load_checkpoint(
            out / f"model_{epoch}.pth",
            "fasterrcnn_mobilenet_v3_large_fpn",
            min_size=96,
            max_size=96,
        )
        assert loaded.epoch == epoch and "optimizer" in loaded.extras
    w0 = torch.load(out / "model_0.pth", weights_only=False)["model"]
    w1 = torch.load(out / "model_1.pth", weights_only=False)["model"]
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # it really trained
