"""tbfeat.reader: the same records as TensorBoard's reader, read one at a time, on event
files that are damaged, cut short, still being written, or not files at all."""

import os
import socket
import struct
import threading
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tbfeat import FeatureLogger
from tbfeat import tags as tagging
from tbfeat._crc import masked_crc32c
from tbfeat.reader import NotLogged, Reader
from tbfeat.records import MAX_RECORD_BYTES

from .helpers import read_events

X = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
KINDS = {"image": "images", "scalar": "scalars", "histogram": "histograms", "tensor": "tensors"}


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))  # fmt: skip


def nudge(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        model[0].weight.add_(0.3 * torch.randn(model[0].weight.shape, generator=g))


def log_steps(logdir=None, writer=None, steps=(1, 2, 3)) -> None:
    model = net()
    logger = FeatureLogger(model, logdir=logdir, writer=writer, max_channels=4)
    for step in steps:
        logger.log(X, step=step)
        nudge(model, step)
    logger.close()


def tensorboard_values(logdir) -> dict:
    """``(kind, tag, step) -> value`` as TensorBoard's reader gives them (the last event
    of a step wins)."""
    acc = read_events(logdir, derived=True, metadata=True)
    found = {}
    for kind, tb in KINDS.items():
        for tag in acc.Tags()[tb]:
            for e in getattr(acc, tb.capitalize())(tag):
                found[kind, tag, e.step] = e
    return found


def assert_same_as_tensorboard(logdir, run="."):
    reader = Reader(logdir)
    assert reader.runs() == [run]
    theirs = tensorboard_values(Path(logdir) / run)
    ours = {(info.kind, tag, step) for tag, info in reader.tags(run).items()
            for step in info.steps}  # fmt: skip
    assert ours == set(theirs)
    kinds = {kind for kind, _, _ in ours}
    assert {"image", "scalar", "histogram"} <= kinds
    for (kind, tag, step), e in theirs.items():
        if kind == "image":
            assert reader.image(run, tag, step) == e.encoded_image_string
        elif kind == "scalar":
            assert reader.scalar(run, tag, step) == pytest.approx(e.value, rel=0, abs=0)
        elif kind == "histogram":
            histo = reader.value(run, tag, step).histo
            assert list(histo.bucket) == e.histogram_value.bucket
            assert histo.sum == e.histogram_value.sum
        else:
            assert reader.value(run, tag, step).tensor == e.tensor_proto
    return reader


def frame(payload: bytes) -> bytes:
    """One TFRecord as TensorBoard writes it."""
    header = struct.pack("<Q", len(payload))
    crc = struct.pack("<I", masked_crc32c(header))
    return header + crc + payload + struct.pack("<I", masked_crc32c(payload))


def scalar_event(step: int, value: float, tag: str = "loss") -> bytes:
    e = Event(step=step, wall_time=float(step))
    e.summary.value.add(tag=tag, simple_value=value)
    return e.SerializeToString()


def write_events(path: Path, steps) -> None:
    with open(path, "wb") as f:
        writer = RecordWriter(f)
        writer.write(Event(wall_time=0.0, file_version="brain.Event:2").SerializeToString())
        for step in steps:
            writer.write(scalar_event(step, step / 2))


def tbfeat_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("tbfeat: ")]


# ------------------------------------------------------------------ the same as TensorBoard
def test_a_logged_run_reads_the_same_as_with_tensorboard(tmp_path):
    log_steps(tmp_path / "run")
    reader = assert_same_as_tensorboard(tmp_path / "run")
    tags = reader.tags(".")
    assert tags[tagging.RUN].kind == "tensor" and tags[tagging.RUN].plugin == "tbfeat"
    logged = read_events(tmp_path / "run", metadata=True).run_info()
    assert reader.run_info(".") == logged[-1][1] and reader.run_info(".", 1) == logged[0][1]
    assert reader.run_info(".").order[:3] == ("00_Conv2d", "01_ReLU", "02_Conv2d")
    assert reader.run_info(".", step=0) is None
    images = [t for t, i in tags.items() if i.kind == "image"]
    assert {tagging.parse(t).kind for t in images} >= {"features", "cam", "evolution"}
    assert all(i.steps == (1, 2, 3) for t, i in tags.items() if t.startswith("features"))


