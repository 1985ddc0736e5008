"""Train a small classifier for a few epochs and log its stages to TensorBoard every epoch.

Nothing is downloaded: the data are coloured shapes drawn on the spot, the model is
torchvision's resnet18 with random initial weights, and the probe image is a real photo
shipped with Ultralytics when it is installed (else a drawn one).

    python scripts/demo.py --logdir runs/demo --epochs 3
    tensorboard --logdir runs/demo --samples_per_plugin images=100
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from tbfeat import FeatureLogger


def shapes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of a filled square (class 0) or disc (class 1) on noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.rand(n, 3, size, size, generator=g) * 0.3
    labels = torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        r = int(torch.randint(size // 8, size // 3, (1,), generator=g))
        cy, cx = (int(v) for v in torch.randint(r, size - r, (2,), generator=g))
        if labels[i] == 0:
            mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        else:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        colour = torch.rand(3, 1, generator=g) * 0.7 + 0.3
        images[i][:, mask] = colour
    return images, labels


def probe_images(size: int) -> list:
    try:
        from ultralytics.utils import ASSETS

        return [Path(ASSETS) / "bus.jpg"]
    except ImportError:
        return [shapes(1, size, seed=123)[0][0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=2)
    images, labels = shapes(256, args.size, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    probes = probe_images(args.size)

    logger = FeatureLogger(model, logdir=args.logdir, max_channels=16)
    logger.log(probes, step=0)  # the untrained network
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        for i in range(0, len(images), 32):
            loss = nn.functional.cross_entropy(model(images[i : i + 32]), labels[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        logger.log(probes, step=epoch)
        log_s = time.perf_counter() - t0
        logger.writer.add_scalar("train/loss", loss.item(), epoch)
        print(f"epoch {epoch}: loss {loss.item():.3f}, train {train_s:.1f}s, log {log_s:.2f}s")
    logger.close()
    n = len(list(Path(args.logdir).glob("events.out.tfevents.*")))
    print(f"wrote {n} event file(s) to {args.logdir}")
    print(f"open: tensorboard --logdir {args.logdir} --samples_per_plugin images=100")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
