"""The ``tbfeat`` command: ``sweep``, ``demo``, ``board``, ``stages`` and ``export``.

Errors the user can fix (a missing file, a corrupt checkpoint, an unknown architecture or
stage) print one line on stderr and exit with status 2; ``--debug`` shows the traceback.
So does a checkpoint that needs globals off tbfeat's allow-list, before any of it runs:
``--trust-checkpoints`` (``sweep``, ``stages``) loads such files with full unpickling.
A sweep whose steps were not all written (a full disk) names them and exits with
status 1; running it again logs them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BOARD_IMAGE_SAMPLES = 100
"""Image steps per tag ``tbfeat board`` keeps in TensorBoard's memory by default
(``--samples_per_plugin images=``; its reservoir sample: the last step always, the others
drawn evenly). TensorBoard keeps only 10 by default (tensorboard#1575), ``images=0``
shows none (tensorboard#5550), and every step holds the whole logdir in memory; with 100
a 300-epoch training's server stays under 2 GiB (``scripts/bench_scale.py --board``).
Export and the reader see every step."""


class UsageError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


# ------------------------------------------------------------------------- helpers
def parse_stages(values: list[str] | None) -> list[int | str] | None:
    if not values:
        return None
    return [int(v) if v.lstrip("-").isdigit() else v for v in values]


# ------------------------------------------------------------------------- sweep
@contextlib.contextmanager
def above(bar: Any) -> Iterator[Callable[[str], None]]:
    """While a progress bar is shown, what is said goes on lines of its own above it
    (``tqdm.write``), never into the bar's line: the sweep's messages through the
    function yielded, Python warnings through ``warnings.showwarning``."""

    def say(message: str) -> None:
        bar.write(f"tbfeat: {message}", file=sys.stderr)

    def show(message: Any, category: type, filename: str, lineno: int, *_: Any) -> None:
        text = str(message)
        if not text.startswith("tbfeat: "):  # another library's: where it comes from
            text = warnings.formatwarning(message, category, filename, lineno).rstrip()
        bar.write(text, file=sys.stderr)

    shown, warnings.showwarning = warnings.showwarning, show
    try:
        yield say
    finally:
        warnings.showwarning = shown


def cmd_sweep(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .sweep import print_warning, sweep
    from .writer import global_rank

    bar = tqdm(unit="img", desc="sweep", file=sys.stderr)

    def on_step(planned: Any, images: int) -> None:
        bar.set_postfix_str(f"step {planned.step}: {planned.path.name}", refresh=False)
        bar.update(images)

    try:
        with above(bar) as say:
            result = sweep(
                args.checkpoints,
                images=args.images,
                logdir=args.logdir,
                arch=args.arch,
                model=args.model,
                stages=parse_stages(args.stages),
                imgsz=args.imgsz,
                max_images=args.max_images,
                overwrite=args.overwrite,
                trust=args.trust_checkpoints,
                workers=args.workers,
                on_step=on_step,
                warn=say,
                max_channels=args.max_channels,
            )
    finally:
        bar.close()
    if global_rank() != 0:
        return 0  # rank 0 says what the sweep did
    for step in result.skipped:
        print_warning(f"step {step} is already in {result.logdir}; skipped (--overwrite to redo)")
    if result.dropped:
        print_warning(f"steps {', '.join(map(str, result.dropped))} could not be written to "
                      f"{result.logdir} (see above); run the sweep again to log them")  # fmt: skip
    if not result.logged:
        if not result.dropped:
            print(f"nothing to do: every step is already in {result.logdir}")
        return 1 if result.dropped else 0
    print(f"logged steps {', '.join(map(str, result.logged))} to {result.logdir}")
    print(f"open: tbfeat board {shlex.quote(str(result.logdir))}")
    return 1 if result.dropped else 0


# ------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from ultralytics import YOLO
        from ultralytics.utils import ASSETS, LOGGER
    except ImportError:
        raise UsageError("the demo needs Ultralytics: pip install 'tbfeat[ultralytics]'") from None
    from .logger import FeatureLogger
    from .sweep import sweep
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
        with FeatureLogger(yolo, max_images=4, max_channels=16):
            yolo.add_callback("on_fit_epoch_end", _print_progress)
            yolo.train(**train_args)
    finally:
        LOGGER.setLevel(level)
    train_dir = Path(yolo.trainer.save_dir)
    print(
        f"[demo] trained {args.epochs} epochs; feature maps and class activation maps "
        f"(cam/...) of 4 validation images logged every epoch into {train_dir}"
    )
    probes = [Path(ASSETS) / "bus.jpg", Path(ASSETS) / "zidane.jpg"]
    result = sweep(
        [train_dir / "weights"], images=probes, logdir=root / "sweep", imgsz=args.imgsz,
        overwrite=True, max_channels=16,
    )  # fmt: skip
    print(
        f"[demo] swept checkpoints of epochs {', '.join(map(str, result.logged))} into "
        f"{result.logdir}"
    )
    elapsed = time.perf_counter() - t0
    print(
        f"[demo] done in {elapsed:.0f}s. Compare epochs in TensorBoard (Images tab, step slider):"
    )
    python = shlex.quote(sys.executable)  # runs without an activated environment
    print(f"  {python} -m tbfeat board {shlex.quote(str(root))}")
    print(f"  (or: {python} -m tensorboard.main --logdir {shlex.quote(str(root))} "
          f"--samples_per_plugin images={BOARD_IMAGE_SAMPLES})")  # fmt: skip
    if args.serve:
        return run_board(root, args.port)
    return 0


def _print_progress(trainer: Any) -> None:
    """One line per epoch (the integration writes the curves into the run)."""
    epoch = trainer.epoch + 1
    if epoch > trainer.epochs:  # final_eval of best.pt reuses this callback
        return
    values = {**trainer.label_loss_items(trainer.tloss, prefix="train"), **trainer.metrics}
    print(
        f"[demo] epoch {epoch}/{trainer.epochs}: box_loss {values.get('train/box_loss', 0):.3f}"
        f", mAP50 {values.get('metrics/mAP50(B)', 0):.3f}",
        flush=True,
    )


# ------------------------------------------------------------------------- board
def board_command(logdir: str | Path, port: int, samples: int = BOARD_IMAGE_SAMPLES) -> list[str]:
    """The TensorBoard command ``tbfeat board`` runs: localhost only, keeping ``samples``
    image steps per tag."""
    return [
        sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
        "--host", "127.0.0.1", "--port", str(port),
        "--samples_per_plugin", f"images={samples}",
    ]  # fmt: skip


BOARD_START = "#tbfeat"
"""Where ``tbfeat board`` opens: the tbfeat dashboard (:mod:`tbfeat.dashboard`)."""


def run_board(logdir: Path, port: int, samples: int = BOARD_IMAGE_SAMPLES) -> int:
    cmd = board_command(logdir, port, samples)
    print(
        f"TensorBoard at http://127.0.0.1:{port}/{BOARD_START} (Ctrl-C stops it): the tbfeat "
        "dashboard compares steps side by side; Custom Scalars charts every stage's drift",
        flush=True,
    )
    sys.stderr.flush()
    # Become TensorBoard: signals (Ctrl-C, a terminate) reach it directly, no orphan left.
    os.execv(sys.executable, cmd)
    return 0  # not reached


def cmd_board(args: argparse.Namespace) -> int:
    logdir = Path(args.logdir)
    if not logdir.is_dir():
        raise UsageError(f"logdir not found: {str(logdir)!r}")
    return run_board(logdir, args.port, args.image_samples)


# ------------------------------------------------------------------------- stages
def cmd_stages(args: argparse.Namespace) -> int:
    import numpy as np

    from .adapters import list_stages
    from .checkpoints import load_model
    from .logger import FeatureLogger

    if args.checkpoint is None and args.model is None:
        raise UsageError("give a model: a checkpoint, an Ultralytics yaml, a torchvision "
                         "builder name, or --model MODULE:FUNCTION")  # fmt: skip
    model = load_model(
        args.checkpoint, args.arch, args.imgsz, trust=args.trust_checkpoints, model=args.model
    )
    # the logger's own stage choice and probe: the stages and shapes it would log, with
    # the image processor a Hugging Face checkpoint folder holds, as a sweep of it has
    logger = FeatureLogger(
        model, stages=parse_stages(args.stages), preprocess=_folder_processor(args.checkpoint)
    )
    try:
        adapter = logger.adapter
        stages = list_stages(adapter)
        marked = logger.stages  # the default stages, or those --stages selects
        shown = stages + [s for s in marked if (s.name, s.output) not in _keys(stages)]
        size = args.imgsz or 640
        probes = logger.prepare([np.full((size, size, 3), 114, dtype=np.uint8)], imgsz=size)
        shapes: dict[tuple[str, Any], tuple[str, str]] = {}

        def record(stage: Any, output: Any) -> None:
            output = stage.select(output)
            mapped = _map_shape(output, stage.tokens) if stage.tokens is not None else "-"
            shapes.setdefault((stage.name, stage.output), (_shape(output), mapped))

        seen = _seen(adapter, probes, lambda: adapter.run_probe(probes, shown, record))
    finally:
        logger.close()
    tokens = any(s.tokens is not None for s in shown)
    _print_table(shown, marked, shapes, tokens)
    what = "selected by --stages" if args.stages else "logged by default"
    print(f"* {what}; probe image {size}x{size}, which the model sees as {seen}")
    if tokens:
        print("map shape: the (N, C, H, W) map tbfeat logs (the patch tokens of a token "
              "stage, a channels-last output permuted)")  # fmt: skip
    if args.imgsz and args.model and _own_transform(model):
        print(f"tbfeat: --imgsz {args.imgsz} is not used: {type(model).__name__}'s own "
              f"transform decides the size (it takes no min_size/max_size)",
              file=sys.stderr)  # fmt: skip
    return 0


def _folder_processor(checkpoint: str | None) -> Any:
    """The image processor saved in a Hugging Face checkpoint folder
    (``preprocessor_config.json``; :func:`tbfeat.hf_checkpoints.image_processor`), else
    ``None``: it resizes the probe to the size the model takes."""
    from . import hf_checkpoints as hf

    if checkpoint is None or not hf.is_checkpoint_folder(Path(checkpoint)):
        return None
    return hf.image_processor(Path(checkpoint))


def _seen(adapter: Any, probes: Any, run: Callable[[], Any]) -> str:
    """The shape of the input as the model sees it (after its letterbox, transform or
    preprocess) while ``run()`` probes: what the adapter's score tap catches."""
    tap = adapter.score_tap(adapter.module)
    with tap:
        run()
    return "x".join(str(d) for d in tap.seen(list(probes.inputs)).shape)


def _own_transform(model: Any) -> bool:
    """A transform that decides the input size itself: one that takes no
    ``min_size``/``max_size`` (:func:`tbfeat.checkpoints.takes_input_size`)."""
    from .checkpoints import takes_input_size

    return getattr(model, "transform", None) is not None and not takes_input_size(model)


def _print_table(
    shown: list[Any],
    marked: list[Any],
    shapes: dict[tuple[str, Any], tuple[str, str]],
    tokens: bool = False,
) -> None:
    """One row per stage shown, ``*`` marking those logged; with ``tokens``, a column of
    the maps tbfeat logs of token stages (:mod:`tbfeat.tokens`)."""
    rows = [("", "index", "tag key", "name", "type", "output shape", "map shape")]
    for s in shown:
        mark = "*" if (s.name, s.output) in _keys(marked) else ""
        name = s.name + (f":{s.output}" if s.output else "")
        rows.append((mark, str(s.index), s.key, name, s.type,
                     *shapes.get((s.name, s.output), ("-", "-"))))  # fmt: skip
    if not tokens:
        rows = [r[:-1] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _keys(stages: Any) -> set[tuple[str, Any]]:
    return {(s.name, s.output) for s in stages}


def _map_shape(output: Any, layout: Any) -> str:
    """The shape of the map tbfeat logs of each tensor of a token stage's output
    (:func:`tbfeat.tokens.split`), or why it holds none."""
    from .capture import stage_tensors
    from .tokens import split

    shapes = []
    for _, t in stage_tensors(output):
        parts = split(t, layout)
        shapes.append("x".join(map(str, parts.map.shape)) if parts.map is not None else "no grid")
    return ", ".join(shapes) or "-"


def _shape(output: Any) -> str:
    import torch

    if isinstance(output, torch.Tensor):
        return "x".join(str(d) for d in output.shape)
    if isinstance(output, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in output.items()) + "}"
    if isinstance(output, (list, tuple)):
        return "[" + ", ".join(_shape(v) for v in output) + "]"
    return type(output).__name__


# ------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from .export import DPI, export

    dpi = DPI if args.dpi is None else args.dpi
    paths = export(
        args.logdir, args.out, stages=args.stages, steps=args.steps, images=args.images,
        fmt=args.format, dpi=dpi,
    )  # fmt: skip
    for path in paths:
        print(path)
    print(f"exported {len(paths)} figures ({args.format}, {dpi} dpi) to {args.out}")
    return 0


# ------------------------------------------------------------------------- main
def positive_int(text: str) -> int:
    """An ``argparse`` type: an int >= 1 (the subcommand's usage names the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoints``: the opt-in to load checkpoints off the allow-list."""
    parser.add_argument(
        "--trust-checkpoints",
        action="store_true",
        help="also load checkpoints that need globals outside tbfeat's allow-list, with "
        "full unpickling (Ultralytics' YOLO(path), torch.load(weights_only=False)): such a "
        "file can run code, so only for files you trust",
    )


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """``--arch`` and ``--model``: what a state-dict checkpoint loads into."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--arch", default=None, help="torchvision builder for state-dict checkpoints "
        "(fasterrcnn_resnet50_fpn)",
    )  # fmt: skip
    group.add_argument(
        "--model",
        default=None,
        metavar="MODULE:FUNCTION",
        help="your own model for state-dict checkpoints and Hugging Face checkpoint "
        "folders (which without it build the model their config.json names): a function "
        "of a module (mypkg.models:build) or of a file (path/to/model.py:build) that "
        "returns the nn.Module the state dict loads into; literal arguments may follow: "
        "'model.py:build(num_classes=6)'",
    )


class _Help(argparse.HelpFormatter):
    """Shows each option's default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if action.option_strings and default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def subcommand(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, formatter_class=_Help)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the whole traceback of an error")  # fmt: skip
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbfeat", description="See what a vision model sees, stage by stage, in TensorBoard."
    )
    parser.add_argument("--debug", action="store_true", help="show the whole traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = subcommand(sub, "sweep", "log probe images through saved checkpoints, one step each")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT_OR_DIR",
                   help="checkpoint files or folders of them; Hugging Face Trainer "
                   "checkpoint-<N> folders or their output_dir")  # fmt: skip
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="probe images or folders of images")  # fmt: skip
    p.add_argument("--max-images", type=positive_int, default=8,
                   help="images taken from each folder given to --images")  # fmt: skip
    p.add_argument("--logdir", required=True, help="TensorBoard run folder for the sweep")
    p.add_argument("--imgsz", type=positive_int, default=None,
                   help="Ultralytics letterbox size / torchvision min_size+max_size; a Hugging "
                   "Face checkpoint folder's image processor (preprocessor_config.json, "
                   "saved by its Trainer) resizes and normalizes the probe images "
                   "instead")  # fmt: skip
    add_model_flags(p)
    p.add_argument("--stages", nargs="+", default=None, help="indices, names or types")
    p.add_argument("--max-channels", type=positive_int, default=32, help="channels per grid")
    p.add_argument("--overwrite", action="store_true",
                   help="start the sweep's run over instead of skipping logged steps")  # fmt: skip
    p.add_argument("--workers", type=positive_int, default=1,
                   help="processes that load and probe checkpoints side by side; this one "
                        "writes (under torchrun the ranks share them instead)")  # fmt: skip
    add_trust_flag(p)
    p.set_defaults(func=cmd_sweep)

    p = subcommand(sub, "demo", "train YOLOv8n on synthetic shapes and compare epochs")
    p.add_argument("--dir", default="runs/tbfeat-demo", help="where data and runs go")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--train-images", type=positive_int, default=256)
    p.add_argument("--imgsz", type=positive_int, default=160)
    p.add_argument("--serve", action="store_true", help="start TensorBoard afterwards")
    p.add_argument("--port", type=positive_int, default=6006)
    p.set_defaults(func=cmd_demo)

    p = subcommand(sub, "board", "start TensorBoard on a logdir tbfeat wrote")
    p.add_argument("logdir")
    p.add_argument("--port", type=positive_int, default=6006)
    p.add_argument("--image-samples", type=positive_int, default=BOARD_IMAGE_SAMPLES,
                   metavar="N", help="image steps per tag TensorBoard keeps in memory "
                   f"(default {BOARD_IMAGE_SAMPLES}; the last always)")  # fmt: skip
    p.set_defaults(func=cmd_board)

    p = subcommand(sub, "stages", "print the stage table that --stages selects from")
    p.add_argument(
        "checkpoint", nargs="?", default=None, metavar="MODEL_OR_CHECKPOINT",
        help="checkpoint, Hugging Face checkpoint folder, Ultralytics yaml (yolov8n.yaml) "
        "or torchvision builder; with --model, a state-dict checkpoint for it (or none: "
        "the model as built)",
    )  # fmt: skip
    add_model_flags(p)
    p.add_argument("--imgsz", type=positive_int, default=None,
                   help="probe image size (default 640); also the min_size/max_size of "
                   "a detector's transform, yours included where it takes them. A Hugging "
                   "Face checkpoint folder's image processor (preprocessor_config.json, "
                   "saved by its Trainer) resizes and normalizes the probe, as a sweep of "
                   "the folder does")  # fmt: skip
    p.add_argument("--stages", nargs="+", default=None, help="mark what these select")
    add_trust_flag(p)
    p.set_defaults(func=cmd_stages)

    p = subcommand(sub, "export", "figures of a logdir's grids, maps and strips, step by step")
    p.add_argument("logdir", help="a run folder, or a folder of runs")
    p.add_argument("--out", required=True, help="folder the figures go to")
    p.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                   help="keys (09_SPPF), indices (9) or types (SPPF); default all")  # fmt: skip
    p.add_argument("--steps", nargs="+", type=int, default=None, metavar="STEP",
                   help="logged steps; default all")  # fmt: skip
    p.add_argument("--images", nargs="+", default=None, metavar="NAME",
                   help="image names; default all")  # fmt: skip
    p.add_argument("--format", default="png", metavar="{png,pdf,svg}",
                   help="png at --dpi, or vector pdf/svg with the panels embedded")  # fmt: skip
    p.add_argument("--dpi", type=int, default=None,
                   help="resolution, at least 72 (default: tbfeat.export.DPI, 300)")  # fmt: skip
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `tbfeat stages ... | head`: the reader has gone
        _quiet_stdout()
        return 0
    except (UsageError, ValueError, TypeError, FileNotFoundError, OSError) as e:
        if args.debug:
            _show_causes(e)
            raise
        message = str(e) if str(e) else type(e).__name__
        print(f"tbfeat: error: {message}", file=sys.stderr)
        return 2


def _show_causes(error: BaseException) -> None:
    """Undo ``raise ... from None`` along the chain, so ``--debug`` shows every cause."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__suppress_context__ = False
        error = error.__cause__ or error.__context__


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's own flush at exit fails no more."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
