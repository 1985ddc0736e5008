"""Shared test helpers: read events back with TensorBoard's own reader."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_events(logdir) -> EventAccumulator:
    """Load every event under ``logdir`` with no sampling (all steps of every tag)."""
    acc = EventAccumulator(
        str(logdir),
        size_guidance={"images": 0, "scalars": 0, "histograms": 0, "tensors": 0},
    )
    acc.Reload()
    return acc


def decode(image_event) -> np.ndarray:
    """An image event's PNG as an (H, W, 3) uint8 RGB array."""
    with Image.open(io.BytesIO(image_event.encoded_image_string)) as im:
        return np.asarray(im.convert("RGB"))
