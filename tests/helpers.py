"""Shared test helpers: read events back with TensorBoard's own reader."""

from __future__ import annotations

import importlib.util
import io
import pickle
import types
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tbfeat import tags as tagging


def is_derived(tag: str) -> bool:
    """A ``drift/``, ``evolution/`` or ``overview/`` tag: computed over several steps."""
    parsed = tagging.parse(tag)
    return parsed is not None and parsed.kind in tagging.DERIVED_KINDS


class Events(EventAccumulator):
    """An EventAccumulator whose ``Tags()`` leaves out the derived ``drift/`` scalars and
    ``evolution/`` images unless asked, and the run metadata (the ``tbfeat`` plugin's
    tensors) unless asked, so tag lists compare with the stages logged."""

    def __init__(self, logdir, derived: bool, metadata: bool = False) -> None:
        super().__init__(
            str(logdir),
            size_guidance={"images": 0, "scalars": 0, "histograms": 0, "tensors": 0},
        )
        self.derived = derived
        self.metadata = metadata

    def Tags(self):  # noqa: N802 - TensorBoard's name
        tags = super().Tags()
        if not self.derived:
            for kind in ("images", "scalars"):
                tags[kind] = [t for t in tags[kind] if not is_derived(t)]
        if not self.metadata:
            try:
                own = self.PluginTagToContent(tagging.PLUGIN_NAME)
            except KeyError:  # no run metadata in these events
                own = {}
            tags["tensors"] = [t for t in tags["tensors"] if t not in own]
        return tags

    def run_info(self) -> list:
        """``(step, RunInfo)`` of each run metadata event, in order."""
        return [(e.step, tagging.read_run(e.tensor_proto)) for e in self.Tensors(tagging.RUN)]


def read_events(logdir, derived: bool = False, metadata: bool = False) -> Events:
    """Load every event under ``logdir`` with no sampling (all steps of every tag)."""
    acc = Events(logdir, derived, metadata)
    acc.Reload()
    return acc


def decode(image_event) -> np.ndarray:
    """An image event's PNG as an (H, W, 3) uint8 RGB array."""
    with Image.open(io.BytesIO(image_event.encoded_image_string)) as im:
        return np.asarray(im.convert("RGB"))


def indices(image_event) -> np.ndarray:
    """A palette PNG image event's (H, W) uint8 palette indices, as stored."""
    with Image.open(io.BytesIO(image_event.encoded_image_string)) as im:
        assert im.mode == "P", im.mode
        return np.asarray(im)


def blended(logdir, tag: str, step: int, run: str = ".") -> np.ndarray:
    """What ``tbfeat export`` draws for a ``cam/`` tag at ``step``, as (H, W, 3) RGB."""
    from tbfeat.export import decode_png, load_run
    from tbfeat.reader import Reader

    return decode_png(load_run(Reader(logdir), run).tags[tag][step])


def numpy_stats(a: np.ndarray) -> dict:
    """The statistics tbfeat logs, computed by numpy in float64."""
    a = a.astype(np.float64).ravel()
    return {
        "mean": a.mean(),
        "std": a.std(),
        "min": a.min(),
        "max": a.max(),
        "zero_fraction": (a == 0).mean(),
        "negative_fraction": (a < 0).mean(),
        "nonfinite_count": 0.0,
    }


TINY_SHAPES = {"00_Conv2d": (8, 32, 40), "01_ReLU": (8, 32, 40), "02_Conv2d": (16, 16, 20),
               "03_ReLU": (16, 16, 20), "04_AdaptiveAvgPool2d": (16, 1, 1)}  # fmt: skip
"""The stages of :func:`tiny_run`'s model with a feature map, and their shapes (C, H, W)."""
TINY_IMAGES = ("bus", "zidane")


def tiny_model(seed: int = 0):
    """A small classifier: two convolutions, pooling, a linear head."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


def tiny_run(logdir, steps: int, seed: int = 0, start: int = 0) -> None:
    """A real run of :func:`tiny_model`: each step perturbs the weights, then logs two
    32x40 probe images (grids, maps, drift) and the "training's" own scalars
    ``metrics/mAP50(B)`` (``step / 100``), ``train/box_loss`` (``1 / (step + 1)``) and
    ``val/box_loss`` (``2 / (step + 1)``)."""
    import torch

    from tbfeat import FeatureLogger

    model = tiny_model(seed)
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 32, 40, generator=gen) for _ in TINY_IMAGES]
    with FeatureLogger(model, logdir, images=images, run="append") as fl:
        for step in range(start, start + steps):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
            fl.log(step=step, names=list(TINY_IMAGES))
            fl.writer.add_scalar("metrics/mAP50(B)", step / 100, step)
            fl.writer.add_scalar("train/box_loss", 1 / (step + 1), step)
            fl.writer.add_scalar("val/box_loss", 2 / (step + 1), step)


def screenshots():
    """scripts/screenshots.py as a module: the TensorBoard server and browser helpers."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "screenshots.py"
    spec = importlib.util.spec_from_file_location("tbfeat_screenshots", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_with_globals(obj, path, names: dict) -> None:
    """``torch.save`` with each object of ``names`` pickled as the global written there
    (``b"module\\nname\\n"``), as a hand-crafted checkpoint would name it."""
    import torch

    class Pickler(pickle._Pickler):
        def save_global(self, obj, name=None):
            if obj in names:
                self.write(pickle.GLOBAL + names[obj])
                self.memoize(obj)
                return
            super().save_global(obj, name)

    module = types.ModuleType("pickle_with_globals")  # torch.save wants a module
    module.Pickler = Pickler
    torch.save(obj, path, pickle_module=module)


TWO_RUNS = {"a": (40, 0), "b": (6, 1)}
"""The dashboard tests' logdir: run ``a`` of 40 steps, run ``b`` of 6 (steps, seed)."""


def two_runs(root: Path) -> Path:
    """:data:`TWO_RUNS` written under ``root`` with :func:`tiny_run`."""
    for run, (steps, seed) in TWO_RUNS.items():
        tiny_run(root / run, steps, seed=seed)
    return root
