"""A sweep's checkpoints logged side by side: in worker processes (``workers=N``) or on
the ranks of a ``torchrun`` job; one process writes.

A process that logs checkpoints (a :class:`StepProber`) loads each one and probes it
with a :class:`~tbfeat.capturer.Capturer` whose ``post`` collects the step's messages
(:mod:`tbfeat.capture`); they travel back as bytes (CPU tensors, tuples: nothing open
crosses a process boundary). The writing process posts each step's messages to its one
run in step order, so drift and evolution equal a serial sweep's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import pickle
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import CheckpointError, kind_of, load_checkpoint, model_factory
from .options import LogOptions

Messages = list[tuple[Any, int]]
"""One step's messages, each with the bytes it holds, in posting order."""
Record = Callable[[Any, Messages], None]
"""The writer's ``record(planned_step, messages)``: post one step and write it."""


def check_workers(workers: Any) -> int:
    """``workers`` as given: an int >= 1."""
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be an int >= 1, got {workers!r}")
    if workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    return workers


@dataclass(frozen=True)
class SweepJob:
    """What a process needs to log checkpoints: plain data, sent to each process once."""

    images: tuple[Path, ...]
    arch: str | None
    model: Any
    """The ``model=`` given (a spec, a function or an ``nn.Module``), made in each process."""
    stages: Any
    imgsz: int | None
    trust: bool
    options: LogOptions
    device: str | None = None
    """Where each model runs (``cuda:<LOCAL_RANK>`` on the ranks of a GPU job)."""
    processor: Path | None = None
    """A Hugging Face checkpoint folder whose image processor prepares the probe images
    (built in each process: :func:`tbfeat.hf_checkpoints.image_processor`)."""

    def check_portable(self) -> None:
        """Fail, before anything is created, when the job cannot reach a worker process."""
        try:
            pickle.dumps(self)
        except Exception as e:  # noqa: BLE001 - pickling raises many kinds
            raise ValueError(
                f"workers > 1 sends model=, stages= and the options to each worker process, "
                f"and they cannot be pickled ({type(e).__name__}: {e}); pass model= as "
                "'MODULE:FUNCTION', 'path/to/file.py:FUNCTION' or a module-level function, "
                "or use workers=1"
            ) from None


class StepFailed(Exception):
    """A step failed where it was logged; ``what`` says why as a serial sweep says it,
    the message is the traceback there."""

    def __init__(self, step: Any, what: str, trace: str) -> None:
        super().__init__(trace or what)
        self.step, self.what = step, what


def what_failed(error: BaseException, p: Any) -> str:
    """Why a step failed, naming its checkpoint."""
    if isinstance(error, CheckpointError):
        return str(error)
    return f"{p.path}: {type(error).__name__}: {error}"


class StepProber:
    """Logs checkpoints into messages, in one process: one capturer for all of them (as a
    serial sweep's one logger), whose ``post`` collects each step's messages."""

    def __init__(self, job: SweepJob) -> None:
        self.job = job
        self._source = model_factory(job.model) if job.model is not None else None
        self._capturer: Any = None
        self._messages: Messages = []

    def messages(self, p: Any) -> Messages:
        """Load the checkpoint of ``p`` and probe it at its step."""
        from .adapters import adapt, check_preprocess
        from .capturer import Capturer
        from .hf_checkpoints import image_processor

        job = self.job
        kind = kind_of(p.path, trust=job.trust) if p.kind == "unreadable" else p.kind
        loaded = load_checkpoint(p.path, kind, job.arch, job.imgsz, trust=job.trust,
                                 model=self._source)  # fmt: skip
        model = loaded.model
        if job.device is not None:
            model.to(job.device)
        if self._capturer is None:
            adapter = adapt(model)
            processor = image_processor(job.processor) if job.processor is not None else None
            self._capturer = Capturer(
                model, adapter, job.stages, job.options, self._post, lambda: None,
                preprocess=check_preprocess(processor, adapter),
            )  # fmt: skip
        capturer, self._messages = self._capturer, []
        probes = capturer.prepare(list(job.images), model=model, imgsz=job.imgsz)
        capturer.probe(probes, model=model, step=p.step)
        messages, self._messages = self._messages, []
        return messages

    def run(self, p: Any) -> tuple[bytes | None, str, str]:
        """``(pickled messages, "", "")``, or ``(None, what failed, traceback)``."""
        try:
            return pickle.dumps(self.messages(p), pickle.HIGHEST_PROTOCOL), "", ""
        except Exception as e:  # noqa: BLE001 - reported to the writer, which stops
            self._messages = []
            return None, what_failed(e, p), traceback.format_exc()

    def _post(self, message: Any, nbytes: int) -> bool:
        self._messages.append((on_cpu(message), nbytes))
        return True


def on_cpu(message: Any) -> Any:
    """``message`` with its tensors (also in tuples) on the CPU."""
    if not dataclasses.is_dataclass(message):
        return message
    changes = {}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        moved = _cpu(value)
        if moved is not value:
            changes[f.name] = moved
    return dataclasses.replace(message, **changes) if changes else message


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "cpu" else value.cpu()
    if isinstance(value, tuple):
        moved = tuple(_cpu(v) for v in value)
        return value if all(a is b for a, b in zip(moved, value, strict=True)) else moved
    return value


def unpack(p: Any, result: tuple[bytes | None, str, str]) -> Messages:
    """The messages of a step's result, or :class:`StepFailed`."""
    payload, what, trace = result
    if payload is None:
        raise StepFailed(p, what, trace)
    return pickle.loads(payload)  # noqa: S301 - written by this sweep's own processes