def test_a_run_written_through_a_summary_writer_reads_the_same(tmp_path):
    writer = SummaryWriter(tmp_path / "given")
    log_steps(writer=writer)
    writer.add_scalar("train/loss", 0.25, 2)
    writer.close()
    reader = assert_same_as_tensorboard(tmp_path / "given")
    assert reader.scalar(".", "train/loss", 2) == 0.25


def test_runs_merge_their_files_in_name_order_and_the_later_wins(tmp_path):
    (tmp_path / "a").mkdir()
    write_events(tmp_path / "a" / "events.out.tfevents.1", [1, 2, 3])
    with open(tmp_path / "a" / "events.out.tfevents.2", "wb") as f:
        RecordWriter(f).write(scalar_event(2, 9.0))
    (tmp_path / "b" / "c").mkdir(parents=True)
    write_events(tmp_path / "b" / "c" / "events.out.tfevents.1", [5])
    reader = Reader(tmp_path)
    assert reader.runs() == ["a", "b/c"]
    assert [reader.scalar("a", "loss", s) for s in (1, 2, 3)] == [0.5, 9.0, 1.5]
    assert tensorboard_values(tmp_path / "a")["scalar", "loss", 2].value == 9.0
    with pytest.raises(NotLogged, match="no step 4"):
        reader.scalar("a", "loss", 4)
    with pytest.raises(NotLogged, match="no run 'x'"):
        reader.steps("x", "loss")


# ------------------------------------------------------------------ damage
def test_a_bad_crc_ends_that_file_with_one_warning_and_other_files_are_read(tmp_path):
    for run in ("bad", "good"):
        (tmp_path / run).mkdir()
        write_events(tmp_path / run / "events.out.tfevents.1", range(1, 6))
    path = tmp_path / "bad" / "events.out.tfevents.1"
    data = bytearray(path.read_bytes())
    sizes = [16 + len(scalar_event(s, s / 2)) for s in range(1, 6)]
    header = 16 + len(Event(wall_time=0.0, file_version="brain.Event:2").SerializeToString())
    at = header + sizes[0] + sizes[1]  # the record of step 3
    data[at + 14] ^= 0xFF  # a byte of its payload
    path.write_bytes(bytes(data))
    reader = Reader(tmp_path)
    with pytest.warns(RuntimeWarning) as record:
        reader.refresh()
        reader.refresh()
    said = tbfeat_warnings(record)
    assert len(said) == 1 and str(path) in said[0] and f"byte {at}" in said[0], said
    assert reader.steps("bad", "loss") == [1, 2]
    assert reader.steps("good", "loss") == [1, 2, 3, 4, 5]


