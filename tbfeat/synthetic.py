"""A small synthetic detection data set, made on the spot: coloured shapes with YOLO labels.

Used by the demo and the tests, so that real trainings run with nothing downloaded.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write

CLASSES = ("square", "disc", "triangle")


def make_shapes_dataset(
    root: str | Path,
    n_train: int = 16,
    n_val: int = 4,
    imgsz: int = 96,
    max_objects: int = 3,
    seed: int = 0,
) -> Path:
    """Write ``images/{train,val}``, ``labels/{train,val}`` and ``data.yaml`` under ``root``.

    Each image holds 1 to ``max_objects`` filled squares, discs or triangles in random
    colours on a noisy background; each label line is ``class cx cy w h`` (normalized).

    Returns:
        The path of ``data.yaml``, ready for ``YOLO(...).train(data=...)``.

    Example:
        >>> import tempfile
        >>> from tbfeat.synthetic import make_shapes_dataset
        >>> make_shapes_dataset(tempfile.mkdtemp(), n_train=2, n_val=1).name
        'data.yaml'
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, boxes = draw_shapes(rng, imgsz, max_objects)
            lines = []
            for cls, x0, y0, x1, y1 in boxes:
                cx, cy = (x0 + x1) / 2 / imgsz, (y0 + y1) / 2 / imgsz
                w, h = (x1 - x0) / imgsz, (y1 - y0) / imgsz
                lines.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            save = functools.partial(image.save, format="JPEG", quality=95)
            atomic_write(root / "images" / split / f"{split}_{i:03d}.jpg", save, durable=False)
            _write_text(root / "labels" / split / f"{split}_{i:03d}.txt", "\n".join(lines) + "\n")
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASSES))
    data = root / "data.yaml"
    _write_text(
        data, f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n"
    )
    return data


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), durable=False)


def draw_shapes(
    rng: np.random.Generator, imgsz: int = 96, max_objects: int = 3
) -> tuple[Any, list[tuple[int, int, int, int, int]]]:
    """One RGB PIL image of 1 to ``max_objects`` shapes, and ``(class, x0, y0, x1, y1)``
    pixel boxes for them."""
    from PIL import Image, ImageDraw

    noise = rng.integers(0, 60, size=(imgsz, imgsz, 3), dtype=np.uint8)
    image = Image.fromarray(noise + np.uint8(rng.integers(0, 100)))
    draw = ImageDraw.Draw(image)
    boxes = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(0, len(CLASSES)))
        size = int(rng.integers(imgsz // 6, imgsz // 2))
        x0 = int(rng.integers(0, imgsz - size))
        y0 = int(rng.integers(0, imgsz - size))
        colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
        if cls == 0:
            draw.rectangle((x0, y0, x0 + size, y0 + size), fill=colour)
        elif cls == 1:
            draw.ellipse((x0, y0, x0 + size, y0 + size), fill=colour)
        else:
            triangle = [(x0, y0 + size), (x0 + size, y0 + size), (x0 + size // 2, y0)]
            draw.polygon(triangle, fill=colour)
        boxes.append((cls, x0, y0, x0 + size, y0 + size))
    return image, boxes


def detection_samples(n: int, imgsz: int = 128, seed: int = 0) -> list[tuple[Any, dict[str, Any]]]:
    """``n`` (image, target) pairs in torchvision's detection format: a ``(3, H, W)`` float
    tensor in [0, 1] and ``{"boxes": (K, 4) float xyxy, "labels": (K,) int64}`` with labels
    starting at 1 (0 is torchvision's background)."""
    import torch

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        image, boxes = draw_shapes(rng, imgsz)
        tensor = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()).float() / 255
        target = {
            "boxes": torch.tensor([b[1:] for b in boxes], dtype=torch.float32),
            "labels": torch.tensor([b[0] + 1 for b in boxes], dtype=torch.int64),
        }
        samples.append((tensor, target))
    return samples
