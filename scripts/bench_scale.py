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
  image, as ``tbfeat export`` did before the reader (slow: minutes per GB);
- ``board`` (``--board N``): the server ``tbfeat board`` starts, keeping ``N`` image steps
  per tag (``--samples_per_plugin images=N``): its resident memory, children included,
  once it has loaded the last step.

``--case probe`` measures instead what a real probe writes: yolov8n at 640 px with maps on,
4 probe images, a few steps: bytes per image and step by tag kind, the 300-epoch
projection, and what ``cam/`` would cost as 256 px RGB overlays or, as before, full-size
ones.

    python scripts/bench_scale.py                      # 300 steps x 8 images x 22 stages
    python scripts/bench_scale.py --steps 30 --tensorboard
    python scripts/bench_scale.py --logdir /data/big --keep   # write once, measure again
    python scripts/bench_scale.py --steps 300 --images 4 --size 256 --board 100
    python scripts/bench_scale.py --case probe
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
    maps = [sink.encode_image("x", rng.integers(0, 254, (40, 40), dtype=np.uint8))
            for _ in range(VARIANTS)]  # fmt: skip
    bases = [f"{i:02d}_Conv2d" for i in range(stages)]
    n = 0
    for step in range(1, steps + 1):
        bundle = StepBundle(step=step)
        if step == 1:  # each probe image once, as tbfeat writes it, and the run's layout
            for k in range(images):
                rgb = rng.integers(0, 256, (4 * size, 4 * size, 3), dtype=np.uint8)
                bundle.images.append(sink.encode_rgb(tags.input(f"img{k}"), rgb))
            bundle.run = run_info(bases, images, size)
        else:
            bundle.scalars += [(tags.drift(b, vs), rng.random()) for b in bases for vs in (0, 1)]
        for base in bases:
            for k in range(images):
                for build, variants in ((tags.features, encoded), (tags.cam, maps)):
                    value = type(variants[0])()
                    value.CopyFrom(variants[n % VARIANTS])
                    value.tag = build(base, f"img{k}")
                    bundle.images.append(value)
                    n += 1
            bundle.scalars.append((tags.stats(base, "mean"), step / 10))
        if not sink.write(bundle):
            raise SystemExit(f"could not write step {step} to {logdir}")
    sink.close()


def run_info(bases: list[str], images: int, size: int):
    """The synthetic run's metadata: each grid 3 tiles wide, of 9 channels."""
    from tbfeat import tags

    tile = (size - 2) // 3
    grid = tags.Grid(tuple(range(9)), 3, (tile, tile))
    names = tuple((f"img{k}", (9, tile, tile)) for k in range(images))
    return tags.RunInfo(tuple(tags.Output(b, "Conv2d", "Conv2d", f"model.{i}", (9, tile, tile),
                                          names, grid) for i, b in enumerate(bases)))  # fmt: skip


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


