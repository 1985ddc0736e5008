"""A sweep: probe images through saved checkpoints, one step each, into one run.

:func:`sweep` plans the steps (the epoch each checkpoint stores, else the number in its
name, else the order given), skips the steps its manifest (``tbfeat-sweep.json`` in the
logdir) says are logged, and logs the rest in step order through one
:class:`~tbfeat.FeatureLogger`, so drift and evolution run across checkpoints. A sweep
extended with later checkpoints continues the run; one given an earlier checkpoint than
those logged logs again from there (a new run from that step); ``overwrite=True`` starts
the whole run over.

A step counts as logged once it is on disk (the run's ``flushed_step``): only then
does it enter the manifest and :attr:`SweepResult.logged`. A step the storage refused
(a full disk) is in :attr:`SweepResult.dropped` and is logged by the next run of the
sweep; and every step the manifest lists is checked against the event files before it
lets a checkpoint be skipped.

The manifest also records, per checkpoint file read (resolved path, size, ``mtime_ns``),
its kind and stored epoch, so a file unchanged since is planned without opening it: a
sweep with nothing to do loads no checkpoint. Every checkpoint to log is checked against
the allow-list (:mod:`tbfeat.checkpoints`) before the first one loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import hf_checkpoints as hf
from .checkpoints import (
    CheckpointError,
    ModelSource,
    UnsafeCheckpointError,
    check_checkpoint,
    check_model_args,
    find_checkpoints,
    kind_of,
    load_checkpoint,
    model_factory,
    natural_key,
    read_epoch_step,
    step_from_name,
)
from .files import atomic_write
from .options import LogOptions
from .stages import StageSpec
from .sweep_workers import (
    Messages,
    Ranks,
    StepFailed,
    SweepJob,
    check_workers,
    log_in_workers,
    log_on_ranks,
    rank_device,
    ranks,
    what_failed,
)

MANIFEST = "tbfeat-sweep.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class SweepError(ValueError):
    """A sweep stopped; the message says what failed and which steps are kept."""


@dataclass(frozen=True)
class PlannedStep:
    """A checkpoint and the step it is logged at."""

    step: int
    path: Path
    kind: str  # "ultralytics", "state_dict", "hf" or "unreadable" (fails in its turn)


@dataclass
class SweepResult:
    """What a sweep did."""

    logdir: Path
    logged: list[int] = field(default_factory=list)
    """Steps written to disk by this sweep."""
    skipped: list[int] = field(default_factory=list)
    """Steps on disk before, whose checkpoints were not loaded again."""
    dropped: list[int] = field(default_factory=list)
    """Steps the storage refused (warned about as they failed); not in the manifest, so
    the next run of the sweep logs them."""

    def add(self, p: PlannedStep, on_disk: bool) -> None:
        (self.logged if on_disk else self.dropped).append(p.step)


def collect_images(
    paths: Iterable[str | os.PathLike],
    max_images: int = 8,
    note: Callable[[str], None] | None = None,
) -> list[Path]:
    """Image files as given; each folder gives its first ``max_images`` image files (in
    natural order), and ``note`` hears how many of how many. Every image is read once, so
    that a bad one fails before any checkpoint is loaded."""
    from .images import load_image

    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images must be an int >= 1, got {max_images!r}")
    images: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                (p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key
            )
            if not found:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {str(path)!r}")
            if len(found) > max_images and note is not None:
                note(f"using the first {max_images} of {len(found)} images in {str(path)!r} "
                     "(--max-images / max_images= for more)")  # fmt: skip
            images += found[:max_images]
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
    if path.is_dir():  # a Hugging Face folder: only its small trainer_state.json is read
        return kind_of(path, trust=trust), read_epoch_step(path, trust=trust)
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


ROLLING = ("best", "last")
"""Stems of checkpoints a training saves again and again (Ultralytics' ``best.pt`` and
``last.pt``): logged only at the epoch they store, never at an invented step."""


def plan_sweep(
    paths: Sequence[Path],
    warn: Callable[[str], None] | None = None,
    *,
    known: dict[str, Any] | None = None,
    trust: bool = False,
) -> list[PlannedStep]:
    """One :class:`PlannedStep` per distinct step, in step order: the stored epoch
    (1-based), else the number in the file name, else the order given (after the others).

    ``best``/``last`` checkpoints are logged at the epoch they store, and skipped when
    they store none (stripped at the end of a training) or when an epoch checkpoint of
    that epoch is in the sweep. Each of these decisions, and each step given by order, is
    told to ``warn``.

    ``known`` is the manifest's record of checkpoint files (see :func:`checkpoint_facts`);
    files it holds unchanged are not opened. An unreadable file is planned and fails in
    its turn; one that needs globals off the allow-list stops the sweep here.

    Raises:
        SweepError: two checkpoints give one step (the tutorial's ``mobile-model-1.pth``
            and ``resNetFpn-model-1.pth`` in one folder), before anything is logged.
    """
    say = warn if warn is not None else (lambda message: None)
    facts = [(path, *_facts(path, known, trust)) for path in paths]
    steps: list[PlannedStep] = []
    for path, kind, stored in facts:
        if path.stem not in ROLLING:
            step = stored if stored is not None else step_from_name(path)
            steps.append(PlannedStep(step, path, kind))  # step None: given by order below
    numbered = {p.step: p.path for p in steps if p.step is not None}
    for path, kind, stored in facts:
        if path.stem not in ROLLING:
            continue
        if kind == "unreadable":
            say(f"{path} cannot be read (corrupt or truncated?); skipped")
        elif stored is None:
            say(f"{path} stores no epoch (stripped at the end of training); skipped")
        elif stored in numbered:
            say(f"{path} is epoch {stored}, as {numbered[stored]}; skipped")
        else:
            say(f"{path} is logged as step {stored}, the epoch it stores")
            steps.append(PlannedStep(stored, path, kind))
    next_step = max((p.step for p in steps if p.step is not None), default=0) + 1
    for i, p in enumerate(steps):
        if p.step is None:
            say(f"{p.path} stores no epoch and has no number: logged as step {next_step}")
            steps[i], next_step = PlannedStep(next_step, p.path, p.kind), next_step + 1
    by_step: dict[int, list[Path]] = {}
    for p in steps:
        by_step.setdefault(p.step, []).append(p.path)
    clashes = {step: paths for step, paths in sorted(by_step.items()) if len(paths) > 1}
    if clashes:
        listed = "; ".join(f"step {step}: {', '.join(map(str, paths))}"
                           for step, paths in clashes.items())  # fmt: skip
        raise SweepError(
            f"checkpoints that give one step, so one would hide the other ({listed}): "
            "sweep each training's checkpoints into a logdir of its own"
        )
    return sorted(steps, key=lambda p: p.step)


def _facts(path: Path, known: dict[str, Any] | None, trust: bool) -> tuple[str, int | None]:
    """:func:`checkpoint_facts`, with an unreadable file planned to fail in its turn."""
    try:
        return checkpoint_facts(path, known, trust=trust)
    except UnsafeCheckpointError:
        raise
    except (ValueError, OSError):
        return "unreadable", None


MANIFEST_MAX_BYTES = 64 * 2**20
"""The largest manifest read (a sweep of many thousand checkpoints stays far below)."""


def read_manifest(logdir: Path) -> dict[str, Any]:
    """The sweep's manifest: ``{"version": 2, "steps": {step: {...}}, "checkpoints":
    {resolved path: {"size", "mtime_ns", "kind", "epoch_step"}}}``. Manifests written
    before ``"checkpoints"`` existed read with an empty one (their files are read once).
    A link there is none of tbfeat's (it writes files, never links): it reads as none,
    and the first write replaces the link itself.

    Raises:
        SweepError: a manifest that is not one (too large, not UTF-8 JSON, nested too
            deep, a step that is no integer), naming the file.
    """
    path = logdir / MANIFEST
    if path.is_symlink() or not path.is_file():
        return {"version": 2, "steps": {}, "checkpoints": {}}
    try:
        manifest, why = _parse_manifest(path), None
    except (OSError, ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        manifest, why = None, f"{type(e).__name__}: {e}"
    if why is None and (not isinstance(manifest, dict)
                        or not isinstance(manifest.get("steps"), dict)):  # fmt: skip
        why = "no steps"
    if why is None:
        bad = [k for k, v in manifest["steps"].items()
               if not _is_step(k) or not isinstance(v, dict)]  # fmt: skip
        why = f"step {bad[0][:40]!r} is not an integer step" if bad else None
    if why is not None:
        raise SweepError(
            f"{str(path)!r} is unreadable ({why[:200]}); delete it or use --overwrite to start over"
        )
    if not isinstance(manifest.get("checkpoints"), dict):
        manifest["checkpoints"] = {}
    return manifest


def _parse_manifest(path: Path) -> Any:
    from .files import open_regular

    with os.fdopen(open_regular(path), "rb") as f:
        data = f.read(MANIFEST_MAX_BYTES + 1)
    if len(data) > MANIFEST_MAX_BYTES:
        raise ValueError(f"larger than {MANIFEST_MAX_BYTES} bytes")
    return json.loads(data.decode("utf-8"))


def _is_step(key: str) -> bool:
    try:
        return str(int(key)) == key and -(2**63) <= int(key) < 2**63
    except ValueError:
        return False


def check_manifest(
    logdir: Path, manifest: dict[str, Any], warn: Callable[[str], None] | None = None
) -> None:
    """Remove from ``manifest`` the steps that are not in the event files of ``logdir``
    (lost, or never written), telling ``warn``: a step is skipped only while it is on
    disk. A manifest without steps reads no event file."""
    listed = manifest["steps"]
    if not listed:
        return
    missing = sorted(set(listed) - {str(s) for s in steps_on_disk(logdir)}, key=int)
    for step in missing:
        del listed[step]
    if missing and warn is not None:
        warn(f"steps {', '.join(missing)} are in {str(logdir / MANIFEST)!r} but not in the "
             "event files there: logging them again")  # fmt: skip


def steps_on_disk(folder: Path) -> set[int]:
    """The steps the event files in ``folder`` hold (any tag), as :mod:`tbfeat.reader`
    indexes them (also files of versions before :data:`tbfeat.writer.FILE_SUFFIX`); what
    is not a regular file is passed over, as a restart passes it over."""
    from .notes import Notes
    from .reader import EVENT_PREFIX, FileIndex

    steps: set[int] = set()
    notes = Notes()
    for path in sorted(folder.glob(f"{EVENT_PREFIX}.*")):
        index = FileIndex(str(path))
        if not path.is_symlink() and index.update(notes):
            steps.update(step for tag in index.tags.values() for step in tag.steps)
    return steps


def write_manifest(logdir: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest whole (see :func:`tbfeat.files.atomic_write`)."""
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write(logdir / MANIFEST, lambda f: f.write(text))


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
    model: ModelSource | None = None,
    stages: StageSpec | Iterable[StageSpec] | None = None,
    imgsz: int | None = None,
    max_images: int = 8,
    overwrite: bool = False,
    trust: bool = False,
    workers: int = 1,
    on_step: Callable[[PlannedStep, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> SweepResult:
    """Log probe images through checkpoints, one step each, into one TensorBoard run.

    Every argument is checked, and the first checkpoint loaded, before the logdir or any
    file in it is created.

    Args:
        checkpoints: Checkpoint files, or folders of them (their ``epoch*.pt`` /
            ``model_<N>.pth`` files, else every checkpoint), in natural order; Hugging
            Face ``Trainer`` ``checkpoint-<N>`` folders, or the folder holding them
            (logged at each ``trainer_state.json``'s ``global_step``, else at ``<N>``).
        images: Probe image files or folders.
        logdir: The sweep's run folder; its manifest records the steps logged.
        arch: torchvision builder name for state-dict checkpoints.
        model: Your own model for state-dict checkpoints and Hugging Face folders
            (which without it build the model their ``config.json`` names):
            ``"MODULE:FUNCTION"``, ``"path/to/file.py:FUNCTION"``, a function returning an
            ``nn.Module``, or an ``nn.Module`` (a copy is loaded); see
            :func:`tbfeat.checkpoints.model_factory`.
        stages: As for :class:`~tbfeat.FeatureLogger`.
        imgsz: Letterbox size (Ultralytics) or ``min_size``/``max_size`` (torchvision).
        max_images: Images taken from each folder in ``images`` (the first, in natural
            order); files named one by one are all used.
        overwrite: Start the run over instead of skipping logged steps.
        trust: Load checkpoints that need globals off tbfeat's allow-list, with full
            unpickling: they can run code, so only for files you trust. Without it such a
            file stops the sweep before any checkpoint is loaded.
        workers: Processes that load and probe checkpoints side by side (spawned, on the
            CPU, each with its share of the CPU's threads); this process writes every
            step in step order, so the run equals a serial sweep's. ``1``: one at a
            time, here. Under ``torchrun`` (``torch.distributed`` initialized, or
            ``RANK``/``WORLD_SIZE`` set) the ranks share the checkpoints instead (each on
            ``cuda:<LOCAL_RANK>`` when CUDA is available) and rank 0 alone writes:
            every rank calls :func:`sweep`.
        on_step: Called after each step is logged (on disk), with the number of images.
        warn: Called with a message for each decision about a checkpoint or image folder
            (skipped, logged at a step of its own).
        **options: :class:`~tbfeat.LogOptions` fields.

    A Hugging Face checkpoint folder that holds the image processor its ``Trainer`` saved
    (``preprocessor_config.json``) prepares the probe images with it (resize, normalize:
    ``preprocess=`` of :class:`~tbfeat.FeatureLogger`), built locally by ``transformers``;
    the first such folder to log gives it for the whole sweep, in every process.

    Returns:
        The steps logged (on disk), skipped (on disk before) and dropped (refused by
        the storage, warned about; the next run of the sweep logs them).

    Raises:
        SweepError: a checkpoint failed; the message says which steps are kept.
        UnsafeCheckpointError: without ``trust``, a checkpoint to log needs globals off
            the allow-list; nothing is loaded or logged.
        ValueError: bad images, checkpoints, architecture, model, stages, workers or
            options, before anything is created.

    Example:
        ::

            tbfeat.sweep(["runs/detect/train/weights"], images=["bus.jpg"],
                         logdir="runs/sweep", imgsz=640)
    """
    check_workers(workers)
    image_files = collect_images(images, max_images, warn)
    options["max_images"] = len(image_files)
    job = SweepJob(tuple(image_files), arch, model, stages, imgsz, trust,
                   LogOptions.from_kwargs(**options))  # fmt: skip
    source = _model_source(arch, model)
    folder = Path(logdir)
    with ranks() as shared:
        if shared is None and workers > 1:
            job.check_portable()
        elif shared is not None and workers > 1 and warn is not None:
            warn(f"workers={workers} is left aside: the {shared.world} ranks share the checkpoints")
        manifest, plan, todo, kept = _plan_on_rank0(shared, checkpoints, folder, overwrite,
                                                    arch, model, trust, warn)  # fmt: skip
        job = replace(job, processor=processor_folder(todo))
        preprocess = hf.image_processor(job.processor) if job.processor is not None else None
        result = SweepResult(folder, skipped=[p.step for p in plan if p.step in kept])
        if shared is not None and shared.rank:  # rank 0 writes; the others log their share
            _log_for_rank0(job, todo, shared)
            result.logged = [p.step for p in todo]
            return result
        manifest["steps"] = {k: v for k, v in manifest["steps"].items() if int(k) in kept}
        created = not folder.exists()
        run = _Run(folder, manifest, stages, "new" if overwrite else "auto", options, preprocess)
        try:
            if shared is None and workers == 1:
                _log_here(todo, run, result, kept, image_files, arch, imgsz, trust, source,
                          on_step)  # fmt: skip
            else:
                _log_elsewhere(job, todo, shared, workers, run, result, kept, on_step)
        finally:
            run.close()
            if created and not result.logged:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # made for a first step that failed, if nothing was written
    return result


def processor_folder(todo: Iterable[PlannedStep]) -> Path | None:
    """The first Hugging Face checkpoint folder of ``todo`` that holds an image processor
    (:data:`tbfeat.hf_checkpoints.PROCESSOR`): the one that prepares the sweep's probe
    images. The processes of a sweep are sent this path, never the processor."""
    for p in todo:
        if p.path.is_dir() and (p.path / hf.PROCESSOR).is_file():
            return p.path
    return None


def _log_here(
    todo: list[PlannedStep],
    run: _Run,
    result: SweepResult,
    kept: list[int],
    image_files: list[Path],
    arch: str | None,
    imgsz: int | None,
    trust: bool,
    source: Callable[[], Any] | None,
    on_step: Callable[[PlannedStep, int], None] | None,
) -> None:
    """Load, probe and write each step in this process, one at a time."""
    for p in todo:
        try:
            unreadable = p.kind == "unreadable"  # kind_of raises its reason
            kind = kind_of(p.path, trust=trust) if unreadable else p.kind
            loaded = load_checkpoint(p.path, kind, arch, imgsz, trust=trust, model=source)
            on_disk = run.log(loaded.model, image_files, imgsz, p)
        except Exception as e:
            raise _failed(e, p, sorted(kept + result.logged), run.folder) from e
        result.add(p, on_disk)
        if on_disk and on_step is not None:
            on_step(p, len(image_files))


def _failed(error: Exception, p: PlannedStep, kept: list[int], folder: Path) -> SweepError:
    """The error a failed step stops the sweep with, saying which steps are kept."""
    return SweepError(f"{what_failed(error, p)} ({_kept(kept)} in {folder})")


def _kept(kept: list[int]) -> str:
    return f"steps {', '.join(map(str, kept))} are kept" if kept else "no step is kept"


# ------------------------------------------------------------------ other processes
def _log_elsewhere(
    job: SweepJob,
    todo: list[PlannedStep],
    shared: Ranks | None,
    workers: int,
    run: _Run,
    result: SweepResult,
    kept: list[int],
    on_step: Callable[[PlannedStep, int], None] | None,
) -> None:
    """Log the steps in worker processes or over the ranks; write each here, in order."""

    def record(p: PlannedStep, messages: Messages) -> None:
        try:
            on_disk = run.record(p, messages)
        except Exception as e:
            raise _failed(e, p, sorted(kept + result.logged), run.folder) from e
        result.add(p, on_disk)
        if on_disk and on_step is not None:
            on_step(p, len(job.images))

    try:
        if shared is not None:
            log_on_ranks(replace(job, device=rank_device()), todo, shared, record)
        else:
            log_in_workers(job, todo, workers, record)
    except StepFailed as e:
        kept_now = _kept(sorted(kept + result.logged))
        raise SweepError(f"{e.what} ({kept_now} in {run.folder})") from e


def _log_for_rank0(job: SweepJob, todo: list[PlannedStep], shared: Ranks) -> None:
    """On a rank other than 0: log this rank's share of the steps; rank 0 writes them."""

    def record(p: PlannedStep, messages: Messages) -> None:
        raise RuntimeError("only rank 0 writes a sweep")

    try:
        log_on_ranks(replace(job, device=rank_device()), todo, shared, record)
    except StepFailed as e:
        raise SweepError(e.what) from e


def _plan_on_rank0(
    shared: Ranks | None,
    checkpoints: Sequence[str | os.PathLike],
    folder: Path,
    overwrite: bool,
    arch: str | None,
    model: Any,
    trust: bool,
    warn: Callable[[str], None] | None,
) -> tuple[dict[str, Any], list[PlannedStep], list[PlannedStep], list[int]]:
    """The manifest, the plan, the steps to log and the logged steps that stay: read and
    planned here, or on rank 0 and sent to every rank (its error raised on each)."""

    def planned() -> tuple[dict[str, Any], list[PlannedStep], list[PlannedStep], list[int]]:
        empty = {"version": 2, "steps": {}, "checkpoints": {}}
        manifest = empty if overwrite else read_manifest(folder)
        check_manifest(folder, manifest, warn)
        return (manifest, *_plan(checkpoints, manifest, arch, model, trust, warn))

    if shared is None:
        return planned()
    outcome: Any = None
    if shared.rank == 0:
        try:
            outcome = planned()
        except Exception as e:
            shared.broadcast(e)
            raise
    outcome = shared.broadcast(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _plan(
    checkpoints: Sequence[str | os.PathLike],
    manifest: dict[str, Any],
    arch: str | None,
    model: Any,
    trust: bool,
    warn: Callable[[str], None] | None,
) -> tuple[list[PlannedStep], list[PlannedStep], list[int]]:
    """The plan, the steps to log and the logged steps that stay; every checkpoint to
    log checked against the arguments (and without ``trust``, the allow-list)."""
    plan = plan_sweep(
        find_checkpoints(list(checkpoints)), warn, known=manifest["checkpoints"], trust=trust
    )
    if not plan:
        raise ValueError(
            "no checkpoint to log: every one given was skipped (see above); a training "
            "saves one per epoch with save_period=1 (Ultralytics) or in its own loop"
        )
    todo, kept = steps_to_log(plan, (int(s) for s in manifest["steps"]))
    for p in todo:  # every checkpoint to log loads with the arguments given
        check_model_args(p.path, p.kind, arch, model)
    if not trust:
        check_before_loading(todo)
    return plan, todo, kept


class _Run:
    """The sweep's logger and manifest: the logger is created when the first model has
    loaded, with ``preprocess`` (a checkpoint folder's image processor, or ``None``); it
    resolves the stages on each model (an unknown stage fails as it is created, before
    the logdir exists)."""

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        stages: Any,
        run: str,
        options: dict,
        preprocess: Any = None,
    ) -> None:
        self.folder, self.manifest, self.stages, self.run = folder, manifest, stages, run
        self.options, self.preprocess = options, preprocess
        self.logger: Any = None
        self.pipeline: Any = None
        """The :class:`~tbfeat.run.Run` of steps captured in other processes."""

    def log(self, model: Any, images: list[Path], imgsz: int | None, p: PlannedStep) -> bool:
        """Log a step here; True once it is on disk."""
        from .logger import FeatureLogger

        if self.logger is None:
            self.logger = FeatureLogger(
                model, self.folder, stages=self.stages, run=self.run,
                preprocess=self.preprocess, **self.options,
            )  # fmt: skip
        logger = self.logger
        logger.probe(logger.prepare(images, model=model, imgsz=imgsz), model=model, step=p.step)
        logger.flush()
        return self._done(p, logger.flushed_step)

    def record(self, p: PlannedStep, messages: Messages) -> bool:
        """Write a step whose messages were captured in another process (its stages,
        maps and end), as :meth:`log` writes one captured here; True once on disk."""
        from .run import Run
        from .writer import check_logdir

        if self.pipeline is None:
            check_logdir(self.folder)
            options = LogOptions.from_kwargs(**self.options)
            self.pipeline = Run(self.folder, options=options, mode=self.run)
        for message, nbytes in messages:
            if not self.pipeline.post(message, nbytes):
                raise OSError("the writer thread did not make room in time")
        self.pipeline.flush()
        return self._done(p, self.pipeline.flushed_step)

    def _done(self, p: PlannedStep, flushed: int | None) -> bool:
        """Record the step in the manifest if it is on disk (``flushed`` is the run's
        last step on disk; a refused step leaves it below ``p.step``)."""
        if flushed != p.step:
            return False
        entry = {"checkpoint": str(p.path.resolve()), "time": time.time()}
        self.manifest["steps"][str(p.step)] = entry
        write_manifest(self.folder, self.manifest)
        return True

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if self.pipeline is not None:
            self.pipeline.close()


def _model_source(arch: str | None, model: ModelSource | None) -> Callable[[], Any] | None:
    """Check ``arch`` and ``model`` (one of them at most) before anything is loaded."""
    if arch is not None and model is not None:
        raise ValueError("pass either arch (a torchvision builder) or model (your own), not both")
    if arch is not None:
        from .integrations.torchvision import check_arch

        check_arch(arch)
    return model_factory(model) if model is not None else None


def check_before_loading(todo: Iterable[PlannedStep]) -> None:
    """Check every checkpoint to log against the allow-list (inspection only, nothing is
    unpickled), so that one needing other globals stops the sweep before the first loads.

    Raises:
        UnsafeCheckpointError: the first such checkpoint. Unreadable ones fail in their
            turn instead, after the steps before them are logged.
    """
    for p in todo:
        try:
            if p.kind == hf.KIND:
                hf.check_folder(p.path)
            else:
                check_checkpoint(p.path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError:
            pass


def print_warning(message: str) -> None:
    print(f"tbfeat: {message}", file=sys.stderr)
