"""The ``tbfeat`` command: ``sweep``, ``demo``, ``board`` and ``stages``.

Errors the user can fix (a missing file, a corrupt checkpoint, an unknown architecture or
stage) print one line on stderr and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ALL_STEPS = 100_000
"""``--samples_per_plugin images=`` value: TensorBoard keeps only 10 image steps per tag by
default (tensorboard#1575), and ``images=0`` shows none (tensorboard#5550)."""
MANIFEST = "tbfeat-sweep.json"


class UsageError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


# ------------------------------------------------------------------------- helpers
def collect_images(paths: list[str]) -> list[Path]:
    """Image files as given; folders expand to the image files in them (sorted)."""
    images: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {str(path)!r}")
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise UsageError(f"image not found: {str(path)!r}")
    from .images import load_image

    for image in images:  # fail before any checkpoint is loaded
        try:
            load_image(image)
        except (ValueError, OSError) as e:
            raise UsageError(f"{e}; pass readable image files") from None
    return images


def parse_stages(values: list[str] | None) -> list[int | str] | None:
    if not values:
        return None
    return [int(v) if v.lstrip("-").isdigit() else v for v in values]


def load_model(path_or_name: str, arch: str | None, imgsz: int | None) -> tuple[Any, int | None]:
    """A model from a checkpoint file, an Ultralytics yaml or a torchvision builder name,
    and the checkpoint's 1-based epoch (``None`` when it stores none)."""
    from .checkpoints import kind_of, load_state_dict_model, load_ultralytics

    path = Path(path_or_name)
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
        if kind_of(path) == "ultralytics":
            return load_ultralytics(path)
        return load_state_dict_model(path, arch, **detector_size(arch, imgsz))
    if path_or_name.endswith((".yaml", ".yml")):
        from ultralytics import RTDETR, YOLO

        try:
            cls = RTDETR if "rtdetr" in path.name else YOLO
            return cls(path_or_name), None
        except Exception as e:
            raise UsageError(f"cannot build {path_or_name!r}: {e}") from None
    import torchvision

    if path_or_name in torchvision.models.list_models():
        from .integrations.torchvision import build

        kwargs = {"weights_backbone": None, **detector_size(path_or_name, imgsz)}
        return build(path_or_name, **kwargs), None
    if not path.exists() and path.suffix:
        raise UsageError(f"checkpoint not found: {path_or_name!r}")
    raise UsageError(
        f"unknown model {path_or_name!r}: give a checkpoint file, an Ultralytics yaml "
        "(yolov8n.yaml) or a torchvision builder name (fasterrcnn_resnet50_fpn)"
    )


def detector_size(arch: str | None, imgsz: int | None) -> dict[str, int]:
    """``min_size``/``max_size`` for torchvision detection builders when ``--imgsz`` is set."""
    if not arch or not imgsz:
        return {}
    import inspect

    import torchvision

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        return {}
    module = inspect.getmodule(builder)
    if module is not None and module.__name__.startswith("torchvision.models.detection"):
        return {"min_size": imgsz, "max_size": imgsz}
    return {}


# ------------------------------------------------------------------------- sweep
def read_epoch_step(path: Path, kind: str) -> int | None:
    """The 1-based epoch a checkpoint stores (Ultralytics and torchvision store 0-based,
    -1 once stripped), read with a memory-mapped load."""
    import argparse as _argparse

    import torch

    try:
        if kind == "state_dict":
            with torch.serialization.safe_globals([_argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        else:
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise UsageError(
            f"cannot read checkpoint {str(path)!r} (corrupt or truncated?): "
            f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        ) from None
    epoch = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    return int(epoch) + 1 if isinstance(epoch, int) and epoch >= 0 else None


def plan_sweep(paths: list[Path]) -> list[tuple[int, Path, str]]:
    """``(step, path, kind)`` in step order: the stored epoch (1-based), else the number
    in the file name, else the order given (after the others)."""
    from .checkpoints import kind_of, step_from_name

    planned: list[tuple[int | None, Path, str]] = []
    for path in paths:
        try:
            kind = kind_of(path)
            step = read_epoch_step(path, kind)
        except (UsageError, ValueError):  # unreadable: it fails in its turn, after the others
            kind, step = "unreadable", None
        if step is None:
            step = step_from_name(path)
        planned.append((step, path, kind))
    known = [s for s, _, _ in planned if s is not None]
    next_step = max(known, default=0) + 1
    result = []
    for step, path, kind in planned:
        if step is None:
            step, next_step = next_step, next_step + 1
        result.append((step, path, kind))
    result.sort(key=lambda item: item[0])
    seen: dict[int, Path] = {}
    unique = []
    for step, path, kind in result:
        if step in seen:
            print(
                f"tbfeat: {path} is also step {step} (as {seen[step]}); logging the first",
                file=sys.stderr,
            )
            continue
        seen[step] = path
        unique.append((step, path, kind))
    return unique


def read_manifest(logdir: Path) -> dict[str, Any]:
    path = logdir / MANIFEST
    if not path.is_file():
        return {"version": 1, "steps": {}}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise UsageError(
            f"{str(path)!r} is unreadable; delete it or use --overwrite to start over"
        ) from None


def write_manifest(logdir: Path, manifest: dict[str, Any]) -> None:
    tmp = logdir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, logdir / MANIFEST)


def cmd_sweep(args: argparse.Namespace) -> int:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from .checkpoints import (
        CheckpointError,
        find_checkpoints,
        kind_of,
        load_state_dict_model,
        load_ultralytics,
    )
    from .logger import FeatureLogger
    from .options import LogOptions

    images = collect_images(args.images)
    options = LogOptions(max_channels=args.max_channels, max_images=len(images), imgsz=args.imgsz)
    stages = parse_stages(args.stages)
    plan = plan_sweep(find_checkpoints(args.checkpoints))
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(logdir)
    if args.overwrite:
        for name in manifest.get("event_files", []):
            (logdir / name).unlink(missing_ok=True)
        manifest = {"version": 1, "steps": {}}
    todo = [item for item in plan if str(item[0]) not in manifest["steps"]]
    for step, path, _ in plan:
        if str(step) in manifest["steps"]:
            print(
                f"tbfeat: step {step} ({path.name}) is already in {logdir}; skipped "
                "(--overwrite to redo)",
                file=sys.stderr,
            )
    if not todo:
        print(f"nothing to do: every step is already in {logdir}")
        return 0
    before = set(logdir.glob("events.out.tfevents.*"))
    writer = SummaryWriter(log_dir=str(logdir))  # opens this sweep's own event file
    manifest.setdefault("event_files", [])
    manifest["event_files"] += sorted(
        p.name for p in set(logdir.glob("events.out.tfevents.*")) - before
    )
    bar = tqdm(total=len(todo) * len(images), unit="img", desc="sweep", file=sys.stderr)
    try:
        for step, path, kind in todo:
            bar.set_postfix_str(f"step {step}: {path.name}")
            if kind == "unreadable":
                kind = kind_of(path)  # raises the reason
                read_epoch_step(path, kind)
            if kind == "ultralytics":
                model, _ = load_ultralytics(path)
            else:
                model, _ = load_state_dict_model(
                    path, args.arch, **detector_size(args.arch, args.imgsz)
                )
            logger = FeatureLogger(model, writer=writer, stages=stages, options=options)
            try:
                logger.log(list(images), step=step)
            finally:
                logger.close()  # waits until the step is on disk
            manifest["steps"][str(step)] = {"checkpoint": str(path.resolve()), "time": time.time()}
            write_manifest(logdir, manifest)
            bar.update(len(images))
    except (CheckpointError, UsageError) as e:
        raise UsageError(f"{e} (steps logged before it are kept in {logdir})") from None
    finally:
        bar.close()
        writer.close()
        write_manifest(logdir, manifest)
    print(f"logged steps {', '.join(str(s) for s, _, _ in todo)} to {logdir}")
    print(f"open: tbfeat board {logdir}")
    return 0


# ------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from ultralytics import YOLO
        from ultralytics.utils import ASSETS, LOGGER
    except ImportError:
        raise UsageError("the demo needs Ultralytics: pip install 'tbfeat[ultralytics]'") from None
    from .logger import FeatureLogger
    from .synthetic import make_shapes_dataset

    root = Path(args.dir).resolve()
    t0 = time.perf_counter()
    data = make_shapes_dataset(
        root / "data", n_train=args.train_images, n_val=8, imgsz=args.imgsz, seed=0
    )
    print(f"[demo] synthetic data set: {args.train_images} train / 8 val images in {data.parent}")
    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)  # Ultralytics' own report would bury ours
    yolo = YOLO("yolov8n.yaml")
    train_args = dict(
        data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=16, workers=0,
        device="cpu", project=str(root), name="train", exist_ok=True, save_period=1,
        plots=False, verbose=False, amp=False, seed=0,
    )  # fmt: skip
    try:
        with FeatureLogger(yolo, max_images=4, max_channels=16) as logger:
            yolo.add_callback("on_fit_epoch_end", lambda trainer: _log_metrics(logger, trainer))
            yolo.train(**train_args)
    finally:
        LOGGER.setLevel(level)
    train_dir = Path(yolo.trainer.save_dir)
    print(
        f"[demo] trained {args.epochs} epochs; feature maps of 4 validation images "
        f"logged every epoch into {train_dir}"
    )
    probes = [str(Path(ASSETS) / "bus.jpg"), str(Path(ASSETS) / "zidane.jpg")]
    sweep_args = argparse.Namespace(
        checkpoints=[str(train_dir / "weights")],
        images=probes,
        logdir=str(root / "sweep"),
        imgsz=args.imgsz,
        arch=None,
        stages=None,
        max_channels=16,
        overwrite=True,
    )
    cmd_sweep(sweep_args)
    elapsed = time.perf_counter() - t0
    print(
        f"[demo] done in {elapsed:.0f}s. Compare epochs in TensorBoard (Images tab, step slider):"
    )
    print(f"  tensorboard --logdir {root} --samples_per_plugin images={ALL_STEPS}")
    print(f"  (or: tbfeat board {root})")
    if args.serve:
        return run_board(root, args.port)
    return 0


def _log_metrics(logger: Any, trainer: Any) -> None:
    """Ultralytics' loss and mAP as scalars in the same run, at the 1-based epoch."""
    epoch = trainer.epoch + 1
    if epoch > trainer.epochs:  # final_eval of best.pt reuses this callback
        return
    values = {**trainer.label_loss_items(trainer.tloss, prefix="train"), **trainer.metrics}
    for key, value in values.items():
        logger.writer.add_scalar(key, float(value), epoch)
    print(
        f"[demo] epoch {epoch}/{trainer.epochs}: box_loss {values.get('train/box_loss', 0):.3f}"
        f", mAP50 {values.get('metrics/mAP50(B)', 0):.3f}",
        flush=True,
    )


# ------------------------------------------------------------------------- board
def board_command(logdir: str | Path, port: int) -> list[str]:
    """The TensorBoard command ``tbfeat board`` runs: localhost only, every image step kept."""
    return [
        sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
        "--host", "127.0.0.1", "--port", str(port),
        "--samples_per_plugin", f"images={ALL_STEPS}",
    ]  # fmt: skip


def run_board(logdir: Path, port: int) -> int:
    cmd = board_command(logdir, port)
    print(f"TensorBoard at http://127.0.0.1:{port}/ (Ctrl-C stops it)", flush=True)
    sys.stderr.flush()
    # Become TensorBoard: signals (Ctrl-C, a terminate) reach it directly, no orphan left.
    os.execv(sys.executable, cmd)
    return 0  # not reached


def cmd_board(args: argparse.Namespace) -> int:
    logdir = Path(args.logdir)
    if not logdir.is_dir():
        raise UsageError(f"logdir not found: {str(logdir)!r}")
    return run_board(logdir, args.port)


# ------------------------------------------------------------------------- stages
def cmd_stages(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .logger import FeatureLogger

    model, _ = load_model(args.model, args.arch, args.imgsz)
    logger = FeatureLogger(model, imgsz=args.imgsz, stages=parse_stages(args.stages))
    adapter = logger.adapter
    stages = adapter.candidate_stages()
    default = {(s.name, s.output) for s in adapter.default_stages()}
    chosen = logger.stages if args.stages else None
    shapes: dict[tuple[str, Any], str] = {}

    def record(stage):
        def hook(module, inputs, output):
            if stage.output is not None:
                output = output[stage.output]
            shapes.setdefault((stage.name, stage.output), _shape(output))

        return hook

    handles = [s.module.register_forward_hook(record(s)) for s in stages]
    size = args.imgsz or 640
    probe = np.full((size, size, 3), 114, dtype=np.uint8)
    training = [m for m in adapter.module.modules() if m.training]
    try:
        for m in training:
            m.training = False
        prepared, _ = adapter.prepare([probe], None)
        with torch.no_grad():
            adapter.forward(prepared)
    finally:
        for h in handles:
            h.remove()
        for m in training:
            m.training = True
    rows = [("", "index", "tag key", "name", "type", "output shape")]
    for s in stages:
        mark = "*" if (s.name, s.output) in default else ""
        rows.append(
            (
                mark,
                str(s.index),
                s.key,
                s.name + (f":{s.output}" if s.output else ""),
                s.type,
                shapes.get((s.name, s.output), "-"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"* logged by default; probe input {size}x{size}")
    if chosen is not None:
        print("--stages selects: " + ", ".join(s.key for s in chosen))
    return 0


def _shape(output: Any) -> str:
    import torch

    if isinstance(output, torch.Tensor):
        return "x".join(str(d) for d in output.shape)
    if isinstance(output, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in output.items()) + "}"
    if isinstance(output, (list, tuple)):
        return "[" + ", ".join(_shape(v) for v in output) + "]"
    return type(output).__name__


# ------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbfeat", description="See what a vision model sees, stage by stage, in TensorBoard."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sweep", help="log probe images through saved checkpoints, one step each")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT_OR_DIR")
    p.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="PATH",
        help="probe images or folders of images",
    )
    p.add_argument("--logdir", required=True, help="TensorBoard run folder for the sweep")
    p.add_argument(
        "--imgsz",
        type=int,
        default=None,
        help="Ultralytics letterbox size / torchvision detector min_size+max_size",
    )
    p.add_argument(
        "--arch",
        default=None,
        help="torchvision builder for state-dict checkpoints (fasterrcnn_resnet50_fpn)",
    )
    p.add_argument("--stages", nargs="+", default=None, help="indices, names or types")
    p.add_argument("--max-channels", type=int, default=32)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start the sweep's run over instead of skipping logged steps",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="train YOLOv8n on synthetic shapes and compare epochs")
    p.add_argument("--dir", default="runs/tbfeat-demo")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--serve", action="store_true", help="start TensorBoard afterwards")
    p.add_argument("--port", type=int, default=6006)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("board", help="start TensorBoard showing every logged step")
    p.add_argument("logdir")
    p.add_argument("--port", type=int, default=6006)
    p.set_defaults(func=cmd_board)

    p = sub.add_parser("stages", help="print the stage table that --stages selects from")
    p.add_argument(
        "model",
        metavar="MODEL_OR_CHECKPOINT",
        help="checkpoint, Ultralytics yaml (yolov8n.yaml) or torchvision builder",
    )
    p.add_argument("--arch", default=None, help="torchvision builder for a state-dict checkpoint")
    p.add_argument("--imgsz", type=int, default=None, help="probe input size (default 640)")
    p.add_argument("--stages", nargs="+", default=None, help="show what these select")
    p.set_defaults(func=cmd_stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("imgsz", "max_channels", "epochs", "train_images", "port"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    try:
        return args.func(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, OSError) as e:
        if args.debug:
            raise
        message = str(e) if str(e) else type(e).__name__
        print(f"tbfeat: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
