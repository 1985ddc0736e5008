"""A sweep: probe images through saved checkpoints, one step each, into one run.

:func:`sweep` plans the steps (the epoch each checkpoint stores, else the number in its
name, else the order given), skips the steps its manifest (``tbfeat-sweep.json`` in the
logdir) says are logged, and logs the rest in step order through one
:class:`~tbfeat.FeatureLogger`, so drift and evolution run across checkpoints. A sweep
extended with later checkpoints continues the run; one given an earlier checkpoint than
those logged logs again from there (a new run from that step); ``overwrite=True`` starts
the whole run over.

The manifest also records, per checkpoint file read (resolved path, size, ``mtime_ns``),
its kind and stored epoch, so a file unchanged since is planned without opening it: a
sweep with nothing to do loads no checkpoint. Every checkpoint to log is checked against
the allow-list (:mod:`tbfeat.checkpoints`) before the first one loads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import (
    CheckpointError,
    UnsafeCheckpointError,
    check_checkpoint,
    find_checkpoints,
    kind_of,
    load_checkpoint_model,
    read_epoch_step,
    step_from_name,
)
from .stages import StageSpec

MANIFEST = "tbfeat-sweep.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class SweepError(ValueError):
    """A sweep stopped; the message says what failed and which steps are kept."""


@dataclass(frozen=True)
class PlannedStep:
    """A checkpoint and the step it is logged at."""

    step: int
    path: Path
    kind: str  # "ultralytics", "state_dict" or "unreadable" (fails in its turn)


@dataclass
class SweepResult:
    """What a sweep did."""

    logdir: Path
    logged: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def collect_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files as given; folders expand to the image files in them (sorted). Every
    image is read once, so that a bad one fails before any checkpoint is loaded."""
    from .images import load_image

    images: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {str(path)!r}")
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise ValueError(f"image not found: {str(path)!r}")
    for image in images:
        try:
            load_image(image)
        except (ValueError, OSError) as e:
            raise ValueError(f"{e}; pass readable image files") from None
    return images


def _file_key(path: Path) -> tuple[str, dict[str, int]]:
    """A file's manifest key (its resolved path) and what identifies its version."""
    st = path.stat()
    return str(path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def checkpoint_facts(
    path: Path, known: dict[str, Any] | None = None, *, trust: bool = False
) -> tuple[str, int | None]:
    """A checkpoint's kind and stored step: from ``known`` (the manifest's record, updated
    in place) while the file's size and ``mtime_ns`` are unchanged, else read from it.

    Raises:
        UnsafeCheckpointError: without ``trust``, a file that needs globals off the
            allow-list (nothing of it is run).
        CheckpointError: an unreadable file.
    """
    key, stamp = _file_key(path)
    entry = (known or {}).get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()):
        kind, step = entry.get("kind"), entry.get("epoch_step")
        if kind in ("ultralytics", "state_dict") and (step is None or isinstance(step, int)):
            return kind, step
    kind = kind_of(path, trust=trust)
    step = read_epoch_step(path, trust=trust)
    if known is not None:
        known[key] = {**stamp, "kind": kind, "epoch_step": step}
    return kind, step


def plan_sweep(
    paths: Sequence[Path],
    warn: Callable[[str], None] | None = None,
    *,
    known: dict[str, Any] | None = None,
    trust: bool = False,
) -> list[PlannedStep]:
    """One :class:`PlannedStep` per distinct step, in step order: the stored epoch
    (1-based), else the number in the file name, else the order given (after the others).
    A second checkpoint of the same step is left out, with a message to ``warn``.

    ``known`` is the manifest's record of checkpoint files (see :func:`checkpoint_facts`);
    files it holds unchanged are not opened. An unreadable file is planned and fails in
    its turn; one that needs globals off the allow-list stops the sweep here.
    """
    planned: list[tuple[int | None, Path, str]] = []
    for path in paths:
        try:
            kind, step = checkpoint_facts(path, known, trust=trust)
        except UnsafeCheckpointError:
            raise
        except (ValueError, OSError):  # unreadable: it fails in its turn, after the others
            kind, step = "unreadable", None
        planned.append((step if step is not None else step_from_name(path), path, kind))
    next_step = max((s for s, _, _ in planned if s is not None), default=0) + 1
    steps = []
    for step, path, kind in planned:
        if step is None:
            step, next_step = next_step, next_step + 1
        steps.append(PlannedStep(step, path, kind))
    steps.sort(key=lambda p: p.step)
    unique: dict[int, PlannedStep] = {}
    for p in steps:
        if p.step in unique:
            if warn is not None:
                warn(
                    f"{p.path} is also step {p.step} (as {unique[p.step].path}); logging the first"
                )
            continue
        unique[p.step] = p
    return list(unique.values())


def read_manifest(logdir: Path) -> dict[str, Any]:
    """The sweep's manifest: ``{"version": 2, "steps": {step: {...}}, "checkpoints":
    {resolved path: {"size", "mtime_ns", "kind", "epoch_step"}}}``. Manifests written
    before ``"checkpoints"`` existed read with an empty one (their files are read once)."""
    path = logdir / MANIFEST
    if not path.is_file():
        return {"version": 2, "steps": {}, "checkpoints": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("steps"), dict):
        raise SweepError(
            f"{str(path)!r} is unreadable; delete it or use --overwrite to start over"
        ) from None
    if not isinstance(manifest.get("checkpoints"), dict):
        manifest["checkpoints"] = {}
    return manifest


