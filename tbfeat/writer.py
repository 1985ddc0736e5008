"""Where events go: a TensorBoard ``SummaryWriter`` created lazily, or the user's own.

Ownership follows Lightning's TensorBoardLogger: a writer this module creates is closed by
:meth:`EventSink.close`; a writer passed in is flushed, never closed. Only the process of
global rank 0 writes.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def global_rank() -> int:
    """This process's global rank: ``torch.distributed`` if initialized, else ``RANK`` etc."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(var)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


class EventSink:
    """Writes images, histograms and scalars to a TensorBoard event file.

    Args:
        logdir: Directory for a writer created on first use (``SummaryWriter(logdir)``).
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (or any object with its
            ``add_scalar``/``add_histogram_raw``/``add_image``/``flush`` methods) to use
            instead; it is flushed, never closed.
    """

    def __init__(self, logdir: str | os.PathLike | None = None, writer: Any = None) -> None:
        if writer is not None and logdir is not None:
            raise ValueError("pass either logdir or writer, not both")
        if writer is not None:
            missing = [
                m
                for m in ("add_scalar", "add_histogram_raw", "add_image", "flush")
                if not callable(getattr(writer, m, None))
            ]
            if missing:
                raise TypeError(
                    f"writer must be a SummaryWriter; {type(writer).__name__} lacks "
                    f"{', '.join(missing)}"
                )
        self.logdir = os.fspath(logdir) if logdir is not None else None
        self._writer = writer
        self._owns = writer is None
        self._auto = writer is None and logdir is None
        self.enabled = global_rank() == 0

    @property
    def writer(self) -> Any:
        """The SummaryWriter, created on first use."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.logdir)
        return self._writer

    def use_default_logdir(self, logdir: str | os.PathLike) -> None:
        """Point a sink that was given neither ``logdir`` nor ``writer`` at ``logdir``.

        Integrations call this with the framework's own run folder (an Ultralytics
        trainer's ``save_dir``). A writer already open elsewhere is closed first.
        """
        if not self._auto:
            return
        logdir = os.fspath(logdir)
        if logdir == self.logdir:
            return
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.logdir = logdir

    @property
    def created(self) -> bool:
        return self._writer is not None

    def image(self, tag: str, indices: np.ndarray, cmap: str, step: int) -> None:
        """Write a palette-index grid from :func:`~tbfeat.render.feature_grid` as an image.

        The grid is encoded as an 8-bit palette PNG and written as is (TensorBoard serves
        the encoded bytes to the browser). Writers without torch's raw file-writer access
        get the RGB pixels through ``add_image`` (``uint8``, so nothing is rescaled).
        """
        from .render import colorize, encode_png

        writer = self.writer
        get_file_writer = getattr(writer, "_get_file_writer", None)
        if get_file_writer is None:
            writer.add_image(tag, colorize(indices, cmap), global_step=step, dataformats="HWC")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        height, width = indices.shape
        image = Summary.Image(
            height=height, width=width, colorspace=3, encoded_image_string=encode_png(indices, cmap)
        )
        get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def histogram(self, tag: str, stats: Any, step: int) -> None:
        """Write a raw histogram from a :class:`~tbfeat.stats.StatsSummary`."""
        edges, counts = stats.hist_edges, stats.hist_counts
        self.writer.add_histogram_raw(
            tag,
            min=stats.min,
            max=stats.max,
            num=stats.count,
            sum=stats.sum,
            sum_squares=stats.sum_squares,
            bucket_limits=np.asarray(edges[1:], dtype=np.float64).tolist(),
            bucket_counts=np.asarray(counts, dtype=np.int64).tolist(),
            global_step=step,
        )

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush; close the writer if this sink created it. Safe to call twice."""
        if self._writer is None:
            return
        if self._owns:
            self._writer.close()
            self._writer = None
        else:
            self._writer.flush()
