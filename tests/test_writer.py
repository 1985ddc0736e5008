"""The event sink: fast checksums, background writing, writer ownership."""

import os

import numpy as np
import pytest
import torch
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_crc
from torch import nn

from tbfeat import FeatureLogger, _crc
from tbfeat.writer import EventSink, StepBundle

from .helpers import read_events


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 100_003])
def test_fast_checksum_equals_tensorboards_own(size):
    data = os.urandom(size)
    assert _crc.masked_crc32c(data) == tb_crc(data)


def test_fast_checksum_is_installed_in_tensorboards_record_writer():
    from tensorboard.summary.writer import record_writer

    EventSink()
    assert record_writer.masked_crc32c is _crc.masked_crc32c


def test_log_returns_before_writing_and_flush_waits_for_the_disk(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    logger = FeatureLogger(model, logdir=tmp_path)
    for step in range(6):  # more steps than the queue holds: submit waits, nothing is dropped
        logger.log(torch.rand(2, 3, 16, 16), step=step)
    logger.flush()
    assert logger.flushed_step == 5
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("features/00_Conv2d/1")] == list(range(6))
    assert [e.step for e in acc.Scalars("stats/00_Conv2d/max")] == list(range(6))
    logger.close()


def test_one_event_per_step_holds_all_of_its_values(tmp_path):
    sink = EventSink(tmp_path)
    grid = np.zeros((3, 5), np.uint8)
    images = [sink.encode_image(tag, grid) for tag in ("a/0", "b/0")]
    sink.write(StepBundle(step=4, images=images, scalars=[("s", 2.5)]))
    assert sink.flushed_step == 4 and sink.steps_written == 1
    sink.close()
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (path,) = tmp_path.glob("events.out.tfevents.*")
    events = [e for e in EventFileLoader(str(path)).Load() if e.HasField("summary")]
    assert len(events) == 1 and events[0].step == 4
    assert [v.tag for v in events[0].summary.value] == ["a/0", "b/0", "s"]


def test_a_writer_without_raw_access_gets_the_public_api(tmp_path):
    calls = []

    class Minimal:
        def add_image(self, tag, img, global_step=None, dataformats="CHW"):
            calls.append(("image", tag, img.dtype, img.shape, dataformats, global_step))

        def add_scalar(self, tag, value, global_step=None):
            calls.append(("scalar", tag, value, global_step))

        def add_histogram_raw(self, tag, global_step=None, **kwargs):
            calls.append(("histogram", tag, kwargs["num"], global_step))

        def flush(self):
            calls.append(("flush",))

    model = nn.Sequential(nn.Identity())
    logger = FeatureLogger(model, writer=Minimal())
    logger.log(torch.ones(1, 1, 2, 3), step=9)
    logger.close()
    assert ("image", "features/00_Identity/0", np.uint8, (2, 3, 3), "HWC", 9) in calls
    assert ("scalar", "stats/00_Identity/mean", 1.0, 9) in calls
    assert ("histogram", "activations/00_Identity", 6, 9) in calls
    assert calls[-1] == ("flush",)


def test_write_errors_warn_once_and_later_steps_still_land(tmp_path, monkeypatch):
    import tbfeat.pictures as render

    real = render.encode_png
    state = {"fail": True}

    def flaky(indices, cmap="viridis", compress_level=1):
        if state["fail"]:
            raise OSError("disk hiccup")
        return real(indices, cmap, compress_level)

    monkeypatch.setattr(render, "encode_png", flaky)
    model = nn.Sequential(nn.Identity())
    logger = FeatureLogger(model, logdir=tmp_path)
    with pytest.warns(RuntimeWarning, match="disk hiccup"):
        logger.log(torch.rand(1, 1, 4, 4), step=0)
        logger.flush()
    state["fail"] = False
    logger.log(torch.rand(1, 1, 4, 4), step=1)
    logger.close()
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("features/00_Identity/0")] == [1]
    assert [e.step for e in acc.Scalars("stats/00_Identity/mean")] == [0, 1]


def test_event_files_of_one_process_sort_in_the_order_they_were_opened(tmp_path):
    """TensorBoard reads a folder's event files in name order: the 10th file one process
    opens within a second must not sort before the 9th."""
    from tbfeat.writer import EventFile

    files = [EventFile(tmp_path) for _ in range(12)]
    for f in files:
        f.close()
    opened = [f.path.name for f in files]
    assert sorted(opened) == opened