def test_a_record_cut_short_is_read_once_it_is_whole(tmp_path):
    path = tmp_path / "events.out.tfevents.1"
    write_events(path, [1, 2])
    last = frame(scalar_event(3, 7.0))
    for cut in (5, 12, 20, len(last) - 1):
        with open(path, "ab") as f:
            f.write(last[:cut])
        reader = Reader(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert reader.steps(".", "loss") == [1, 2]
        with open(path, "ab") as f:
            f.write(last[cut:])
        reader.refresh()
        assert reader.steps(".", "loss") == [1, 2, 3]
        assert reader.scalar(".", "loss", 3) == 7.0
        write_events(path, [1, 2])


def test_a_huge_length_is_refused_without_allocating_it(tmp_path):
    for run, length in (("a", 2**63), ("b", MAX_RECORD_BYTES + 1)):
        path = tmp_path / run / "events.out.tfevents.1"
        path.parent.mkdir()
        write_events(path, [1])
        header = struct.pack("<Q", length)
        with open(path, "ab") as f:
            f.write(header + struct.pack("<I", masked_crc32c(header)) + b"\0" * 64)
    reader = Reader(tmp_path)
    tracemalloc.start()
    try:
        with pytest.warns(RuntimeWarning) as record:
            reader.refresh()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**24
    said = tbfeat_warnings(record)
    assert len(said) == 2
    for run, length in (("a", 2**63), ("b", MAX_RECORD_BYTES + 1)):
        assert any(f"{tmp_path / run}" in w and f"a length of {length} bytes" in w
                   for w in said), said  # fmt: skip
        assert reader.steps(run, "loss") == [1]


# ------------------------------------------------------------------ files being written
def test_a_run_being_logged_shows_each_new_step_and_never_half_a_record(tmp_path):
    model = net()
    logger = FeatureLogger(model, logdir=tmp_path, max_channels=4)
    logger.log(X, step=1)
    logger.flush()
    reader = Reader(tmp_path)
    tag = tagging.features("00_Conv2d", "0")
    assert reader.steps(".", tag) == [1]
    first = reader.image(".", tag, 1)
    nudge(model, 1)
    logger.log(X, step=2)
    logger.flush()
    reader.refresh()
    assert reader.steps(".", tag) == [1, 2]
    assert reader.image(".", tag, 1) == first != reader.image(".", tag, 2)

    stop, seen = threading.Event(), []

    def poll():
        while not stop.is_set():
            reader.refresh()
            seen.append(reader.steps(".", tag)[-1])
            reader.image(".", tag, seen[-1])  # whole, or its CRC would fail

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        thread = threading.Thread(target=poll)
        thread.start()
        for step in range(3, 9):
            logger.log(X, step=step)
        logger.close()
        stop.set()
        thread.join()
    reader.refresh()
    assert reader.steps(".", tag) == list(range(1, 9))
    assert seen == sorted(seen)
    assert_same_as_tensorboard(tmp_path)


def test_a_fifo_and_a_folder_named_like_event_files_are_skipped_with_one_warning(tmp_path):
    write_events(tmp_path / "events.out.tfevents.1", [1])
    os.mkfifo(tmp_path / "events.out.tfevents.2")
    (tmp_path / "events.out.tfevents.3").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "events.out.tfevents.4"))
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    write_events(outside / "events.out.tfevents.9", [7])
    (tmp_path / "events.out.tfevents.5").symlink_to(outside / "events.out.tfevents.9")
    (tmp_path / "events.out.tfevents.6").symlink_to(tmp_path / "events.out.tfevents.1")
    reader = Reader(tmp_path)
    try:
        with pytest.warns(RuntimeWarning) as record:
            reader.refresh()
            reader.refresh()
    finally:
        sock.close()
    said = tbfeat_warnings(record)
    assert len(said) == 1
    for name, what in (("2", "a FIFO"), ("3", "a folder"), ("4", "a socket"),
                       ("5", "a link out of the logdir")):  # fmt: skip
        assert f"events.out.tfevents.{name} ({what})" in said[0]
    assert "tfevents.1 " not in said[0] and "tfevents.6" not in said[0]
    assert reader.steps(".", "loss") == [1]


# ------------------------------------------------------------------ the index is kept
def test_an_unchanged_file_is_not_read_again_and_a_shorter_one_is_indexed_again(tmp_path):
    path = tmp_path / "events.out.tfevents.1"
    write_events(path, range(1, 6))
    reader = Reader(tmp_path)
    reader.refresh()
    assert reader.bytes_read == path.stat().st_size
    opened = []
    real_open = os.open

    def counting_open(p, *args, **kwargs):
        fd = real_open(p, *args, **kwargs)
        opened.append(p)
        return fd

    os.open = counting_open
    try:
        reader.refresh()
    finally:
        os.open = real_open
    assert reader.bytes_read == path.stat().st_size  # nothing more read
    assert opened == [str(path)]  # only to look at its size
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(frame(scalar_event(6, 3.0)))
    reader.refresh()
    assert reader.bytes_read == path.stat().st_size  # only the new record
    assert reader.steps(".", "loss") == [1, 2, 3, 4, 5, 6]
    assert reader.bytes_read - size == len(frame(scalar_event(6, 3.0)))

    write_events(path, [1, 2])  # a restart rewrote it, shorter
    reader.refresh()
    assert reader.steps(".", "loss") == [1, 2]
    write_events(path, range(11, 19))  # ... and in place again, longer than before
    reader.refresh()
    assert reader.steps(".", "loss") == list(range(11, 19))
    os.replace(path, tmp_path / "moved")  # ... and replaced by a file as long as the first
    write_events(path, range(21, 26))
    reader.refresh()
    assert reader.steps(".", "loss") == list(range(21, 26))
    path.unlink()
    reader.refresh()
    assert reader.runs() == []
