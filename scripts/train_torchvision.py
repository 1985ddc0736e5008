"""Train a torchvision detector on synthetic shapes, log its stages every epoch, save checkpoints.

A plain PyTorch training loop, the way torchvision's detection reference script is
written: each epoch ends with ``logger.log(probe_images, step=epoch)`` and a checkpoint
``model_<epoch>.pth`` = ``{"model": state_dict, "optimizer": ..., "epoch": epoch, "args":
Namespace}``, which ``tbfeat.integrations.torchvision.load_checkpoint`` reads back.

    python scripts/train_torchvision.py --out runs/frcnn --epochs 2 --iters 4
    tensorboard --logdir runs/frcnn --samples_per_plugin images=100
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision

from tbfeat import FeatureLogger
from tbfeat.synthetic import CLASSES, detection_samples


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="fasterrcnn_resnet50_fpn")
    p.add_argument("--out", default="runs/torchvision")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--iters", type=int, default=4, help="training iterations per epoch")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--imgsz", type=int, default=160, help="synthetic image side")
    p.add_argument("--min-size", type=int, default=160, help="the detector's resize target")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = torchvision.models.get_model(
        args.arch,
        weights=None,
        weights_backbone=None,
        num_classes=len(CLASSES) + 1,
        min_size=args.min_size,
        max_size=args.min_size,
    )
    data = detection_samples(args.iters * args.batch, imgsz=args.imgsz, seed=0)
    probes = [image for image, _ in detection_samples(2, imgsz=args.imgsz, seed=99)]
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)

    logger = FeatureLogger(model, logdir=out, max_channels=16)
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        for i in range(0, len(data), args.batch):
            images, targets = zip(*data[i : i + args.batch], strict=True)
            losses = model(list(images), list(targets))
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        logger.log(probes, step=epoch + 1, names=["probe0", "probe1"])  # 1-based, as sweeps
        logger.writer.add_scalar("train/loss", loss.item(), epoch + 1)
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "args": args,
        }
        torch.save(checkpoint, out / f"model_{epoch}.pth")
        print(f"epoch {epoch}: loss {loss.item():.3f} ({time.perf_counter() - t0:.1f}s)")
    logger.close()
    print(f"checkpoints and events in {out}")


if __name__ == "__main__":
    main()
