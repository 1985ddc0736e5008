"""How much a FeatureLogger costs next to the forward pass it watches.

Cases (yolov8n from its yaml, bus.jpg, this machine's CPU; ratios measured in one process,
plain and logged runs interleaved, medians):

- ``yolo``: predict at 640 px with all 22 stages logged (grids, histograms, scalars):
  time until predict returns and until the events are flushed, over the plain predict;
  event-file bytes per logged image.
- ``seed``: the approach tbfeat replaces, reimplemented as described (first 32 channels per
  layer, matplotlib ``subplots(ceil(n/8), 8)``, ``imshow`` per channel,
  ``savefig(dpi=300, bbox_inches="tight")``, ``np.save`` of ``x[0]``), against tbfeat.
- ``frcnn``: Faster R-CNN R50-FPN (weights=None) at 800 px, ``logger.log`` until flushed,
  over plain inference (transform + backbone + heads).
- ``memory``: resident memory growth over 500 logged steps after the first.
- ``stages``: torchvision resnet50 (weights=None) at 224 px, one image, every module a
  stage (about 150): ``log()`` and a ``with`` block until flushed, over the plain forward;
  event bytes per step and the size of the drift history rewritten at every step.
- ``scale``: the predict overhead at 320, 640 and 1280 px, and with 1, 4 and 16 images.
- ``vit``: timm's ViT-S/16 (pretrained=False) at 224 px, one image, its 12 blocks as
  token maps: a ``with`` block around the plain forward until flushed, and a ``log()``
  probe with LayerCAM, over the plain forward.
- ``cams``: a ``log()`` probe with class activation maps (LayerCAM, ``cam_topk`` 4 and
  16) against the same probe without (``cam=None``), until flushed: yolov8n at 640 px
  and Faster R-CNN R50-FPN at 800 px, one image.

    python scripts/bench.py                 # everything (about 5 minutes)
    python scripts/bench.py --quick         # one short case, as CI runs it
    python scripts/bench.py --cases yolo scale --json bench.json
    python scripts/bench.py --cases stages --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tbfeat import FeatureLogger

ROWS: list[dict[str, Any]] = []


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def event_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("events.out.tfevents.*"))


def record(case: str, median_s: float, ratio: float | None = None, **extra: Any) -> None:
    row = {
        "case": case,
        "median_s": round(median_s, 4),
        "ratio": None if ratio is None else round(ratio, 3),
        **extra,
    }
    ROWS.append(row)
    bits = [f"{case:<34}", f"{median_s * 1000:9.1f} ms", f"{ratio:6.2f}x" if ratio else " " * 7]
    bits += [f"{k}={v}" for k, v in extra.items()]
    print("  ".join(bits), flush=True)


def bus_paths(n: int) -> list[str]:
    from ultralytics.utils import ASSETS

    return [str(Path(ASSETS) / "bus.jpg")] * n


def predict_overhead(imgsz: int, n_images: int, repeats: int) -> dict[str, float]:
    """Median plain predict, and logged predict until it returns and until flushed."""
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml")
    source = bus_paths(n_images)
    for _ in range(3):
        yolo.predict(source, imgsz=imgsz, verbose=False)
    plain, returned, flushed = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        logger = FeatureLogger(yolo, logdir=tmp, max_images=n_images)
        with logger.at(-1):
            yolo.predict(source, imgsz=imgsz, verbose=False)  # warm the logging path
        base = dir_bytes(tmp)
        for i in range(repeats):
            t0 = time.perf_counter()
            yolo.predict(source, imgsz=imgsz, verbose=False)
            plain.append(time.perf_counter() - t0)
            with logger.at(i):
                t0 = time.perf_counter()
                yolo.predict(source, imgsz=imgsz, verbose=False)
                returned.append(time.perf_counter() - t0)
            flushed.append(time.perf_counter() - t0)  # leaving the block flushes
        logger.close()
        per_image = (dir_bytes(tmp) - base) / (repeats * n_images)
    # ratios of adjacent runs: a slow moment of the machine slows both of a pair
    return {
        "plain": statistics.median(plain),
        "returned": statistics.median(returned),
        "flushed": statistics.median(flushed),
        "returned_ratio": statistics.median(r / p for r, p in zip(returned, plain, strict=True)),
        "flushed_ratio": statistics.median(f / p for f, p in zip(flushed, plain, strict=True)),
        "bytes_per_image": per_image,
    }


def case_yolo(repeats: int) -> None:
    r = predict_overhead(640, 1, repeats)
    record("yolov8n 640 predict (plain)", r["plain"])
    record("  + FeatureLogger, returned", r["returned"], r["returned_ratio"], target="<=1.25x")
    record(
        "  + FeatureLogger, flushed",
        r["flushed"],
        r["flushed_ratio"],
        target="<=1.40x",
        bytes_per_image=int(r["bytes_per_image"]),
        bytes_target="<=1500000",
    )


def seed_baseline(outdir: Path) -> float:
    """One image, the old per-layer visualization: returns seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml")
    model = yolo.model.eval()
    layers = model.model
    outputs: list[tuple[int, str, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda m, a, o: outputs.append((m.i, m.type, o)))
        for m in layers[:-1]
    ]
    from tbfeat.images import load_image
    from tbfeat.integrations.ultralytics import letterbox

    image = letterbox(load_image(bus_paths(1)[0], exif_orientation=True), 640)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(image[None])
    for i, mtype, x in outputs:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            continue
        _, channels, h, w = x.shape
        f = outdir / f"stage{i}_{mtype.split('.')[-1]}_features.png"
        blocks = torch.chunk(x[0].cpu(), channels, dim=0)
        n = min(32, channels)
        fig, ax = plt.subplots(math.ceil(n / 8), 8, tight_layout=True)
        ax = ax.ravel()
        plt.subplots_adjust(wspace=0.05, hspace=0.05)
        for k in range(n):
            ax[k].imshow(blocks[k].squeeze())
            ax[k].axis("off")
        plt.savefig(f, dpi=300, bbox_inches="tight")
        plt.close()
        np.save(str(f.with_suffix(".npy")), x[0].cpu().numpy())
    elapsed = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    return elapsed