def board_memory(logdir: Path, steps: int, images: int, samples: int) -> dict:
    """Start ``tbfeat board``'s server keeping ``samples`` image steps per tag; wait until
    the last step of the last tag is served; its resident memory, children included."""
    import socket
    import urllib.parse
    import urllib.request

    from tbfeat.cli import board_command

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = board_command(logdir, port, samples)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start, last = time.perf_counter(), f"features/00_Conv2d/img{images - 1}"
    query = urllib.parse.urlencode({"run": ".", "tag": last})
    url = f"http://127.0.0.1:{port}/data/plugin/images/images?{query}"
    try:
        while time.perf_counter() - start < 3600:
            time.sleep(5)
            try:
                with urllib.request.urlopen(url, timeout=30) as r:
                    served = json.loads(r.read())
            except OSError:
                continue
            if served and served[-1]["step"] == steps:
                break
        loaded = time.perf_counter() - start
        time.sleep(10)  # the reload finishes its other tags
        return {"case": f"board {samples}", "seconds": loaded,
                "peak MiB": tree_rss_mib(proc.pid), "steps kept": len(served)}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (Linux ``/proc``), in MiB."""
    pids, total = [pid], 0
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,rss="], capture_output=True, text=True)
    rows = [tuple(map(int, line.split())) for line in out.stdout.splitlines() if line.strip()]
    while pids:
        p = pids.pop()
        total += sum(rss for q, _, rss in rows if q == p)
        pids += [q for q, parent, _ in rows if parent == p]
    return total / 1024


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
    p.add_argument("--board", type=int, metavar="N", help="also measure tbfeat board's server")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--case", choices=["read", "probe", "sweep"], default="read",
                   help="read a big logdir back (default), measure a real probe's bytes, "
                   "or time a sweep's workers")  # fmt: skip
    p.add_argument("--checkpoints", type=int, default=6, help="sweep: checkpoints")
    p.add_argument("--workers", type=int, default=2, help="sweep: worker processes")
    p.add_argument("--rounds", type=int, default=3, help="sweep: interleaved rounds")
    p.add_argument("--imgsz", type=int, default=320, help="sweep: min_size/max_size")
    args = p.parse_args()
    if args.case == "sweep":
        bench_sweep(args.checkpoints, args.workers, args.rounds, args.imgsz)
        return
    if args.case == "probe":
        probe_bytes()
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
        if args.board is not None:
            rows.append(board_memory(logdir, args.steps, args.images, args.board))
        print(table(rows, f"{args.steps} steps x {args.images} images x {args.stages} stages "
                          f"x 2 grids of {args.size} px: {size / 2**20:.0f} MiB, "
                          f"written in {wrote:.1f} s"))  # fmt: skip
    finally:
        if not args.keep and args.logdir is None:
            shutil.rmtree(logdir, ignore_errors=True)


PROBE_STEPS = 3


def probe_bytes() -> None:
    """Bytes a yolov8n probe at 640 px writes per image and step, with maps on."""
    from PIL import Image, ImageOps
    from ultralytics import YOLO
    from ultralytics.utils import ASSETS

    from tbfeat import FeatureLogger

    photos = [Image.open(ASSETS / name).convert("RGB") for name in ("bus.jpg", "zidane.jpg")]
    probes = [*photos, *(ImageOps.mirror(p) for p in photos)]
    with tempfile.TemporaryDirectory() as tmp:
        logger = FeatureLogger(YOLO("yolov8n.yaml"), logdir=tmp, imgsz=640)
        for step in range(1, PROBE_STEPS + 1):
            logger.log(probes, step=step, names=["bus", "zidane", "bus_flip", "zidane_flip"])
        overlays = overlay_bytes(logger, probes)
        logger.close()
        kinds, once, total = logged_bytes(Path(tmp))
    n, mib = len(probes), 2**20
    print(f"yolov8n 640 px, {n} probe images, maps on: bytes per image and step")
    for kind, nbytes in sorted(kinds.items()):
        print(f"  {kind:<12} {nbytes / n / mib:8.3f} MiB")
    step = total / PROBE_STEPS / n
    print(f"  {'all':<12} {step / mib:8.3f} MiB  (input/, once per run: {once / n / mib:.3f} MiB)")
    print(f"300 epochs x {n} images: {(300 * step * n + once) / 2**30:.2f} GiB")
    for what, nbytes in overlays.items():
        print(f"cam/ as {what} RGB overlays instead: {nbytes / n / mib:.3f} MiB per image-step")


def logged_bytes(logdir: Path) -> tuple[dict[str, float], int, int]:
    """Per tag kind, the mean bytes per step; the ``input/`` bytes; the event files' size
    after the first step's ``input/`` pictures (the rest of the run)."""
    from tbfeat.reader import Reader

    reader = Reader(logdir)
    sums: dict[str, int] = {}
    once = 0
    for tag, info in reader.tags(".").items():
        if info.kind != "image":
            continue
        nbytes = sum(len(reader.image(".", tag, s)) for s in info.steps)
        kind = tag.partition("/")[0]
        if kind == "input":
            once += nbytes
        else:
            sums[kind] = sums.get(kind, 0) + nbytes
    size = sum(f.stat().st_size for f in logdir.glob("events.out.tfevents.*"))
    return {k: v / PROBE_STEPS for k, v in sums.items()}, once, size - once


def overlay_bytes(logger, probes) -> dict[str, float]:
    """What the maps of one probe step would cost as RGB overlays: at most 256 px on the
    long side, and at the input's full size (as tbfeat wrote them before)."""
    import torch.nn.functional as F

    from tbfeat.cams import compute_cams
    from tbfeat.pictures import CAM_CMAP, encode_rgb_png
    from tbfeat.render import cam_overlay

    adapter = logger.adapter
    prepared = adapter.prepare(probes, [str(i) for i in range(len(probes))], imgsz=640,
                               preprocess=None)  # fmt: skip
    target = logger.options.cam_target_spec()
    result = compute_cams(adapter, prepared.inputs, logger.stages, "layercam", target)
    out = {"256 px": 0.0, "full-size": 0.0}
    for i, seen in enumerate(result.seen):
        h, w = seen.shape[-2:]
        scale = 256 / max(h, w)
        small = F.interpolate(seen[None], size=(round(h * scale), round(w * scale)),
                              mode="bilinear", antialias=True)[0].clamp(0, 1)  # fmt: skip
        for maps in result.maps.values():
            out["256 px"] += len(encode_rgb_png(cam_overlay(small, maps[i], CAM_CMAP)))
            out["full-size"] += len(encode_rgb_png(cam_overlay(seen, maps[i], CAM_CMAP)))
    return out


if __name__ == "__main__":
    main()
