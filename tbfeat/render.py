"""Channel grids: plain functions from a feature map to colour-mapped pixels.

The heavy part runs on the tensor's own device under ``torch.no_grad()``: pick the
channels, area-pool each to at most ``tile`` pixels, normalize, quantize to palette
indices and lay the tiles out in a grid. Only the small ``uint8`` grid moves to the CPU,
where it is written as an 8-bit palette PNG whose palette is the colormap (the palette,
its layout and the PNG encoder are in :mod:`tbfeat.pictures`, which needs no torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .pictures import (
    CAM_ALPHA,
    LEVELS,
    NONFINITE_INDEX,
    SEPARATOR_INDEX,
    blend,
    palette,
)

_REL_EPS = 1e-5


def pool_factor(height: int, width: int, tile: int) -> int:
    """The integer area-pooling factor that brings the larger side to at most ``tile``."""
    return max(1, math.ceil(max(height, width) / tile))


def tile_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Size of one tile: the map itself, or area-pooled by an integer factor ``k`` (the
    smallest that makes the larger side at most ``tile``), ``ceil(side / k)``."""
    k = pool_factor(height, width, tile)
    return math.ceil(height / k), math.ceil(width / k)


def select_channels(fmap: torch.Tensor, max_channels: int, how: str = "first") -> torch.Tensor:
    """Channel indices to show for a ``(N, C, H, W)`` map: the first ones or the strongest.

    "strongest" ranks channels by their mean activation over the batch (NaN/Inf ignored),
    largest first.
    """
    channels = fmap.shape[1]
    k = min(channels, max_channels)
    if how == "first":
        return torch.arange(k, device=fmap.device)
    if how != "strongest":
        raise ValueError(f"channels must be 'first' or 'strongest', got {how!r}")
    with torch.no_grad():
        x = fmap.detach().float()
        x = torch.where(torch.isfinite(x), x, torch.zeros((), device=x.device))
        strength = x.mean(dim=(0, 2, 3))
        return strength.topk(k).indices


@torch.no_grad()
def feature_grid(
    fmap: torch.Tensor,
    channels: Sequence[int] | torch.Tensor | None = None,
    *,
    max_channels: int = 32,
    tile: int = 128,
    ncols: int = 8,
    normalize: str = "channel",
) -> torch.Tensor:
    """Lay out channels of a feature map as a grid of palette indices.

    Args:
        fmap: ``(N, C, H, W)`` or ``(C, H, W)`` tensor of any real dtype, on any device.
            It is not modified.
        channels: Channel indices to show, in order; default the first ``max_channels``.
        max_channels: Channels shown when ``channels`` is not given.
        tile: Largest side of a tile; larger maps are average-pooled by the smallest
            integer factor that fits (:func:`tile_size`).
        ncols: Tiles per row; rows have 1 px separators between them.
        normalize: ``"channel"`` (each tile to its own min/max) or ``"stage"`` (one
            min/max over all shown tiles of an image).

    Returns:
        ``uint8`` CPU tensor ``(N, rows*(th+1)-1, cols*(tw+1)-1)`` (``(H', W')`` for 3-D
        input) holding palette indices (see :func:`palette`). Everything up to the small
        quantized tiles runs on ``fmap``'s device (:func:`feature_tiles`).

    Example:
        >>> import torch
        >>> from tbfeat.render import feature_grid
        >>> feature_grid(torch.rand(1, 16, 20, 20), ncols=8).shape
        torch.Size([1, 41, 167])
    """
    squeeze = isinstance(fmap, torch.Tensor) and fmap.dim() == 3
    if not isinstance(ncols, int) or isinstance(ncols, bool) or ncols < 1:
        raise ValueError(f"ncols must be an int >= 1, got {ncols!r}")
    tiles = feature_tiles(
        fmap.unsqueeze(0) if squeeze else fmap,
        channels,
        max_channels=max_channels,
        tile=tile,
        normalize=normalize,
    )
    grid = torch.from_numpy(layout(tiles.cpu().numpy(), ncols))
    return grid[0] if squeeze else grid