def case_seed(repeats: int) -> None:
    times, sizes = [], []
    for _ in range(max(1, repeats)):
        with tempfile.TemporaryDirectory() as tmp:
            times.append(seed_baseline(Path(tmp)))
            sizes.append(dir_bytes(Path(tmp)))
    seed = statistics.median(times)
    r = predict_overhead(640, 1, 5)
    logged = r["flushed"]
    record("seed approach, 1 image", seed, bytes_per_image=int(statistics.median(sizes)))
    record("tbfeat, 1 image until flushed", logged, bytes_per_image=int(r["bytes_per_image"]))
    record("  seed / tbfeat", seed, seed / logged, target=">=80x")


def case_frcnn(repeats: int) -> None:
    import torchvision

    model = torchvision.models.get_model(
        "fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None
    ).eval()
    image = torch.rand(3, 800, 1066)
    with torch.no_grad():
        model([image])
    plain, logged, probe = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        logger = FeatureLogger(model, logdir=tmp, cam=None)  # maps: the ``cams`` case
        for i in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                model([image])
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with logger.at(i), torch.no_grad():  # the same inference, all stages hooked
                model([image])
            logged.append(time.perf_counter() - t0)  # leaving the block flushes
            t0 = time.perf_counter()
            logger.log([image], step=1000 + i)  # transform + backbone only
            logger.flush()
            probe.append(time.perf_counter() - t0)
        logger.close()
    p, q, r = statistics.median(plain), statistics.median(logged), statistics.median(probe)
    record("faster r-cnn r50-fpn 800 (plain)", p)
    record("  + FeatureLogger, until flushed", q, q / p, target="<=1.05x")
    record("  log() probe (backbone only)", r, r / p)


def case_vit(repeats: int) -> None:
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    image = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        model(image)
    plain, logged, probe = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        logger = FeatureLogger(model, logdir=tmp, cam=None)
        prober = FeatureLogger(model, logdir=Path(tmp) / "probe")  # LayerCAM of the top-1
        for i in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                model(image)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with logger.at(i), torch.no_grad():  # the 12 blocks hooked, as token maps
                model(image)
            logged.append(time.perf_counter() - t0)  # leaving the block flushes
            t0 = time.perf_counter()
            prober.log(image[0], step=i)
            prober.flush()
            probe.append(time.perf_counter() - t0)
        logger.close()
        prober.close()
    p, q, r = statistics.median(plain), statistics.median(logged), statistics.median(probe)
    record("timm vit-s/16 224 (plain)", p)
    record("  + FeatureLogger, until flushed", q, q / p)
    record("  log() probe with LayerCAM", r, r / p)


def cam_probe_times(model: Any, image: Any, repeats: int, topks: tuple[int, ...]) -> dict:
    """Median ``log()`` probe until flushed without maps and with them at each top-k,
    interleaved; the ratios are medians of adjacent pairs."""
    times: dict[Any, list[float]] = {None: [], **{k: [] for k in topks}}
    with tempfile.TemporaryDirectory() as tmp:
        loggers = {
            k: FeatureLogger(model, logdir=f"{tmp}/{k}", cam=None if k is None else "layercam",
                             cam_topk=k or 1)
            for k in times
        }  # fmt: skip
        for step in range(-1, repeats):  # step -1 warms every path
            for k, logger in loggers.items():
                t0 = time.perf_counter()
                logger.log(image, step=step)
                logger.flush()
                if step >= 0:
                    times[k].append(time.perf_counter() - t0)
        for logger in loggers.values():
            logger.close()
    base = times[None]
    return {
        "off": statistics.median(base),
        **{k: statistics.median(times[k]) for k in topks},
        **{
            f"ratio{k}": statistics.median(t / b for t, b in zip(times[k], base, strict=True))
            for k in topks
        },
    }


