"""A Faster R-CNN written the way a popular tutorial's users write one: their own classes
for the transform, the layer getter, the FPN and the heads, in torchvision's older key
layout (``backbone.fpn.inner_blocks.0.weight``, ``rpn.head.conv.weight``), saved as
``{"model", "optimizer", "lr_scheduler", "epoch"}``. Used by ``tests/test_own_models.py``
and, as ``tests/tutorial_detector.py:resnet50_fpn``, by the CLI's ``--model``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d


class Transform(nn.Module):
    """Normalize, resize the shorter side to ``min_size``, pad into one batch."""

    def __init__(self, min_size: int = 320, max_size: int = 512) -> None:
        super().__init__()
        self.min_size, self.max_size = min_size, max_size
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # not in the state dict
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def forward(self, images, targets=None):
        sizes, resized = [], []
        for image in images:
            h, w = image.shape[-2:]
            scale = min(self.min_size / min(h, w), self.max_size / max(h, w))
            image = F.interpolate(
                ((image - self.mean) / self.std)[None], scale_factor=scale, mode="bilinear",
                recompute_scale_factor=True, align_corners=False,
            )[0]  # fmt: skip
            sizes.append(tuple(image.shape[-2:]))
            resized.append(image)
        h = -(-max(s[0] for s in sizes) // 32) * 32
        w = -(-max(s[1] for s in sizes) // 32) * 32
        batch = resized[0].new_zeros(len(resized), 3, h, w)
        for b, image in zip(batch, resized, strict=True):
            b[:, : image.shape[1], : image.shape[2]].copy_(image)
        return ImageList(batch, sizes), targets


class LayerGetter(nn.ModuleDict):
    """Runs the children in order and returns the outputs of ``return_layers``."""

    def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
        layers = OrderedDict()
        for name, child in model.named_children():
            layers[name] = child
            if name == list(return_layers)[-1]:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x):
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class MaxPoolLevel(nn.Module):
    def forward(self, results, names):
        return [*results, F.max_pool2d(results[-1], 1, 2, 0)], [*names, "pool"]


class FPN(nn.Module):
    """The older layout: plain convolutions in ``inner_blocks`` and ``layer_blocks``."""

    def __init__(self, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.layer_blocks = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        self.extra_blocks = MaxPoolLevel()

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        results, names = self.extra_blocks(self.pyramid(x), list(x))
        return OrderedDict(zip(names, results, strict=True))

    def pyramid(self, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The top-down pathway: one map per input level, finest first."""
        feats = list(x.values())
        last = self.inner_blocks[-1](feats[-1])
        results = [self.layer_blocks[-1](last)]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[i](feats[i])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer_blocks[i](last))
        return results


class BackboneWithFPN(nn.Module):
    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FPN(in_channels, out_channels)
        self.out_channels = out_channels

    def forward(self, x):
        return self.fpn(self.body(x))


class RPNHead(nn.Module):
    """The older layout: ``rpn.head.conv`` is a plain convolution."""

    def __init__(self, channels: int, anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(channels, anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, anchors * 4, 1)

    def forward(self, features):
        hidden = [F.relu(self.conv(f)) for f in features]
        return [self.cls_logits(h) for h in hidden], [self.bbox_pred(h) for h in hidden]


class TwoMLPHead(nn.Module):
    def __init__(self, in_channels: int, size: int) -> None:
        super().__init__()
        self.fc6, self.fc7 = nn.Linear(in_channels, size), nn.Linear(size, size)

    def forward(self, x):
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class Predictor(nn.Module):
    def __init__(self, size: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(size, num_classes)
        self.bbox_pred = nn.Linear(size, num_classes * 4)

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)


class FasterRCNN(nn.Module):
    """transform, backbone, rpn, roi_heads: the tutorial's four top-level children."""

    def __init__(self, backbone: nn.Module, num_classes: int, levels: list[str], maps: int) -> None:
        super().__init__()
        channels = backbone.out_channels
        self.transform = Transform()
        self.backbone = backbone
        sizes = tuple((s,) for s in (32, 64, 128, 256, 512)[:maps])
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(channels, 3), 0.7, 0.3, 256, 0.5,
            dict(training=2000, testing=1000), dict(training=2000, testing=1000), 0.7,
        )  # fmt: skip
        pool = MultiScaleRoIAlign(levels, 7, 2)
        self.roi_heads = RoIHeads(
            pool, TwoMLPHead(channels * 49, 1024), Predictor(1024, num_classes),
            0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100,
        )  # fmt: skip

    def forward(self, images):
        original = [tuple(i.shape[-2:]) for i in images]
        image_list, _ = self.transform(images)
        features = self.backbone(image_list.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = self.rpn(image_list, features)
        detections, _ = self.roi_heads(features, proposals, image_list.image_sizes)
        for det, now, before in zip(detections, image_list.image_sizes, original, strict=True):
            ratio = torch.tensor([before[1] / now[1], before[0] / now[0]] * 2)
            det["boxes"] = det["boxes"] * ratio
        return detections


def resnet50_fpn(num_classes: int = 3) -> FasterRCNN:
    """A ResNet-50 with frozen batch norm, its four stages through an FPN."""
    resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    body = LayerGetter(resnet, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"})
    backbone = BackboneWithFPN(body, [256, 512, 1024, 2048])
    return FasterRCNN(backbone, num_classes, ["0", "1", "2", "3"], maps=5)


def mobilenet_v2(num_classes: int = 3) -> FasterRCNN:
    """A MobileNetV2 whose backbone returns one plain tensor."""
    backbone = torchvision.models.mobilenet_v2(weights=None).features
    backbone.out_channels = 1280
    return FasterRCNN(backbone, num_classes, ["0"], maps=1)


def save_checkpoint(model: nn.Module, path, epoch: int) -> None:
    """What the tutorial's training loop saves after each epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": epoch,
        },
        path,
    )
