"""What reading a big logdir back costs: tbfeat's reader and ``tbfeat export``.

Writes a synthetic logdir with tbfeat's own writer (``EventSink`` + ``StepBundle``, tags
from ``tbfeat.tags``): per step, one ``features/`` and one ``cam/`` grid per stage and
image, and a ``stats/`` scalar per stage, every grid a different PNG of noise. Then
measures, each in a fresh process (peak resident memory is the process's own,
``ru_maxrss``):

- ``imports``: the modules the others load, and nothing else (a baseline);
- ``index``: :class:`tbfeat.reader.Reader` indexing every event file, the first time;
- ``re-index``: the same reader refreshed again, nothing changed (the kept index);
- ``export``: ``tbfeat export`` of one stage at three steps (first, middle, last);
- ``tensorboard`` (``--tensorboard``): TensorBoard's ``EventAccumulator`` loading every
  image, as ``tbfeat export`` did before the reader (slow: minutes per GB).

    python scripts/bench_scale.py                      # 300 steps x 8 images x 22 stages
    python scripts/bench_scale.py --steps 30 --tensorboard
    python scripts/bench_scale.py --logdir /data/big --keep   # write once, measure again
    python scripts/bench_scale.py --case sweep --checkpoints 6 --workers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = 64
"""Distinct noise grids encoded once and reused under every tag (writing stays fast)."""


def write_logdir(logdir: Path, steps: int, images: int, stages: int, size: int) -> None:
    """The synthetic run: ``steps`` events of ``2 * images * stages`` PNGs each."""
    from tbfeat import tags
    from tbfeat.writer import EventSink, StepBundle

    sink = EventSink(logdir)
    rng = np.random.default_rng(0)
    encoded = [
        sink.encode_image("x", rng.integers(0, 256, (size, size), dtype=np.uint8))
        for _ in range(VARIANTS)
    ]
    bases = [f"{i:02d}_Conv2d" for i in range(stages)]
    n = 0
    for step in range(1, steps + 1):
        bundle = StepBundle(step=step)
        for base in bases:
            for k in range(images):
                for build in (tags.features, tags.cam):
                    value = type(encoded[0])()
                    value.CopyFrom(encoded[n % VARIANTS])
                    value.tag = build(base, f"img{k}")
                    bundle.images.append(value)
                    n += 1
            bundle.scalars.append((tags.stats(base, "mean"), step / 10))
        if not sink.write(bundle):
            raise SystemExit(f"could not write step {step} to {logdir}")
    sink.close()


def measure(what: str, logdir: str, steps: int) -> dict:
    """One measurement, in this (fresh) process."""
    from tbfeat.export import export
    from tbfeat.reader import Reader

    row: dict = {"case": what}
    start = time.perf_counter()
    if what in ("index", "re-index"):
        reader = Reader(logdir)
        reader.refresh()
        row["seconds"] = time.perf_counter() - start
        if what == "re-index":
            before = reader.bytes_read
            start = time.perf_counter()
            reader.refresh()
            row["seconds"] = time.perf_counter() - start
            row["bytes read"] = reader.bytes_read - before
        else:
            row["bytes read"] = reader.bytes_read
            run = reader.runs()[0]
            row["values"] = sum(len(t.steps) for t in reader.tags(run).values())
    elif what == "export":
        out = tempfile.mkdtemp(prefix="tbfeat-bench-export-")
        chosen = sorted({1, (steps + 1) // 2, steps})
        files = export(logdir, out, stages=["00_Conv2d"], steps=chosen)
        row["seconds"] = time.perf_counter() - start
        row["files"] = len(files)
        shutil.rmtree(out)
    elif what == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(logdir, size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        row["seconds"] = time.perf_counter() - start
        row["values"] = sum(len(acc.Images(t)) for t in acc.Tags()["images"])
    else:  # the modules the cases load
        from tensorboard.compat.proto import event_pb2  # noqa: F401

        row["seconds"] = 0.0
    row["peak MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def child(what: str, logdir: Path, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", what, "--logdir", str(logdir),
           "--steps", str(steps)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], header: str) -> str:
    lines = [header, f"{'case':<12} {'seconds':>9} {'peak MiB':>9}  notes"]
    for row in rows:
        notes = ", ".join(f"{k} {v}" for k, v in row.items()
                          if k not in ("case", "seconds", "peak MiB"))  # fmt: skip
        lines.append(f"{row['case']:<12} {row['seconds']:>9.3f} {row['peak MiB']:>9.0f}  {notes}")
    return "\n".join(lines)


SWEEP_ARCH = "fasterrcnn_mobilenet_v3_large_fpn"


def save_checkpoints(folder: Path, n: int) -> list[Path]:
    """``n`` state dicts of :data:`SWEEP_ARCH` (no download), each its own weights."""
    import torch

    from tbfeat.integrations.torchvision import build

    torch.manual_seed(0)
    model = build(SWEEP_ARCH, weights_backbone=None, num_classes=3)
    paths = []
    for epoch in range(n):
        with torch.no_grad():
            for p in model.backbone.parameters():
                p.mul_(1.1)
        paths.append(folder / f"model_{epoch}.pth")
        torch.save({"model": model.state_dict(), "epoch": epoch}, paths[-1])
    return paths


def probe_image(folder: Path) -> Path:
    """Ultralytics' bus.jpg when installed, else a picture of noise."""
    try:
        from ultralytics.utils import ASSETS

        if (Path(ASSETS) / "bus.jpg").is_file():
            return Path(ASSETS) / "bus.jpg"
    except ImportError:
        pass
    from PIL import Image

    path = folder / "probe.png"
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    return path


