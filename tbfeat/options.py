"""Validated logging options shared by the core and every integration."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

NORMALIZE_CHOICES = ("channel", "stage")
CHANNEL_CHOICES = ("first", "strongest")
CAM_CHOICES = ("layercam", "activation", None)


@dataclass(frozen=True)
class LogOptions:
    """What a :class:`~tbfeat.FeatureLogger` writes for each stage.

    Args:
        max_channels: Channels shown per grid (the first ones, or the strongest; see
            ``channels``). Ultralytics' old ``visualize=True`` showed 32.
        max_images: Images logged per step; later images of the same step are ignored.
        tile: Largest side of one channel tile in pixels. Bigger maps are area-pooled
            on the model's device before anything moves to the CPU.
        ncols: Tiles per grid row.
        cmap: Name of a matplotlib colormap (``"viridis"``, ``"gray"``, ``"magma"``, ...).
        normalize: ``"channel"`` scales every tile to its own min/max; ``"stage"`` uses
            one min/max for all tiles of the grid, so channel strengths compare.
        channels: ``"first"`` shows channels ``0..max_channels-1``; ``"strongest"``
            picks the channels with the largest mean activation at the first logged
            step and keeps those indices at every later step.
        grids: Write channel grids (``features/...``).
        histograms: Write activation histograms (``activations/...``).
        stats: Write statistics scalars (``stats/...``).
        hist_bins: Buckets of each activation histogram.
        drift: Write ``drift/<NN>_<Type>`` (1 - linear CKA against the previous logged step)
            and ``drift/<NN>_<Type>_vs_first`` (against the first), from a fixed sample of
            ``drift_samples`` positions of the probe images.
        evolution: Write ``evolution/<NN>_<Type>``: one picture of the stage's channel-mean
            map per probe image (rows) and logged step (columns, the last
            ``evolution_steps``), each cell at most ``evolution_cell`` px.
        predictions: Also log the ``boxes``, ``scores``, ``labels`` (``masks``,
            ``keypoints``) tensors that a chosen detection head returns; off, they are
            left out (they are predictions, not activations).
        cam: Class activation maps of each stage for the probe images (``log()``, the
            training integrations, ``tbfeat sweep``), written as ``cam/<NN>_<Type>/<image>``:
            ``"layercam"`` (gradients of the predictions' class scores; one extra forward
            and one backward per explained prediction), ``"activation"`` (the channel
            mean of ``|activation|``, no gradient) or ``None`` (off).
        cam_target: What the maps explain: ``None`` (a classifier's top-1 class; every
            class of a detector), a class id or a tuple of class ids, or a function of
            the model's output giving one score per image.
        cam_conf: A detector's predictions at or above this class probability are
            explained (the single best one where none is).
        cam_topk: At most this many predictions explained per image (one backward each).
        cam_captures: Also compute maps for the forwards a ``with`` block captures
            (predict, val): an extra forward and backward per batch, so off by default.
        every: Training integrations log every ``every``-th epoch (and the last).
        imgsz: Side of the square that integrations letterbox probe images to (Ultralytics);
            ``None`` for the model's own training size.

    Example:
        >>> from tbfeat import LogOptions
        >>> LogOptions(max_channels=16, cmap="magma").max_channels
        16
    """

    max_channels: int = 32
    max_images: int = 4
    tile: int = 128
    ncols: int = 8
    cmap: str = "viridis"
    normalize: str = "channel"
    channels: str = "first"
    grids: bool = True
    histograms: bool = True
    stats: bool = True
    hist_bins: int = 64
    drift: bool = True
    evolution: bool = True
    drift_samples: int = 256
    evolution_steps: int = 32
    evolution_cell: int = 16
    predictions: bool = False
    cam: str | None = "layercam"
    cam_target: Any = None
    cam_conf: float = 0.25
    cam_topk: int = 4
    cam_captures: bool = False
    every: int = 1
    imgsz: int | None = None

    def __post_init__(self) -> None:
        if self.imgsz is not None and (
            isinstance(self.imgsz, bool) or not isinstance(self.imgsz, int) or self.imgsz < 1
        ):
            raise ValueError(f"imgsz must be None or an int >= 1, got {self.imgsz!r}")
        ints = ("max_channels", "max_images", "tile", "ncols", "hist_bins", "every", "cam_topk")
        for name in (*ints, "drift_samples", "evolution_steps", "evolution_cell"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= 1, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        for name in ("grids", "histograms", "stats", "drift", "evolution", "predictions"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if not isinstance(self.cam_captures, bool):
            raise TypeError(f"cam_captures must be True or False, got {self.cam_captures!r}")
        _check_choice("normalize", self.normalize, NORMALIZE_CHOICES)
        _check_choice("channels", self.channels, CHANNEL_CHOICES)
        _check_choice("cam", self.cam, CAM_CHOICES)
        self.cam_target_spec()  # raises for a bad cam_target or cam_conf
        if not isinstance(self.cmap, str):
            raise TypeError(f"cmap must be a colormap name, got {self.cmap!r}")
        from .pictures import colormap_names  # deferred: matplotlib loads only when needed

        names = colormap_names()
        if self.cmap not in names:
            raise ValueError(
                f"unknown cmap {self.cmap!r}{did_you_mean(self.cmap, names)}; "
                "allowed: any matplotlib colormap name, e.g. "
                "'viridis', 'magma', 'inferno', 'plasma', 'cividis', 'gray', 'turbo'"
            )

    def cam_target_spec(self) -> Any:
        """The :class:`tbfeat.targets.CamTarget` of ``cam_target``, ``cam_conf`` and
        ``cam_topk``."""
        from .targets import as_target

        try:
            return as_target(self.cam_target, self.cam_conf, self.cam_topk)
        except (TypeError, ValueError) as e:
            message = str(e)
            for name in ("target", "conf", "topk", "class ids"):
                if message.startswith(name):
                    message = f"cam_{message}" if name != "class ids" else f"cam_target {message}"
                    break
            raise type(e)(message) from None

    @classmethod
    def from_kwargs(cls, options: LogOptions | None = None, **kwargs: object) -> LogOptions:
        """Build options from an optional base and keyword overrides, naming unknown keys."""
        if options is not None and not isinstance(options, LogOptions):
            raise TypeError(f"options must be a LogOptions, got {type(options).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in fields:
                raise TypeError(
                    f"unknown option {key!r}{did_you_mean(key, fields)}; "
                    f"allowed: {', '.join(fields)}"
                )
        base = options if options is not None else cls()
        return dataclasses.replace(base, **kwargs) if kwargs else base


STEP_MIN, STEP_MAX = -(2**63), 2**63 - 1
"""The steps an event can hold (TensorBoard's ``int64``)."""


def check_step(value: Any) -> int:
    """A step as given: an int (a bool is refused) within TensorBoard's ``int64`` range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"step must be an int, got {value!r}")
    if not STEP_MIN <= value <= STEP_MAX:
        raise ValueError(
            f"step must be within the int64 range {STEP_MIN}..{STEP_MAX}, got {value!r}"
        )
    return value


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        )


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to ``value``, else ``""``: the
    hint every error about an unknown name ends with."""
    import difflib

    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