def case_cams(repeats: int) -> None:
    import torchvision
    from ultralytics import YOLO
    from ultralytics.utils import ASSETS

    r = cam_probe_times(YOLO("yolov8n.yaml"), ASSETS / "bus.jpg", repeats, (4, 16))
    record("yolov8n 640 log() probe, cam=None", r["off"])
    record("  + LayerCAM, cam_topk=4", r[4], r["ratio4"])
    record("  + LayerCAM, cam_topk=16", r[16], r["ratio16"])
    model = torchvision.models.get_model(
        "fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None
    ).eval()
    r = cam_probe_times(model, torch.rand(3, 800, 1066), max(3, repeats // 5), (4,))
    record("faster r-cnn 800 log() probe, cam=None", r["off"])
    record("  + LayerCAM, cam_topk=4", r[4], r["ratio4"])


MEMORY_CHILD = r"""
import gc, json, os, sys, tempfile, time
import torch
from torch import nn
from tbfeat import FeatureLogger

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

steps = int(sys.argv[1])
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2),
                      nn.ReLU())
x = torch.rand(2, 3, 96, 96)
with tempfile.TemporaryDirectory() as tmp:
    logger = FeatureLogger(model, logdir=tmp)
    logger.log(x, step=0)
    logger.flush()
    gc.collect()
    start, fds = rss_mb(), len(os.listdir("/proc/self/fd"))
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        logger.log(x, step=step)
    logger.flush()
    gc.collect()
    print(json.dumps({"grown": rss_mb() - start, "per_step": (time.perf_counter() - t0) / steps,
                      "fds": len(os.listdir("/proc/self/fd")) - fds}))
    logger.close()
"""


def case_memory(steps: int) -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(steps)], capture_output=True, text=True, check=True
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    record(
        f"memory: {steps} steps after the first",
        r["per_step"],
        rss_growth_mb=round(r["grown"], 1),
        open_files_growth=r["fds"],
        target="<50 MB",
    )


def case_stages(repeats: int) -> None:
    import torchvision

    model = torchvision.models.resnet50(weights=None).eval()
    names = [name for name, _ in model.named_modules() if name]  # every module, qualified
    x = torch.rand(1, 3, 224, 224)
    plain, probe, block = [], [], []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        logger = FeatureLogger(model, logdir=tmp, stages=names)
        logger.log(x, step=0)  # warm the logging path
        logger.flush()
        base = event_bytes(tmp)
        for i in range(repeats):
            t0 = time.perf_counter()
            model(x)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            logger.log(x, step=2 * i + 1)
            logger.flush()
            probe.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with logger.at(2 * i + 2):
                model(x)
            block.append(time.perf_counter() - t0)  # leaving the block flushes
        per_step = (event_bytes(tmp) - base) / (2 * repeats)
        history = dir_bytes(tmp) - event_bytes(tmp)  # rewritten whole at every step
        stages = len(logger.stages)
        logger.close()
    p = statistics.median(plain)
    record(f"resnet50 224, {stages} stages (plain)", p)
    record(
        "  log() until flushed",
        statistics.median(probe),
        statistics.median(q / r for q, r in zip(probe, plain, strict=True)),
        event_bytes_per_step=int(per_step),
        history_bytes=history,
    )
    record(
        "  with block until flushed",
        statistics.median(block),
        statistics.median(q / r for q, r in zip(block, plain, strict=True)),
    )


def case_scale(repeats: int) -> None:
    for imgsz in (320, 640, 1280):
        r = predict_overhead(imgsz, 1, repeats)
        record(
            f"scale: {imgsz} px, 1 image, flushed",
            r["flushed"],
            r["flushed_ratio"],
            returned_ratio=round(r["returned_ratio"], 3),
        )
    for n in (4, 16):
        r = predict_overhead(640, n, max(3, repeats // 2))
        record(
            f"scale: 640 px, {n} images, flushed",
            r["flushed"],
            r["flushed_ratio"],
            returned_ratio=round(r["returned_ratio"], 3),
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cases",
        nargs="+",
        default=["yolo", "seed", "frcnn", "memory", "scale", "stages", "cams", "vit"],
        choices=["yolo", "seed", "frcnn", "memory", "scale", "stages", "cams", "vit"],
    )
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="one short case (CI smoke)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    if args.quick:
        r = predict_overhead(320, 1, 3)
        record(
            "quick: yolov8n 320, flushed",
            r["flushed"],
            r["flushed_ratio"],
            bytes_per_image=int(r["bytes_per_image"]),
        )
    else:
        runners = {
            "yolo": lambda: case_yolo(args.repeats),
            "seed": lambda: case_seed(1),
            "frcnn": lambda: case_frcnn(max(3, args.repeats // 3)),
            "memory": lambda: case_memory(500),
            "scale": lambda: case_scale(args.repeats),
            "stages": lambda: case_stages(max(3, args.repeats // 3)),
            "cams": lambda: case_cams(max(3, args.repeats // 3)),
            "vit": lambda: case_vit(args.repeats),
        }
        for case in args.cases:
            runners[case]()
    if args.json:
        meta = {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": ROWS}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