def bench_sweep(checkpoints: int, workers: int, rounds: int, imgsz: int) -> None:
    """Serial against ``workers`` processes, interleaved; medians and the speed-up."""
    import statistics

    import tbfeat

    folder = Path(tempfile.mkdtemp(prefix="tbfeat-bench-sweep-"))
    try:
        paths = save_checkpoints(folder, checkpoints)
        image = probe_image(folder)
        times: dict[int, list[float]] = {1: [], workers: []}
        for r in range(rounds):
            for w in (1, workers):
                start = time.perf_counter()
                tbfeat.sweep(paths, images=[image], logdir=folder / f"run{w}", arch=SWEEP_ARCH,
                             imgsz=imgsz, overwrite=True, workers=w)  # fmt: skip
                times[w].append(time.perf_counter() - start)
                print(f"round {r + 1}: workers={w}: {times[w][-1]:.1f} s", flush=True)
        serial, parallel = statistics.median(times[1]), statistics.median(times[workers])
        print(f"{checkpoints} checkpoints of {SWEEP_ARCH} at {imgsz} px, maps on, "
              f"{os.cpu_count()} CPUs: serial {serial:.1f} s ({serial / checkpoints:.1f} s each), "
              f"workers={workers} {parallel:.1f} s ({parallel / checkpoints:.1f} s each): "
              f"{serial / parallel:.2f}x (medians of {rounds})")  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--stages", type=int, default=22)
    p.add_argument("--size", type=int, default=96, help="grid side in pixels")
    p.add_argument("--logdir", type=Path, help="reuse (or write) this logdir")
    p.add_argument("--keep", action="store_true", help="keep the logdir written")
    p.add_argument("--tensorboard", action="store_true", help="also time EventAccumulator")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--case", choices=["read", "sweep"], default="read",
                   help="read a big logdir back (default), or time a sweep's workers")  # fmt: skip
    p.add_argument("--checkpoints", type=int, default=6, help="sweep: checkpoints")
    p.add_argument("--workers", type=int, default=2, help="sweep: worker processes")
    p.add_argument("--rounds", type=int, default=3, help="sweep: interleaved rounds")
    p.add_argument("--imgsz", type=int, default=320, help="sweep: min_size/max_size")
    args = p.parse_args()
    if args.case == "sweep":
        bench_sweep(args.checkpoints, args.workers, args.rounds, args.imgsz)
        return
    for name in ("steps", "images", "stages", "size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.measure:
        print(json.dumps(measure(args.measure, str(args.logdir), args.steps)))
        return
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="tbfeat-bench-scale-"))
    try:
        start = time.perf_counter()
        if not any(logdir.glob("events.out.tfevents.*")):
            write_logdir(logdir, args.steps, args.images, args.stages, args.size)
        wrote = time.perf_counter() - start
        size = sum(f.stat().st_size for f in logdir.glob("events.out.tfevents.*"))
        cases = ["imports", "index", "re-index", "export"]
        rows = [child(c, logdir, args.steps) for c in cases + ["tensorboard"] * args.tensorboard]
        print(table(rows, f"{args.steps} steps x {args.images} images x {args.stages} stages "
                          f"x 2 grids of {args.size} px: {size / 2**20:.0f} MiB, "
                          f"written in {wrote:.1f} s"))  # fmt: skip
    finally:
        if not args.keep and args.logdir is None:
            shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    main()