# ------------------------------------------------------------------ worker processes
_PROBER: StepProber | None = None
"""The worker process's prober (set by :func:`_start`, used by :func:`_log_step`)."""


WORKER_NICE = 10
"""The niceness of worker processes: that of the writer thread (:mod:`tbfeat.worker`),
which would otherwise wait for the CPU while the workers probe the next steps."""


def _start(job: SweepJob, threads: int) -> None:
    global _PROBER
    torch.set_num_threads(threads)
    with contextlib.suppress(AttributeError, OSError):  # Linux; elsewhere as they are
        os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), WORKER_NICE))
    _PROBER = StepProber(job)


def _log_step(p: Any) -> tuple[bytes | None, str, str]:
    if _PROBER is None:
        raise RuntimeError("no prober in this process: the pool's initializer did not run")
    return _PROBER.run(p)


def log_in_workers(job: SweepJob, todo: Sequence[Any], workers: int, record: Record) -> None:
    """Log ``todo`` in ``workers`` spawned processes (each with its share of the CPU's
    threads); ``record`` each step in step order, as soon as it and every step before it
    are logged. At most ``workers`` steps wait or run besides the one being recorded.

    Raises:
        StepFailed: the first step that failed; no step after it is recorded.
    """
    workers = min(workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, context, initializer=_start, initargs=(job, threads))
    waiting = iter(todo)
    pending: deque[tuple[Any, Future]] = deque()
    try:
        pending.extend((p, pool.submit(_log_step, p)) for p in itertools.islice(waiting, workers))
        while pending:
            p, future = pending.popleft()
            messages = _result(p, future)
            q = next(waiting, None)  # the next step starts before this one is written
            if q is not None:
                pending.append((q, pool.submit(_log_step, q)))
            record(p, messages)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(p: Any, future: Future) -> Messages:
    try:
        result = future.result()
    except BrokenProcessPool as e:
        raise StepFailed(p, f"{p.path}: the process logging it ended unexpectedly ({e})", "") from e
    return unpack(p, result)


# ------------------------------------------------------------------ torchrun ranks
@dataclass(frozen=True)
class Ranks:
    """This process's place in a ``torch.distributed`` job, and the gloo group the
    sweep's objects travel in."""

    rank: int
    world: int
    group: Any

    def broadcast(self, value: Any) -> Any:
        """``value`` of rank 0, on every rank."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


@contextlib.contextmanager
def ranks() -> Iterator[Ranks | None]:
    """The job's ranks when ``torch.distributed`` is initialized or ``WORLD_SIZE`` > 1
    (then a gloo process group is made here and destroyed after), else ``None``."""
    import torch.distributed as dist

    if not dist.is_available():
        yield None
        return
    made = False
    if not dist.is_initialized():
        if _env_world() <= 1:
            yield None
            return
        dist.init_process_group("gloo")
        made = True
    try:
        world = dist.get_world_size()
        gloo = dist.get_backend() == "gloo"
        group = None if gloo or world <= 1 else dist.new_group(backend="gloo")
        yield Ranks(dist.get_rank(), world, group) if world > 1 else None
    finally:
        if made:
            dist.destroy_process_group()


def _env_world() -> int:
    value = os.environ.get("WORLD_SIZE", "")
    return int(value) if value.isdigit() and "RANK" in os.environ else 1


def rank_device() -> str | None:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else ``None`` (the CPU)."""
    if not torch.cuda.is_available():
        return None
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def log_on_ranks(job: SweepJob, todo: Sequence[Any], ranks: Ranks, record: Record) -> None:
    """Log ``todo`` over the ranks, in rounds of one step per rank (step ``i`` on rank
    ``i % world``); rank 0 ``record``s each round's steps in step order. Every rank
    calls this; after each round rank 0 tells all whether the sweep goes on.

    Raises:
        StepFailed: on rank 0, the first step that failed (no step after it is
            recorded); on the other ranks, when rank 0 stopped (a step failed, or writing).
    """
    import torch.distributed as dist

    prober = StepProber(job)
    for start in range(0, len(todo), ranks.world):
        mine = start + ranks.rank
        result = prober.run(todo[mine]) if mine < len(todo) else None
        if ranks.rank:
            if result is not None:
                dist.send_object_list([result], dst=0, group=ranks.group)
            stop = ranks.broadcast(None)
            if stop is not None:
                raise StepFailed(None, f"rank 0 stopped the sweep: {stop}", "")
            continue
        results = [result] + [
            _receive(i, ranks) for i in range(1, min(ranks.world, len(todo) - start))
        ]
        _record_round(todo[start : start + len(results)], results, ranks, record)


def _receive(src: int, ranks: Ranks) -> Any:
    import torch.distributed as dist

    box: list[Any] = [None]
    dist.recv_object_list(box, src=src, group=ranks.group)
    return box[0]


def _record_round(steps: Sequence[Any], results: list, ranks: Ranks, record: Record) -> None:
    """Rank 0: record a round's steps in order; tell every rank whether to go on."""
    stop = None
    try:
        for p, result in zip(steps, results, strict=True):
            record(p, unpack(p, result))
    except StepFailed as e:
        stop = e.what
        raise
    except BaseException as e:
        stop = f"{type(e).__name__}: {e}"
        raise
    finally:
        ranks.broadcast(stop)