@torch.no_grad()
def feature_tiles(
    fmap: torch.Tensor,
    channels: Sequence[int] | torch.Tensor | None = None,
    *,
    max_channels: int = 32,
    tile: int = 128,
    normalize: str = "channel",
) -> torch.Tensor:
    """The device part of :func:`feature_grid`: ``(N, C', th, tw)`` uint8 palette indices.

    Selects the channels (a view when they are the first ones), average-pools by an
    integer factor to at most ``tile`` px and quantizes; ``fmap`` is not modified.
    """
    if not isinstance(fmap, torch.Tensor):
        raise TypeError(f"fmap must be a torch.Tensor, got {type(fmap).__name__}")
    if fmap.dim() != 4:
        raise ValueError(
            f"fmap must have 3 (C, H, W) or 4 (N, C, H, W) dims, got shape {tuple(fmap.shape)}"
        )
    if fmap.is_complex() or fmap.dtype == torch.bool:
        raise TypeError(f"fmap must hold real numbers, got dtype {fmap.dtype}")
    if normalize not in ("channel", "stage"):
        raise ValueError(f"normalize must be 'channel' or 'stage', got {normalize!r}")
    for name, value in (("max_channels", max_channels), ("tile", tile)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    n, c, h, w = fmap.shape
    if channels is None:
        channels = torch.arange(min(c, max_channels))
    else:
        channels = torch.as_tensor(channels, dtype=torch.long).reshape(-1).cpu()
        if channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= c):
            raise ValueError(f"channels must be indices in 0..{c - 1}, got {channels.tolist()[:8]}")
    nshow = int(channels.numel())
    th, tw = tile_size(h, w, tile)
    if n == 0 or nshow == 0 or h == 0 or w == 0:
        return torch.empty((n, nshow, 0, 0), dtype=torch.uint8, device=fmap.device)
    x = fmap.detach()
    if torch.equal(channels, torch.arange(nshow)):
        x = x.narrow(1, 0, nshow)  # the first channels: a view, no copy
    else:
        x = x.index_select(1, channels.to(fmap.device))
    x = x.float()
    k = pool_factor(h, w, tile)
    if k > 1:  # integer windows: a plain, fast average pool (edge windows average what's there)
        x = F.avg_pool2d(x, kernel_size=k, stride=k, ceil_mode=True)
    # a channels-last map stays as it is: min/max over (H, W) of its strided view cost
    # less than the transposing copy into NCHW (4x less on a 64x112x112 map)
    return quantize(x, dims=(2, 3) if normalize == "channel" else (1, 2, 3))


def layout(tiles: np.ndarray, ncols: int = 8) -> np.ndarray:
    """Arrange ``(N, C, th, tw)`` (or ``(C, th, tw)``) uint8 tiles into grids, ``ncols``
    per row, separated by 1 px of :data:`SEPARATOR_INDEX`: ``(N, H, W)`` (or ``(H, W)``)."""
    squeeze = tiles.ndim == 3
    if squeeze:
        tiles = tiles[None]
    n, c, th, tw = tiles.shape
    if c == 0 or th == 0 or tw == 0:
        out = np.empty((n, 0, 0), dtype=np.uint8)
        return out[0] if squeeze else out
    cols = min(ncols, c)
    rows = math.ceil(c / cols)
    canvas = np.full((n, rows, th + 1, cols, tw + 1), SEPARATOR_INDEX, np.uint8)
    cells = canvas[:, :, :th, :, :tw]  # (n, rows, th, cols, tw) view of the tile cells
    full, rest = divmod(c, cols)
    if full:
        cells[:, :full] = (
            tiles[:, : full * cols].reshape(n, full, cols, th, tw).transpose(0, 1, 3, 2, 4)
        )
    if rest:
        cells[:, full, :, :rest] = tiles[:, full * cols :].transpose(0, 2, 1, 3)
    grid = canvas.reshape(n, rows * (th + 1), cols * (tw + 1))[:, :-1, :-1]
    return grid[0] if squeeze else grid


