"""The recorder: the one owner of what a logger accumulates between steps.

It runs on the worker thread only (:class:`~tbfeat.worker.Worker` calls
:meth:`Recorder.handle` with each message, in order) and owns the statistics of the
steps in progress, the grids encoded so far, the chosen channels, the drift samples and
the run's :class:`~tbfeat.drift.History`. Finished steps go to the
:class:`~tbfeat.writer.EventSink` as one bundle each; the history is saved after each.
A step whose stage outputs differ from the last ones written (their order, shapes or
shown channels) carries the run's metadata (:class:`~tbfeat.tags.RunInfo`) too.

A run starts on the first write to a logdir: it continues the run recorded there when
its first step lies beyond the last one recorded, and otherwise starts a new run: the
old run's steps from that step on are removed from tbfeat's own event files (see
:meth:`~tbfeat.writer.EventSink.drop_steps`), so TensorBoard shows each step once.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import tags
from .capture import CamImages, Capture, EndStep, Scalars, SetLogdir
from .drift import HISTORY_FILE, History, mean_map_cell, sample_rows
from .notes import Notes
from .options import LogOptions
from .pictures import CAM_CMAP
from .render import (
    cam_indices,
    drift_overview,
    feature_tiles,
    layout,
    pool_factor,
    select_channels,
    to_rgb8,
)
from .stats import RunningStats
from .writer import EventSink, StepBundle

RUN_MODES = ("auto", "new", "append")
OVERVIEW_FIRST = 10
"""``overview/drift`` is drawn at each of a recorder's first steps with drift, this many,"""
OVERVIEW_EVERY = 10
"""... then at every this many-th: drawing it takes about 60 ms (matplotlib), the most of
a small model's step; the dashboard's drift map is live at every step."""
MANY_OUTPUTS = 64
"""Stage outputs in one step from which the first step's cost is reported."""
COSTLY_S = 0.25
"""Writer-thread seconds for the first step from which many stages are reported."""


@dataclass
class _Track:
    """Drift samples and evolution cells of one stage output at one step."""

    shape: tuple[int, int]
    rows: list[torch.Tensor] = field(default_factory=list)
    cells: dict[str, Any] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)


@dataclass
class _Seen:
    """What the run metadata says of one stage output at one step."""

    label: str
    type: str
    module: str
    shape: tuple[int, ...]
    images: dict[str, tuple[int, ...]] = field(default_factory=dict)
    grid: tags.Grid | None = None

    def output(self, base: str) -> tags.Output:
        images = tuple(self.images.items())
        return tags.Output(base, self.label, self.type, self.module, self.shape, images, self.grid)


@dataclass
class _Step:
    """What a step in progress has accumulated."""

    outputs: dict[str, _Seen] = field(default_factory=dict)
    """The stage outputs seen, in the order the forward gave them."""
    stats: dict[str, RunningStats] = field(default_factory=dict)
    images: list[Any] = field(default_factory=list)
    tracks: dict[str, _Track] = field(default_factory=dict)
    inputs: dict[str, bytes] = field(default_factory=dict)
    """The digest of each probe image this step writes under ``input/``."""
    busy_s: float = 0.0
    """CPU seconds the writer thread has spent on this step so far."""


def overview_layout(drift_bases: list[str], stats_bases: list[str]) -> dict[str, Any]:
    """The custom scalars layout of a run: one multiline chart of every stage's drift,
    one against the first step, one of each stage's zero fraction and non-finite count.

    Each chart lists its tags as anchored, escaped regular expressions
    (:func:`tbfeat.tags.pattern`): TensorBoard matches a chart's entries from the start of
    a tag only, so ``drift/<base>`` alone would also draw ``drift/<base>_vs_first``."""

    def chart(names: list[str]) -> list[Any]:
        return ["Multiline", [tags.pattern(t) for t in names]]

    charts = {
        "drift vs the step before": chart([tags.drift(b) for b in drift_bases]),
        "drift vs the first step": chart([tags.drift(b, vs_first=True) for b in drift_bases]),
    }
    if stats_bases:
        charts["zero fraction"] = chart([tags.stats(b, "zero_fraction") for b in stats_bases])
        charts["non-finite count"] = chart([tags.stats(b, "nonfinite_count") for b in stats_bases])
    return {"tbfeat overview": charts}


