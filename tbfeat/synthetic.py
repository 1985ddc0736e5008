"""A small synthetic detection data set, made on the spot: coloured shapes with YOLO labels.

Used by the demo and the tests, so that real trainings run with nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
    from PIL import Image, ImageDraw

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            noise = rng.integers(0, 60, size=(imgsz, imgsz, 3), dtype=np.uint8)
            image = Image.fromarray(noise + np.uint8(rng.integers(0, 100)))
            draw = ImageDraw.Draw(image)
            lines = []
            for _ in range(int(rng.integers(1, max_objects + 1))):
                cls = int(rng.integers(0, len(CLASSES)))
                size = int(rng.integers(imgsz // 6, imgsz // 2))
                x0 = int(rng.integers(0, imgsz - size))
                y0 = int(rng.integers(0, imgsz - size))
                box = (x0, y0, x0 + size, y0 + size)
                colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
                if cls == 0:
                    draw.rectangle(box, fill=colour)
                elif cls == 1:
                    draw.ellipse(box, fill=colour)
                else:
                    draw.polygon(
                        [(x0, y0 + size), (x0 + size, y0 + size), (x0 + size // 2, y0)], fill=colour
                    )
                cx, cy = (x0 + size / 2) / imgsz, (y0 + size / 2) / imgsz
                lines.append(f"{cls} {cx:.6f} {cy:.6f} {size / imgsz:.6f} {size / imgsz:.6f}")
            image.save(root / "images" / split / f"{split}_{i:03d}.jpg", quality=95)
            (root / "labels" / split / f"{split}_{i:03d}.txt").write_text("\n".join(lines) + "\n")
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASSES))
    data = root / "data.yaml"
    data.write_text(
        f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n"
    )
    return data
