"""Probe inputs: image files, PIL images, arrays and tensors to ``(C, H, W)`` float tensors."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .stages import sanitize

ImageLike = Any
"""A path, a ``PIL.Image.Image``, an ``(H, W[, C])`` array or a ``([N,] C, H, W)`` tensor."""


CHANNEL_ORDERS = ("RGB", "BGR")
"""How the channels of an ``(H, W, 3)`` or ``(H, W, 4)`` array are ordered."""


def load_image(
    image: ImageLike, *, channel_order: str = "RGB", exif_orientation: bool = False
) -> torch.Tensor:
    """One image as an RGB ``(3, H, W)`` float32 tensor in [0, 1] (tensors pass through as
    given): tbfeat's one image reader, for every model.

    uint8 values are divided by 255, uint16 values by 65535, floats are taken as [0, 1].
    Grayscale, RGBA, palette and 16-bit images are converted to RGB, not rejected.

    Args:
        image: A path, a PIL image, an ``(H, W[, C])`` array or a ``(C, H, W)`` tensor.
        channel_order: The order of an array's colour channels, ``"RGB"`` or ``"BGR"``
            (OpenCV's order; Ultralytics takes arrays so). Paths, PIL images and tensors
            are RGB.
        exif_orientation: Turn an image file upright by its EXIF orientation, as OpenCV
            reads files.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file that is not a readable image, an array of the wrong shape, an
            unknown ``channel_order``.
        TypeError: anything that is not an image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {str(path)!r}")
        try:
            with Image.open(path) as im:
                im.load()
                return _from_pil(ImageOps.exif_transpose(im) if exif_orientation else im)
        except (UnidentifiedImageError, OSError, ImportError) as e:
            # Ultralytics' patched Image.open tries a HEIF plugin on any file PIL cannot
            # identify: without the plugin, PIL's own reason is the error's context
            cause = e.__context__ if isinstance(e, ImportError) and e.__context__ else e
            raise ValueError(f"cannot read image {str(path)!r}: {cause}") from None
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        return _from_array(image, reverse=channel_order == "BGR")
    if isinstance(image, torch.Tensor):
        _check_tensor(image, (3,))
        return image
    raise TypeError(
        "an image must be a path, a PIL image, a numpy array or a tensor, "
        f"got {type(image).__name__}"
    )


def to_tensors(
    inputs: ImageLike | Sequence[ImageLike],
    names: Sequence[str] | None = None,
    *,
    channel_order: str = "RGB",
    exif_orientation: bool = False,
) -> tuple[list[torch.Tensor], list[str]]:
    """Normalize probe inputs to a list of ``(C, H, W)`` tensors and one name per image,
    each read by :func:`load_image` (``channel_order`` and ``exif_orientation`` as there).

    A ``(N, C, H, W)`` tensor gives ``N`` images. Names default to the file stem for paths
    (files of the same stem in other folders: with as many of their folders as tell them
    apart, see :func:`path_names`) and to the image's position otherwise; they are
    sanitized for use in tags.
    """
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
        _check_tensor(inputs, (4,))
        items: list[Any] = list(inputs.unbind(0))
    elif isinstance(inputs, (list, tuple)):
        items = list(inputs)
    else:
        items = [inputs]
    if not items:
        raise ValueError("inputs is empty; pass at least one image")
    read = {"channel_order": channel_order, "exif_orientation": exif_orientation}
    tensors = [load_image(item, **read) for item in items]
    if names is None:
        names = path_names(items)
    names = [sanitize(n) for n in names]
    if len(names) != len(tensors):
        raise ValueError(f"got {len(names)} names for {len(tensors)} images")
    return tensors, unique_names(names)


def path_names(items: Sequence[Any]) -> list[str]:
    """The default name of each item: a path's file stem, else its position. Paths that
    share a stem get the folders above it, as many as tell them apart (``val/bus.jpg``,
    ``test/bus.jpg``: ``val_bus``, ``test_bus``), so a name follows its file whatever
    the order they are given in.

    Example:
        >>> path_names(["a/x/bus.jpg", "b/x/bus.jpg", "c/zidane.jpg", None])
        ['a_x_bus', 'b_x_bus', 'zidane', '3']
    """
    parts = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            path = Path(os.fspath(item))
            parts.append(tuple(p for p in path.with_suffix("").parts if p != path.anchor))
        else:
            parts.append(None)
    depth = [1] * len(items)

    def name(i: int) -> str:
        got = parts[i]
        return str(i) if got is None else "_".join(got[-depth[i] :])

    while True:
        groups: dict[str, list[int]] = {}
        for i, got in enumerate(parts):
            if got is not None:
                groups.setdefault(name(i), []).append(i)
        deeper = [i for group in groups.values() if len({parts[j] for j in group}) > 1
                  for i in group if depth[i] < len(parts[i])]  # fmt: skip
        if not deeper:
            return [name(i) for i in range(len(items))]
        for i in deeper:
            depth[i] += 1


def unique_names(names: Iterable[str], taken: Iterable[str] = ()) -> list[str]:
    """``names`` made unique among themselves and ``taken``: a repeat gets the first free
    ``_1``, ``_2``, ... suffix."""
    used = set(taken)
    out = []
    for base in names:
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        out.append(name)
    return out


def _check_tensor(t: torch.Tensor, dims: tuple[int, ...]) -> None:
    if t.dim() not in dims:
        raise ValueError(
            "an image tensor must be (C, H, W), or (N, C, H, W) for a batch, "
            f"got shape {tuple(t.shape)}"
        )
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"an image tensor must hold real numbers, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"an image tensor must not be empty, got shape {tuple(t.shape)}")


def _from_pil(im: Any) -> torch.Tensor:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).astype(np.float32) / 65535.0
        arr = np.clip(arr, 0.0, 1.0)
        return torch.from_numpy(np.repeat(arr[None], 3, axis=0))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return _from_array(np.asarray(im))


def _from_array(arr: np.ndarray, reverse: bool = False) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.size == 0:
        raise ValueError(
            f"an image array must be (H, W) or (H, W, C) with C in 1, 3, 4, got shape {arr.shape}"
        )
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float32)
    else:
        raise TypeError(f"an image array must be uint8, uint16 or float, got dtype {arr.dtype}")
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    elif x.shape[2] == 4:
        x = x[:, :, :3]
    if reverse:  # BGR to RGB
        x = x[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