class Recorder:
    """Summarizes captures and writes finished steps; call :meth:`handle` from one thread.

    Args:
        sink: Where finished steps go.
        options: What to summarize and draw.
        run: ``"auto"`` (continue the logdir's run when the first step lies beyond its
            last step, else start a new one), ``"new"`` (always a new run, hiding the whole
            old one) or ``"append"`` (never start a new run).
    """

    def __init__(self, sink: EventSink, options: LogOptions, run: str = "auto") -> None:
        self.sink = sink
        self.options = options
        self.run = run
        self._steps: dict[int, _Step] = {}
        self._channels: dict[str, torch.Tensor] = {}
        self._history: History | None = None
        self._note = Notes()
        self._costed = False
        self._drift_steps = 0  # steps with drift seen, which paces the overview picture
        self._layout: dict[str, Any] | None = None
        self._run_info: tags.RunInfo | None = None
        self._inputs: dict[str, bytes] = {}  # the digest of each input/ picture written

    def handle(self, message: Any) -> None:
        """Handle one message from the forward side (worker thread)."""
        if isinstance(message, Capture):
            self._capture(message)
        elif isinstance(message, CamImages):
            self._cams(message)
        elif isinstance(message, EndStep) and not message.complete:
            self._drop_step(message.step)
        elif isinstance(message, EndStep):
            self._end_step(message.step)
        elif isinstance(message, Scalars):
            self._write(StepBundle(message.step, scalars=list(message.values)))
        elif isinstance(message, SetLogdir):
            self._set_logdir(message.logdir)
        else:
            raise TypeError(f"unknown message {type(message).__name__}")

    def close(self) -> None:
        """Write the steps still open, save the history, close the sink's event file."""
        for step in sorted(self._steps):
            self._end_step(step)
        self._save_history()
        self.sink.close()

    # ------------------------------------------------------------------ captures
    def _capture(self, c: Capture) -> None:
        started = time.thread_time()
        state = self._steps.setdefault(c.step, _Step())
        opts = self.options
        x = c.x
        shape = tuple(x.shape[1:])
        seen = state.outputs.get(c.base)
        if seen is None:
            seen = state.outputs[c.base] = _Seen(c.label, c.module_type, c.module_name, shape)
        seen.images.update(dict.fromkeys(c.names, shape))
        if opts.stats or opts.histograms:
            stats = state.stats.setdefault(c.base, RunningStats(opts.hist_bins))
            self._guard(f"statistics of stage {c.base}", stats.update, x)
        if opts.grids and x.dim() == 4:
            self._guard(f"stage {c.base}", self._grids, c, state)
        if c.track and x.numel():
            self._guard(f"drift and evolution of stage {c.base}", self._track, c, state)
        state.busy_s += time.thread_time() - started

    def _grids(self, c: Capture, state: _Step) -> None:
        opts, x = self.options, c.x
        channels = self._channels.get(c.base)
        if channels is None or int(channels.max()) >= x.shape[1]:
            channels = select_channels(x, opts.max_channels, opts.channels).cpu()
            self._channels[c.base] = channels
        tiles = feature_tiles(x, channels, tile=opts.tile, normalize=opts.normalize)
        _, shown, th, tw = tiles.shape
        if shown and th and tw:
            pool = pool_factor(x.shape[-2], x.shape[-1], opts.tile)
            grid = tags.Grid(tuple(channels.tolist()), min(opts.ncols, shown), (th, tw), pool)
            state.outputs[c.base].grid = grid
        for name, t in zip(c.names, tiles.cpu().numpy(), strict=True):
            if t.size:
                tag = tags.features(c.base, name)
                state.images.append(self.sink.encode_image(tag, layout(t, opts.ncols), opts.cmap))

    def _cams(self, c: CamImages) -> None:
        """``cam/<stage>/<image>``: each map as palette indices at the stage's resolution;
        ``input/<image>``: the image the model saw, when it is new or has changed."""
        started = time.thread_time()
        state = self._steps.setdefault(c.step, _Step())
        for name, image in zip(c.names, c.seen, strict=True):
            self._guard(f"the probe image {name}", self._input, state, name, image)
        for key, maps in c.maps:
            for name, cam in zip(c.names, maps, strict=True):
                self._guard(f"CAM of stage {key}", self._cam, state, tags.cam(key, name), cam)
        state.busy_s += time.thread_time() - started

    def _input(self, state: _Step, name: str, image: torch.Tensor) -> None:
        rgb = to_rgb8(image)
        digest = hashlib.blake2b(repr(rgb.shape).encode() + rgb.tobytes(), digest_size=16).digest()
        if self._inputs.get(name) != digest and name not in state.inputs:
            state.inputs[name] = digest
            state.images.append(self.sink.encode_rgb(tags.input(name), rgb))

    def _cam(self, state: _Step, tag: str, cam: torch.Tensor) -> None:
        indices = cam_indices(cam, self.options.tile)
        state.images.append(self.sink.encode_image(tag, indices, CAM_CMAP))

    def _track(self, c: Capture, state: _Step) -> None:
        opts, x = self.options, c.x
        track = state.tracks.setdefault(c.base, _Track(shape=tuple(x.shape[-2:])))
        if opts.drift:
            # the samples split among the images probed, however many are allowed
            per_image = max(1, opts.drift_samples // (c.images or opts.max_images))
            track.rows.append(sample_rows(x, per_image))
        if opts.evolution:
            for name, cell in zip(c.names, mean_map_cell(x, opts.evolution_cell), strict=True):
                track.cells[name] = cell
        track.names += c.names

    # ------------------------------------------------------------------ steps
    def _drop_step(self, step: int) -> None:
        """An interrupted probe: what it captured of ``step`` is dropped, not written."""
        if self._steps.pop(step, None) is not None:
            self._note(f"interrupted:{step}", f"tbfeat: the probe of step {step} was "
                       "interrupted before it ended; nothing of that step was written",
                       warn=True)  # fmt: skip

    def _end_step(self, step: int) -> None:
        started = time.thread_time()
        state = self._steps.pop(step, None)
        if state is None:
            return
        bundle = StepBundle(step, images=state.images)
        history = self._open(step)
        for base, track in state.tracks.items():
            what = f"drift and evolution of stage {base}"
            self._guard(what, self._drift, history, base, step, track, bundle)
        for base, stats in state.stats.items():
            self._guard(f"statistics of stage {base}", self._summarize, base, stats, bundle)
        if _bases(bundle, "drift"):
            self._guard("the drift overview", self._overview, history, bundle)
        run = tags.RunInfo(tuple(seen.output(base) for base, seen in state.outputs.items()))
        if state.outputs and run != self._run_info:
            bundle.run = run
        if self._write(bundle):  # what did not land is written again with the next step
            self._layout = bundle.layout or self._layout
            self._run_info = bundle.run or self._run_info
            self._inputs.update(state.inputs)
        outputs = len(state.stats.keys() | state.tracks.keys())
        self._report_cost(step, outputs, state.busy_s + time.thread_time() - started)

    def _report_cost(self, step: int, outputs: int, busy_s: float) -> None:
        """Warn once, at the first step, when many stage outputs make logging costly."""
        if self._costed:
            return
        self._costed = True
        if outputs < MANY_OUTPUTS or busy_s < COSTLY_S:
            return
        self._note(
            "many-stages",
            f"tbfeat: step {step} logged {outputs} stage outputs and kept the writer thread "
            f"busy for {busy_s:.2f} s ({1000 * busy_s / outputs:.1f} ms each), every step; "
            "name the stages you need (tbfeat.list_stages(model) shows the model's own), log "
            "less of each (grids=False, histograms=False, drift=False, evolution=False, a "
            "smaller max_channels) or less often (every=N, or a sweep of checkpoints)",
            warn=True,
        )

    def _drift(self, history: History, base: str, step: int, t: _Track, bundle: StepBundle) -> None:
        names = {"before": tags.drift(base), "first": tags.drift(base, vs_first=True)}
        rows = torch.cat(t.rows) if t.rows else None
        drift = history.update(base, step, rows, t.shape, tuple(t.names), t.cells)
        bundle.scalars += [(names[against], value) for against, value in drift.items()]
        strip = history.strip(base) if self.options.evolution else None
        if strip is not None:
            bundle.images.append(
                self.sink.encode_image(tags.evolution(base), strip, self.options.cmap)
            )

    def _overview(self, history: History, bundle: StepBundle) -> None:
        """``overview/drift`` (every stage's drift over the steps, one picture) and, when
        the stages changed, the custom scalars layout that charts them together."""
        overview = history.overview()
        if overview is None:
            return
        self._drift_steps += 1
        n = self._drift_steps
        if n <= OVERVIEW_FIRST or n % OVERVIEW_EVERY == 0:
            picture = drift_overview(*overview)
            bundle.images.append(self.sink.encode_rgb(tags.OVERVIEW, picture))
        layout = overview_layout(overview[0], sorted(_bases(bundle, "stats")))
        if layout != self._layout:
            bundle.layout = layout

    def _summarize(self, base: str, stats: RunningStats, bundle: StepBundle) -> None:
        summary = stats.summary()
        if summary is None:
            return
        if self.options.stats:
            bundle.scalars += [(tags.stats(base, k), v) for k, v in summary.scalars().items()]
        if self.options.histograms and summary.count > 0:
            bundle.histograms.append((tags.activations(base), summary))

    def _write(self, bundle: StepBundle) -> bool:
        """Write a step; False when the storage refused it."""
        if not bundle:
            return True
        history = self._open(bundle.step)
        written = self.sink.write(bundle)
        if written:  # a step the storage refused is not part of the run
            history.saw_step(bundle.step)
        self._save_history()
        return written

    # ------------------------------------------------------------------ the run
    def _open(self, step: int) -> History:
        """The run's history, opening the run (and the writer) on the first write."""
        if self._history is not None:
            return self._history
        folder = self.sink.run_dir()
        path = folder / HISTORY_FILE if folder is not None else None
        history = History.load(path, keep=self.options.evolution_steps)
        last = history.last_step
        if self.run == "new" or (self.run == "auto" and last is not None and step <= last):
            # a new run: the old run's steps from here on (all, for "new") go
            first = None if self.run == "new" else step
            if self.sink.drop_steps(first):
                which = "all the steps" if first is None else f"the steps from {first} on"
                self._note(f"new-run:{folder}", f"tbfeat: a new run in {str(folder)!r} "
                           f"replaces {which} of the run logged there before (run="
                           f"{self.run!r}; run='append' keeps them)", warn=True)  # fmt: skip
            history = History(path, keep=self.options.evolution_steps)
        self._history = history
        return history

    def _set_logdir(self, logdir: str) -> None:
        for step in sorted(self._steps):  # what was captured belongs to the old folder
            self._end_step(step)
        self._layout = self._run_info = None  # the new folder's run gets its own
        self._inputs = {}
        self._drift_steps = 0
        self._save_history()
        self.sink.set_logdir(logdir)
        if self.sink.logdir == logdir:
            self._history = None

    def _save_history(self) -> None:
        # while the storage refuses steps the sink has said so once; the history, kept in
        # memory, is saved with the next step that lands
        if self._history is not None and not self.sink.failing:
            self._guard("the drift history", self._history.save)

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        """Run one part of the work; a failure is said once and skips only that part."""
        try:
            fn(*args)
        except Exception as e:
            self._note(
                f"error:{what}:{type(e).__name__}",
                f"tbfeat: {what} was not logged: {type(e).__name__}: {e}",
                warn=True,
            )


def _bases(bundle: StepBundle, kind: str) -> set[str]:
    """The stage outputs of a step's scalars of one kind (``"stats"``, ``"drift"``)."""
    parsed = (tags.parse(tag) for tag, _ in bundle.scalars)
    return {p.base for p in parsed if p is not None and p.kind == kind and p.base is not None}
