"""Pictures without torch: colormaps and palettes, 8-bit PNG encoding, and class
activation maps drawn over images.

What reads a logdir back (``tbfeat export``, the reader's users) draws with these alone,
so it never loads torch; :mod:`tbfeat.render` turns tensors into what they take.

Palette layout (see :func:`palette`): indices ``0..LEVELS-1`` are the colormap from its
low end to its high end, :data:`NONFINITE_INDEX` marks NaN/Inf pixels and
:data:`SEPARATOR_INDEX` is the 1 px line between tiles.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Callable

import numpy as np

LEVELS = 254
"""Colour levels of a colormap in a grid; a value ``v`` in [0, 1] maps to ``round(v * 253)``."""
NONFINITE_INDEX = 254
SEPARATOR_INDEX = 255
NONFINITE_RGB = (255, 0, 255)
SEPARATOR_RGB = (255, 255, 255)


@functools.lru_cache(maxsize=1)
def colormap_names() -> tuple[str, ...]:
    """Names accepted as ``cmap``: every colormap registered with matplotlib."""
    import matplotlib

    return tuple(sorted(matplotlib.colormaps))


@functools.lru_cache(maxsize=32)
def colormap_lut(cmap: str = "viridis", levels: int = LEVELS) -> np.ndarray:
    """``(levels, 3)`` uint8 RGB table: entry ``i`` is the colormap at ``i / (levels - 1)``."""
    import matplotlib

    if cmap not in colormap_names():
        raise ValueError(f"unknown cmap {cmap!r}; allowed: {', '.join(colormap_names())}")
    rgba = matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, levels))
    lut = np.round(rgba[:, :3] * 255.0).astype(np.uint8)
    lut.setflags(write=False)
    return lut


@functools.lru_cache(maxsize=32)
def palette(cmap: str = "viridis") -> np.ndarray:
    """The full 256-entry ``(256, 3)`` uint8 palette of a grid: colormap, NaN marker, separator."""
    pal = np.empty((256, 3), dtype=np.uint8)
    pal[:LEVELS] = colormap_lut(cmap, LEVELS)
    pal[NONFINITE_INDEX] = NONFINITE_RGB
    pal[SEPARATOR_INDEX] = SEPARATOR_RGB
    pal.setflags(write=False)
    return pal


def encode_png(indices: np.ndarray, cmap: str = "viridis", compress_level: int = 1) -> bytes:
    """Encode a 2-D uint8 index grid as an 8-bit palette PNG with the colormap as palette.

    The PNG is assembled here (``IHDR``, ``PLTE``, one ``IDAT``, ``IEND``; no row
    filters) and deflated by ISA-L (the ``isal`` package) when it is installed, about 7x
    faster than zlib at the same size, else by zlib. The bytes decode to the same pixels
    either way.
    """
    if not isinstance(indices, np.ndarray) or indices.dtype != np.uint8 or indices.ndim != 2:
        raise TypeError("indices must be a 2-D uint8 numpy array from feature_grid")
    height, width = indices.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # filter byte 0 (None) per row
    rows[:, 1:] = indices
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit palette
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"PLTE", palette(cmap).tobytes()),
            _png_chunk(b"IDAT", _deflate()(rows.tobytes(), compress_level)),
            _png_chunk(b"IEND", b""),
        )
    )


def encode_rgb_png(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 RGB array as an 8-bit truecolour PNG (as
    :func:`encode_png`, without a palette)."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.shape[2:] != (3,):
        raise TypeError("rgb must be an (H, W, 3) uint8 numpy array")
    height, width, _ = rgb.shape
    rows = np.zeros((height, 3 * width + 1), dtype=np.uint8)  # filter byte 0 per row
    rows[:, 1:] = rgb.reshape(height, 3 * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", _deflate()(rows.tobytes(), compress_level)),
            _png_chunk(b"IEND", b""),
        )
    )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@functools.lru_cache(maxsize=1)
def _deflate() -> Callable[[bytes, int], bytes]:
    """``compress(data, level)`` into a zlib stream: ISA-L's when available."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib.compress
    return lambda data, level: isal_zlib.compress(data, min(max(level, 0), 3))


CAM_ALPHA = 0.5
"""Weight of the colour-mapped class activation map over the image in :func:`cam_overlay`."""
CAM_CMAP = "inferno"
"""The perceptually uniform colormap of logged class activation maps: dark is no
evidence, bright yellow the strongest."""


def cam_values(indices: np.ndarray) -> np.ndarray:
    """The ``(h, w)`` map in [0, 1] that :func:`cam_indices` stored.

    Example:
        >>> import numpy as np
        >>> cam_values(np.array([[0, 253]], dtype=np.uint8)).tolist()
        [[0.0, 1.0]]
    """
    if not isinstance(indices, np.ndarray) or indices.dtype != np.uint8 or indices.ndim != 2:
        raise TypeError("indices must be a 2-D uint8 numpy array from cam_indices")
    return np.minimum(indices, LEVELS - 1).astype(np.float32) / (LEVELS - 1)


def palette_indices(rgb: np.ndarray, cmap: str) -> np.ndarray:
    """The palette indices of an ``(H, W, 3)`` picture :func:`colorize` drew with
    ``cmap`` (the colours of a writer given to tbfeat, which takes RGB only); a colour
    not in the palette takes the nearest one's index."""
    pal = palette(cmap)[:LEVELS].astype(np.int64)
    flat = rgb.reshape(-1, 3).astype(np.int64)
    weights = np.array([1 << 16, 1 << 8, 1])
    keys, wanted = pal @ weights, flat @ weights
    order = np.argsort(keys, kind="stable")
    pos = np.searchsorted(keys[order], wanted).clip(max=len(keys) - 1)
    found = order[pos]
    missing = np.flatnonzero(keys[found] != wanted)
    if missing.size:  # not drawn by colorize: the nearest colour, a few pixels at a time
        distance = ((flat[missing, None, :] - pal[None]) ** 2).sum(-1)
        found[missing] = distance.argmin(1)
    return found.astype(np.uint8).reshape(rgb.shape[:2])


def resize_bilinear(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An ``(h, w)`` float map resized to ``size`` bilinearly, sampling pixel centres as
    ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)`` does."""
    out = np.asarray(values, dtype=np.float32)
    for axis, n_out in enumerate(size):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5, 0)
        low = np.minimum(src.astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        far = (src - low).astype(np.float32)
        shape = (-1, 1) if axis == 0 else (1, -1)
        near_part = np.take(out, low, axis=axis) * (1 - far).reshape(shape)
        out = near_part + np.take(out, high, axis=axis) * far.reshape(shape)
    return out


def blend(
    rgb: np.ndarray, cam: np.ndarray, cmap: str = CAM_CMAP, alpha: float = CAM_ALPHA
) -> np.ndarray:
    """A map in [0, 1] of any ``(h, w)`` size drawn over an ``(H, W, 3)`` uint8 picture:
    the map resized to the picture (:func:`resize_bilinear`), then each pixel
    ``(1 - alpha) * rgb + alpha * cmap(cam)``, rounded to uint8.

    Example:
        >>> import numpy as np
        >>> blend(np.zeros((2, 2, 3), np.uint8), np.ones((1, 1)), alpha=1.0)[0, 0].tolist()
        [252, 255, 164]
    """
    values = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0)
    values = resize_bilinear(values, rgb.shape[:2])
    lut = colormap_lut(cmap, 256).astype(np.float32)
    colour = lut[np.rint(np.clip(values, 0, 1) * 255).astype(np.int64)]
    mixed = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colour
    return np.rint(mixed).clip(0, 255).astype(np.uint8)