def quantize(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Map float values to palette indices, normalizing by min/max over ``dims``.

    Finite values become ``round((x - lo) / max(hi - lo, eps) * (LEVELS - 1))`` where
    ``lo``/``hi`` are the finite min/max over ``dims`` and ``eps`` is a tiny fraction of
    the values' magnitude (a constant tile maps to index 0); NaN and Inf become
    :data:`NONFINITE_INDEX`. ``x`` is not modified.
    """
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    all_finite = True
    # one check for the common case: NaN/Inf propagate into min/max and so into hi - lo
    if not bool(torch.isfinite(hi - lo).all()):
        all_finite = bool(torch.isfinite(lo).all() and torch.isfinite(hi).all())
        if not all_finite:
            finite = torch.isfinite(x)
            inf = torch.tensor(float("inf"), device=x.device)
            lo = torch.where(finite, x, inf).amin(dim=dims, keepdim=True)
            hi = torch.where(finite, x, -inf).amax(dim=dims, keepdim=True)
            lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
            hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
        if not bool(torch.isfinite(hi - lo).all()):  # range beyond float32 (|x| near 3e38)
            x, lo, hi = x.double(), lo.double(), hi.double()
    eps = torch.maximum(lo.abs(), hi.abs()) * _REL_EPS
    span = torch.maximum(hi - lo, eps).clamp_min(torch.finfo(torch.float32).tiny)
    v = (x - lo).div_(span).clamp_(0.0, 1.0).mul_(LEVELS - 1).round_()  # x itself is untouched
    if not all_finite:
        v = torch.where(finite, v, torch.full_like(v, NONFINITE_INDEX))
    if v.is_cpu:  # whole numbers in 0..255: numpy converts them about 2.5x faster than torch
        return torch.from_numpy(v.detach().numpy().astype(np.uint8))
    return v.to(torch.uint8)


def colorize(indices: np.ndarray | torch.Tensor, cmap: str = "viridis") -> np.ndarray:
    """Turn palette indices from :func:`feature_grid` into an ``(..., 3)`` uint8 RGB array."""
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()
    if not isinstance(indices, np.ndarray) or indices.dtype != np.uint8:
        raise TypeError("indices must be a uint8 numpy array or tensor from feature_grid")
    return palette(cmap)[indices]


@torch.no_grad()
def cam_indices(cam: torch.Tensor, tile: int = 128) -> np.ndarray:
    """A class activation map as tbfeat stores it: ``(h, w)`` uint8 palette indices of
    :data:`CAM_CMAP`, at the stage's own resolution, area-pooled by an integer factor to at
    most ``tile`` px where it is larger (as :func:`feature_tiles` pools a channel), and
    scaled to its own [0, 1] (index ``LEVELS - 1`` is the strongest evidence).

    Example:
        >>> import torch
        >>> cam_indices(torch.tensor([[0.0, 0.5], [1.0, 1.0]])).tolist()
        [[0, 126], [253, 253]]
    """
    if not isinstance(cam, torch.Tensor) or cam.dim() != 2:
        got = tuple(cam.shape) if isinstance(cam, torch.Tensor) else type(cam).__name__
        raise ValueError(f"cam must be an (h, w) tensor, got {got}")
    x = cam.detach().float().cpu().nan_to_num(0.0)[None, None]
    k = pool_factor(x.shape[-2], x.shape[-1], tile)
    if k > 1:
        x = F.avg_pool2d(x, kernel_size=k, stride=k, ceil_mode=True)
    return quantize(x, dims=(2, 3))[0, 0].numpy()


def to_rgb8(image: torch.Tensor) -> np.ndarray:
    """A ``(3, H, W)`` float image in [0, 1] (clipped) as an ``(H, W, 3)`` uint8 array."""
    rgb = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0
    return np.rint(rgb).astype(np.uint8)


@torch.no_grad()
def cam_overlay(
    image: torch.Tensor, cam: torch.Tensor, cmap: str = "inferno", alpha: float = CAM_ALPHA
) -> np.ndarray:
    """A class activation map blended over the image the model saw.

    The image is taken as 8-bit (:func:`to_rgb8`); the map, of any size (a stage's own
    resolution, as tbfeat stores it), is resized to it bilinearly, and each pixel is
    ``(1 - alpha) * image + alpha * cmap(cam)``, rounded to uint8
    (:func:`tbfeat.pictures.blend`). The colormap is perceptually uniform by default, so
    brightness follows the map.

    Args:
        image: ``(3, H, W)`` RGB float tensor in [0, 1] (values outside are clipped).
        cam: ``(h, w)`` map in [0, 1] (tensor or array), as :func:`tbfeat.stage_cams`
            gives per image.
        cmap: A matplotlib colormap name.
        alpha: Weight of the map, in [0, 1].

    Returns:
        An ``(H, W, 3)`` uint8 RGB array; the caller's tensors are not modified.

    Example:
        >>> import torch
        >>> cam_overlay(torch.zeros(3, 2, 2), torch.ones(1, 1), alpha=1.0)[0, 0].tolist()
        [252, 255, 164]
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) tensor, got {got}")
    if not isinstance(cam, (torch.Tensor, np.ndarray)) or cam.ndim != 2 or 0 in cam.shape:
        got = tuple(cam.shape) if isinstance(cam, (torch.Tensor, np.ndarray)) else type(cam)
        raise ValueError(f"cam must be an (h, w) tensor, got {got}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    values = torch.as_tensor(cam).detach().float().cpu().nan_to_num(0.0).numpy()
    if float(values.min()) < -1e-6 or float(values.max()) > 1 + 1e-6:
        raise ValueError("cam must hold values in [0, 1] (stage_cams scales each map so)")
    return blend(to_rgb8(image), values, cmap, alpha)


DRIFT_CMAP = "magma"
"""Colormap of the drift overview: black is a stage that did not change, bright the
largest drift of the run (1 - linear CKA against the step before)."""


def drift_overview(stages: list[str], steps: list[int], values: np.ndarray) -> np.ndarray:
    """One picture of which stages are still learning: a row per stage (labelled, in
    order), a column per step, colour = drift against the step before, with a legend.

    Args:
        stages: Stage keys, one per row of ``values``.
        steps: Steps, one per column.
        values: ``(stages, steps)`` drift in [0, 1]; NaN where a stage has none.

    Returns:
        An ``(H, W, 3)`` uint8 RGB picture, drawn with matplotlib's Agg canvas.

    Example:
        >>> import numpy as np
        >>> drift_overview(["00_Conv"], [1, 2], np.array([[0.1, 0.0]])).shape[2]
        3
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=np.float32)
    if values.shape != (len(stages), len(steps)):
        raise ValueError(f"values must be (stages, steps), got {values.shape}")
    height = 1.2 + 0.18 * len(stages)
    width = 3.2 + min(0.3 * len(steps), 9.0)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.32, 1.0 / height * 0.55, 0.55, 1 - 1.0 / height))
    # the scale ends at the run's largest drift, so the stages still moving stand out
    # even when every drift is small; the legend gives the values
    top = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap=DRIFT_CMAP, vmin=0.0, vmax=max(top, 0.01),
        aspect="auto", interpolation="nearest",
    )  # fmt: skip
    ax.set_yticks(range(len(stages)), stages, fontsize=7)
    every = max(1, len(steps) // 12)
    ax.set_xticks(range(0, len(steps), every), [str(s) for s in steps[::every]], fontsize=7)
    ax.set_xlabel("step", fontsize=8)
    ax.set_title("drift per stage (1 - CKA vs the step before)", fontsize=8)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    bar.ax.tick_params(labelsize=7)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()