def write_manifest(logdir: Path, manifest: dict[str, Any]) -> None:
    tmp = logdir / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, logdir / MANIFEST)


def steps_to_log(
    plan: Sequence[PlannedStep], done: Iterable[int]
) -> tuple[list[PlannedStep], list[int]]:
    """The planned steps to log and the logged ones that stay.

    A planned step before a logged one starts the run again from there (TensorBoard
    drops the logged steps from it on), so every logged step after it is logged again;
    a logged step after it whose checkpoint is not planned would be lost: an error.
    """
    done = sorted(set(done))
    new = [p for p in plan if p.step not in done]
    if not new:
        return [], done
    first = new[0].step
    later = [s for s in done if s > first]
    missing = sorted(set(later) - {p.step for p in plan})
    if missing:
        raise SweepError(
            f"step {first} comes before steps already logged ({', '.join(map(str, later))}), "
            f"and logging it starts the run again from there; give the checkpoints of steps "
            f"{', '.join(map(str, missing))} too, or start over with --overwrite"
        )
    return [p for p in plan if p.step >= first], [s for s in done if s < first]


def sweep(
    checkpoints: Sequence[str | os.PathLike],
    *,
    images: Sequence[str | os.PathLike],
    logdir: str | os.PathLike,
    arch: str | None = None,
    stages: StageSpec | Iterable[StageSpec] | None = None,
    imgsz: int | None = None,
    overwrite: bool = False,
    trust: bool = False,
    on_step: Callable[[PlannedStep, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> SweepResult:
    """Log probe images through checkpoints, one step each, into one TensorBoard run.

    Args:
        checkpoints: Checkpoint files, or folders of them (their ``epoch*.pt`` /
            ``model_<N>.pth`` files, else every checkpoint).
        images: Probe image files or folders.
        logdir: The sweep's run folder; its manifest records the steps logged.
        arch: torchvision builder name for state-dict checkpoints.
        stages: As for :class:`~tbfeat.FeatureLogger`.
        imgsz: Letterbox size (Ultralytics) or ``min_size``/``max_size`` (torchvision).
        overwrite: Start the run over instead of skipping logged steps.
        trust: Load checkpoints that need globals off tbfeat's allow-list, with full
            unpickling: they can run code, so only for files you trust. Without it such a
            file stops the sweep before any checkpoint is loaded.
        on_step: Called after each step is logged, with the number of images.
        warn: Called with a message for each checkpoint left out.
        **options: :class:`~tbfeat.LogOptions` fields; ``max_images`` defaults to the
            number of images.

    Returns:
        The steps logged and skipped.

    Raises:
        SweepError: a checkpoint failed; the message says which steps are kept.
        UnsafeCheckpointError: without ``trust``, a checkpoint to log needs globals off
            the allow-list; nothing is loaded or logged.
        ValueError: bad images, checkpoints or options, before anything is logged.

    Example:
        ::

            tbfeat.sweep(["runs/detect/train/weights"], images=["bus.jpg"],
                         logdir="runs/sweep", imgsz=640)
    """
    from .logger import FeatureLogger

    image_files = collect_images(images)
    options.setdefault("max_images", len(image_files))
    files = find_checkpoints(list(checkpoints))
    folder = Path(logdir)
    manifest = {"version": 2, "steps": {}, "checkpoints": {}}
    if not overwrite:
        manifest = read_manifest(folder)
    plan = plan_sweep(files, warn, known=manifest["checkpoints"], trust=trust)
    todo, kept = steps_to_log(plan, (int(s) for s in manifest["steps"]))
    if not trust:
        check_before_loading(todo)
    folder.mkdir(parents=True, exist_ok=True)
    result = SweepResult(folder, skipped=[p.step for p in plan if p.step in kept])
    manifest["steps"] = {k: v for k, v in manifest["steps"].items() if int(k) in kept}
    logger = None
    try:
        for p in todo:
            unreadable = p.kind == "unreadable"  # kind_of raises its reason
            kind = kind_of(p.path, trust=trust) if unreadable else p.kind
            model = load_checkpoint_model(p.path, kind, arch, imgsz, trust=trust)
            if logger is None:
                run = "new" if overwrite else "auto"
                logger = FeatureLogger(model, folder, stages=stages, run=run, **options)
            logger.probe(
                logger.prepare(image_files, model=model, imgsz=imgsz), model=model, step=p.step
            )
            logger.flush()
            manifest["steps"][str(p.step)] = {
                "checkpoint": str(p.path.resolve()),
                "time": time.time(),
            }
            write_manifest(folder, manifest)
            result.logged.append(p.step)
            if on_step is not None:
                on_step(p, len(image_files))
    except CheckpointError as e:
        kept_now = sorted(kept + result.logged)
        where = f"steps {', '.join(map(str, kept_now))} are kept" if kept_now else "no step is kept"
        raise SweepError(f"{e} ({where} in {folder})") from None
    finally:
        if logger is not None:
            logger.close()
        write_manifest(folder, manifest)
    return result


def check_before_loading(todo: Iterable[PlannedStep]) -> None:
    """Check every checkpoint to log against the allow-list (inspection only, nothing is
    unpickled), so that one needing other globals stops the sweep before the first loads.

    Raises:
        UnsafeCheckpointError: the first such checkpoint. Unreadable ones fail in their
            turn instead, after the steps before them are logged.
    """
    for p in todo:
        try:
            check_checkpoint(p.path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError:
            pass


def print_warning(message: str) -> None:
    print(f"tbfeat: {message}", file=sys.stderr)
