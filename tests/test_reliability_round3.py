"""Reliability: a restart keeps the old run's records as they were, no file is written
through a link, a hostile history costs bounded memory, steps fit an int64, and the
Lightning callback never ends a training."""

import os
import socket
import struct
import time
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tbfeat.writer
from tbfeat import FeatureLogger, sweep
from tbfeat.drift import HISTORY_FILE, History
from tbfeat.export import ExportError, export
from tbfeat.sweep import MANIFEST

from .helpers import read_events

FEATURES = "features/00_Conv2d/0"


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())


def records(data: bytes) -> list[tuple[int, bytes]]:
    """``(step, raw record)`` of each TFRecord of an event file (-1 for the header),
    split by the format's own framing: 8-byte length, 4-byte CRC, data, 4-byte CRC."""
    from tensorboard.compat.proto import event_pb2

    out, at = [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        raw = data[at : at + 12 + length + 4]
        event = event_pb2.Event.FromString(raw[12 : 12 + length])
        out.append((-1 if event.HasField("file_version") else event.step, raw))
        at += len(raw)
    return out


def event_files(folder):
    return sorted(folder.glob("events.out.tfevents.*"))


# ------------------------------------------------------------------ restarts
def test_a_restart_keeps_the_old_records_byte_for_byte(tmp_path):
    image = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(0))
    logger = FeatureLogger(tiny_model(0), logdir=tmp_path, stages=[0])
    for step in range(4):
        logger.log([image], step=step)
    logger.close()
    (old,) = event_files(tmp_path)
    before = old.read_bytes()
    os.chmod(old, 0o640)  # neither the umask's default nor a temporary file's 0600

    restarted = FeatureLogger(tiny_model(1), logdir=tmp_path, stages=[0])  # other weights
    restarted.log([image], step=2)
    restarted.close()

    kept = [raw for step, raw in records(before) if step < 2]
    assert [s for s, _ in records(before)] == [-1, 0, 1, 2, 3]
    assert old.read_bytes() == b"".join(kept)
    assert old.stat().st_mode & 0o777 == 0o640
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images(FEATURES)] == [0, 1, 2]
    means = {e.step: e.value for e in acc.Scalars("stats/00_Conv2d/mean")}
    fresh = tiny_model(1)[0](image[None]).mean().item()
    assert means[2] == pytest.approx(fresh, rel=1e-5) and means[0] != pytest.approx(fresh)
    written = export(tmp_path, tmp_path / "figures", steps=[0, 1, 2])
    assert written[0].name == "features_00_Conv2d_0.png" and written[0].is_file()
    with pytest.raises(ExportError, match="step 3"):
        export(tmp_path, tmp_path / "figures", steps=[3])


# ------------------------------------------------------------------ no links
def plant(link, victim):
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    return link


def test_no_file_is_written_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    model = tiny_model(0)
    for epoch in range(3):
        with torch.no_grad():
            model[0].weight.mul_(1.5)
        torch.save({"model": model.state_dict(), "epoch": epoch}, tmp_path / f"model_{epoch}.pth")
    image = tmp_path / "probe.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(image)
    logdir = tmp_path / "sweep"
    links = [
        plant(logdir / f".{MANIFEST}.{os.getpid()}.tmp", victim),
        plant(logdir / MANIFEST, victim),
        plant(logdir / HISTORY_FILE, victim),
    ]
    # the event file names of the next seconds, with the next numbers of this process
    first = next(tbfeat.writer._FILE_IDS) + 1
    for t in range(int(time.time()), int(time.time()) + 30):
        for n in range(first, first + 4):
            name = f"events.out.tfevents.{t:010d}.{socket.gethostname()}.{os.getpid()}.{n:06d}"
            links.append(plant(logdir / f"{name}{tbfeat.writer.FILE_SUFFIX}", victim))

    def run(epochs):
        files = [tmp_path / f"model_{e}.pth" for e in epochs]
        return sweep(files, images=[image], logdir=logdir, model=tiny_model(), stages=[0])

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert run([0, 1]).logged == [1, 2]
        assert run([0, 1, 2]).logged == [3]
    assert victim.read_bytes() == b"precious"
    # the one link read as a file is the history's: moved aside, never followed
    messages = [str(w.message) for w in said]
    assert len(messages) == 1 and f"{HISTORY_FILE}.bad-" in messages[0], messages
    import json

    manifest = json.loads((logdir / MANIFEST).read_text())
    assert not (logdir / MANIFEST).is_symlink() and sorted(manifest["steps"]) == ["1", "2", "3"]
    for link in links[3:]:  # unused event file names TensorBoard would read
        link.unlink()
    acc = read_events(logdir)
    assert [e.step for e in acc.Images("features/00_Conv2d/probe")] == [1, 2, 3]

    names = [p.name for p in export(logdir, tmp_path / "dry")]
    out = tmp_path / "figures"
    for name in names:
        plant(out / name, victim)
        plant(out / f".{name}.tmp", victim)
    written = export(logdir, out)
    assert victim.read_bytes() == b"precious"
    assert [p.name for p in written] == names
    for path in written:
        assert not path.is_symlink()
        assert path.read_bytes() == (tmp_path / "dry" / path.name).read_bytes()


# ------------------------------------------------------------------ bounded history
def logged_history(folder, steps):
    image = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    logger = FeatureLogger(tiny_model(), logdir=folder, stages=[0])
    for step in steps:
        logger.log(image, step=step)
    logger.close()
    return image


def craft(folder, change):
    path = folder / HISTORY_FILE
    data = torch.load(path, weights_only=True)
    change(data)
    os.unlink(path)
    torch.save(data, path)
    return path


CLAIMED = (2000, 2000)  # steps x images a stride-0 block claims: 1 GB of cells at 16 x 16


def claim_cells(data):
    stage = next(iter(data["stages"].values()))
    steps, images = CLAIMED
    stage["cells"] = torch.zeros(1, dtype=torch.uint8).expand(steps, images, 16, 16)
    stage["cell_steps"] = list(range(steps))
    stage["cell_names"] = [str(i) for i in range(images)]


@pytest.mark.parametrize(
    "change",
    [claim_cells, lambda data: data.update(last_step="5")],
    ids=["stride-0 cells", "last_step a string"],
)
def test_a_hostile_history_is_moved_aside_and_the_run_goes_on(tmp_path, change):
    image = logged_history(tmp_path, [1, 2])
    path = craft(tmp_path, change)
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.warns(RuntimeWarning) as said:
            history = History.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # nothing of the claimed size was built
    assert history.stages == {} and history.last_step is None
    (aside,) = tmp_path.glob(f"{HISTORY_FILE}.bad-*")
    assert len(said) == 1 and str(aside) in str(said[0].message)
    assert not path.exists()
    # the crafted file again, this time met by a logger: its next step is logged
    os.rename(aside, path)
    logger = FeatureLogger(tiny_model(), logdir=tmp_path, stages=[0])
    with pytest.warns(RuntimeWarning, match="bad-"):
        logger.log(image, step=3)
        logger.close()
    assert [e.step for e in read_events(tmp_path).Images(FEATURES)] == [1, 2, 3]
    assert History.load(path).last_step == 3


def test_a_fifo_named_like_the_history_never_blocks_the_run(tmp_path):
    """Reading a FIFO would wait for a writer forever: it is never opened; the next
    history saved replaces the entry."""
    image = logged_history(tmp_path, [1])
    path = tmp_path / HISTORY_FILE
    path.unlink()
    os.mkfifo(path)
    logger = FeatureLogger(tiny_model(), logdir=tmp_path, stages=[0])
    logger.log(image, step=2)
    logger.close()
    assert logger.flushed_step == 2
    assert path.is_file() and History.load(path).last_step == 2


# ------------------------------------------------------------------ int64 steps
def test_steps_beyond_int64_are_refused_where_given(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="int64 range.*got 9223372036854775808"):
        FeatureLogger(model, logdir=tmp_path, step=2**63)
    logger = FeatureLogger(model, logdir=tmp_path)
    with pytest.raises(ValueError, match="int64 range.*got 9223372036854775808"):
        logger.log(torch.rand(3, 8, 8), step=2**63)
    with pytest.raises(ValueError, match="int64 range.*got -9223372036854775809"):
        logger.step = -(2**63) - 1
    logger.step = 2**63 - 1  # the largest is fine
    assert logger.step == 2**63 - 1
    logger.close()
    assert not event_files(tmp_path)  # nothing was written, nothing failed


# ------------------------------------------------------------------ Lightning
def test_a_failing_probe_warns_once_and_the_lightning_training_goes_on(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger

    from tbfeat.lightning import FeatureLoggerCallback

    from .test_lightning import Module, loaders, make_trainer

    module = Module()
    callback = FeatureLoggerCallback(
        images=torch.rand(1, 3, 16, 16), module="model",
        preprocess=lambda image: image[:1],  # one channel for a 3-channel model: it raises
    )  # fmt: skip
    trainer = make_trainer(TensorBoardLogger(tmp_path, name="exp"), callback)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.fit(module, *loaders())
    ours = [str(w.message) for w in said if str(w.message).startswith("tbfeat: ")]
    assert len(ours) == 1 and "epoch 0" in ours[0] and "RuntimeError" in ours[0], ours
    assert trainer.current_epoch == 3 and module.modes_seen == [True, True, True]
    assert all(not m._forward_hooks for m in module.modules())


# ------------------------------------------------------------------ a step is logged once on disk
def sweep_checkpoints(folder, epochs):
    model = tiny_model(0)
    for epoch in range(epochs):
        with torch.no_grad():
            model[0].weight.mul_(1.5)
        torch.save({"model": model.state_dict(), "epoch": epoch}, folder / f"model_{epoch}.pth")
    (folder / "net.py").write_text(
        "from torch import nn\n\n\ndef create():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())\n"
    )
    image = folder / "probe.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(image)
    return image


def test_a_step_the_storage_refused_is_not_logged_and_the_next_sweep_logs_it(
    tmp_path, monkeypatch, capsys
):
    import errno
    import json

    from tbfeat.cli import main

    image = sweep_checkpoints(tmp_path, 5)
    logdir = tmp_path / "sweep"
    full = {2, 3}  # the disk is full while these steps are written
    write_own = tbfeat.writer.EventSink._write_own

    def failing(self, bundle):
        if bundle.step in full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_own(self, bundle)

    monkeypatch.setattr(tbfeat.writer.EventSink, "_write_own", failing)
    files = [str(tmp_path / f"model_{e}.pth") for e in range(4)]
    args = ["--images", str(image), "--logdir", str(logdir), "--model",
            f"{tmp_path / 'net.py'}:create", "--stages", "0"]  # fmt: skip
    assert main(["sweep", *files, *args]) == 1
    out, err = capsys.readouterr()  # warnings go above the progress bar, on stderr
    assert "logged steps 1, 4 to" in out
    assert err.count("cannot write step") == 1 and "cannot write step 2" in err, err
    assert "steps 2, 3 could not be written" in err
    manifest = json.loads((logdir / MANIFEST).read_text())
    assert sorted(manifest["steps"], key=int) == ["1", "4"]
    assert [e.step for e in read_events(logdir).Images("features/00_Conv2d/probe")] == [1, 4]

    # the space is free again; the manifest also lies about a step 5 never written
    full.clear()
    manifest["steps"]["5"] = dict(manifest["steps"]["4"], checkpoint=str(tmp_path / "model_4.pth"))
    (logdir / MANIFEST).unlink()
    (logdir / MANIFEST).write_text(json.dumps(manifest))
    said = []
    result = sweep([tmp_path / f"model_{e}.pth" for e in range(5)], images=[image],
                   logdir=logdir, model=tiny_model(), stages=[0], warn=said.append)  # fmt: skip
    assert (result.logged, result.skipped, result.dropped) == ([2, 3, 4, 5], [1], [])
    assert any("steps 5 are in" in m and "not in the event files" in m for m in said), said
    acc = read_events(logdir)
    assert [e.step for e in acc.Images("features/00_Conv2d/probe")] == [1, 2, 3, 4, 5]
    means = {e.step: e.value for e in acc.Scalars("stats/00_Conv2d/mean")}
    x = torch.from_numpy(np.asarray(Image.open(image), np.float32) / 255).permute(2, 0, 1)
    weights = torch.load(tmp_path / "model_2.pth", weights_only=True)["model"]
    model = tiny_model()
    model.load_state_dict(weights)
    assert means[3] == pytest.approx(model[0](x[None]).mean().item(), rel=1e-4)
    manifest = json.loads((logdir / MANIFEST).read_text())
    assert sorted(manifest["steps"], key=int) == ["1", "2", "3", "4", "5"]


# ------------------------------------------------------------------ one writer per folder
def in_child(work) -> tuple[int, bytes]:
    """Fork; the child runs ``work(send)`` and ends at once (no test machinery runs
    there; an alarm ends it after 30 s at most); returns the child's pid and the read end
    of what it sends. The child runs torch on one thread: OpenMP's pool does not survive a
    fork."""
    import signal

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            signal.alarm(30)
            torch.set_num_threads(1)
            os.close(r)
            work(lambda data: os.write(w, data))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def test_one_logger_writes_to_a_run_folder_at_a_time(tmp_path):
    import re
    import signal

    from tbfeat.files import LOCK_FILE, FolderInUse, FolderLock

    image = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(0))
    first = FeatureLogger(tiny_model(), logdir=tmp_path, stages=[0])
    first.log([image], step=1)  # the run has started: the folder is taken
    here = f"pid {os.getpid()} host {socket.gethostname()}"
    assert (tmp_path / LOCK_FILE).read_text().startswith(here)
    FeatureLogger(tiny_model(), logdir=tmp_path, stages=[0]).close()  # this process shares it
    assert (tmp_path / LOCK_FILE).read_text().startswith(here)  # the first still holds it
    first.close()
    first.close()
    assert not (tmp_path / LOCK_FILE).exists()

    def hold(send):  # another process takes the folder and is killed holding it
        FolderLock(tmp_path).acquire()
        send(b"held")
        time.sleep(60)

    pid, r = in_child(hold)
    try:
        assert os.read(r, 4) == b"held"
        with pytest.raises(FolderInUse, match=f"pid {pid} host {re.escape(socket.gethostname())}"):
            FeatureLogger(tiny_model(), logdir=tmp_path, stages=[0])
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    assert (tmp_path / LOCK_FILE).exists()  # left behind: taken over
    second = FeatureLogger(tiny_model(), logdir=tmp_path, stages=[0])
    second.log([image], step=2)
    second.close()
    assert second.flushed_step == 2
    assert [e.step for e in read_events(tmp_path).Images(FEATURES)] == [1, 2]
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_forked_child_never_writes_into_the_parents_event_file(tmp_path):
    image = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(0))
    logger = FeatureLogger(tiny_model(), logdir=tmp_path, stages=[0])
    logger.log([image], step=1)
    logger.flush()
    (events,) = event_files(tmp_path)
    before = events.read_bytes()

    def child(send):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            logger.log([image], step=2)
            logger.close()
        send("\n".join(str(w.message) for w in said).encode())

    pid, r = in_child(child)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    assert os.waitpid(pid, 0)[1] == 0
    assert said.count("tbfeat: ") == 1 and "was forked from" in said, said
    assert events.read_bytes() == before and event_files(tmp_path) == [events]
    logger.log([image], step=3)
    logger.close()
    assert [e.step for e in read_events(tmp_path).Images(FEATURES)] == [1, 3]


# ------------------------------------------------------------------ hostile export inputs
def png_claiming(width, height) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels; its data is a few
    bytes (decoding it would build the whole claimed picture)."""
    import zlib

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def log_pictures(folder, pictures):
    """Write ``{tag: PNG bytes}`` as step 1 with tbfeat's own sink."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    from tbfeat.writer import EventSink, StepBundle

    sink = EventSink(folder)
    values = [
        Summary.Value(
            tag=tag, image=Summary.Image(height=1, width=1, colorspace=3, encoded_image_string=png)
        )  # fmt: skip
        for tag, png in pictures.items()
    ]
    assert sink.write(StepBundle(1, images=values))
    sink.close()


def small_png(seed) -> bytes:
    import io

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (6, 6, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("side", [12000, 30000], ids=["12000 square", "PIL's bomb size"])
def test_export_refuses_a_huge_picture_from_its_header(tmp_path, capsys, side):
    from tbfeat.cli import main

    log_pictures(tmp_path / "run", {
        "features/00_Conv2d/a": small_png(0),  # drawn first, were nothing checked before
        "features/01_Conv2d/b": png_claiming(side, side),
    })  # fmt: skip
    tracemalloc.start()
    try:
        status = main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err
    assert status == 2 and peak < 50 * 2**20
    assert err.count("\n") == 1 and err.startswith("tbfeat: error: "), err
    assert f"{side} x {side} pixels" in err and "features_01_Conv2d_b" in err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_export_shortens_long_names_before_writing_and_reports_damage_in_one_line(tmp_path, capsys):
    from tbfeat.cli import main
    from tbfeat.export import MAX_NAME_CHARS

    long = ["x" * 300, "x" * 299 + "y"]  # alike for their first 250 characters
    log_pictures(tmp_path / "run", {f"features/00_Conv2d/{n}": small_png(i)
                                    for i, n in enumerate(long)})  # fmt: skip
    written = export(tmp_path / "run", tmp_path / "out")
    names = [p.name for p in written]
    assert len(set(names)) == 2 and all(len(n) <= MAX_NAME_CHARS + len(".png") for n in names)
    assert names == [p.name for p in export(tmp_path / "run", tmp_path / "again")]  # stable

    log_pictures(tmp_path / "bad", {"features/00_Conv2d/a": small_png(0)[:-30]})  # cut off
    status = main(["export", str(tmp_path / "bad"), "--out", str(tmp_path / "bad_out")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "cannot be decoded" in err, err


# ------------------------------------------------------------------ TorchScript
def test_a_torchscript_model_is_refused_when_the_logger_is_built(tmp_path):
    model = tiny_model()
    scripted = torch.jit.script(model)
    traced = torch.jit.trace(model, torch.rand(1, 3, 8, 8))
    for compiled in (scripted, traced):
        with pytest.raises(TypeError, match="TorchScript module.*pass the nn.Module"):
            FeatureLogger(compiled, logdir=tmp_path, stages=[0])
    assert not event_files(tmp_path)


def test_a_with_block_that_captures_nothing_warns_once_at_its_end(tmp_path):
    model = tiny_model()
    logger = FeatureLogger(model, logdir=tmp_path, stages=[0])
    x = torch.rand(1, 3, 12, 12)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with logger:
            model(x)  # captured: nothing to say
        with logger:
            pass
        with logger:
            pass
    ours = [str(w.message) for w in said if "tbfeat" in str(w.message)]
    assert len(ours) == 1 and "captured nothing" in ours[0], ours
    logger.close()
    assert [e.step for e in read_events(tmp_path).Images("features/00_Conv2d/0")] == [0]


# ------------------------------------------------------------------ image names
def test_probe_images_sharing_a_file_name_are_named_by_their_folders(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for folder in ("val", "test"):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "bus.png")
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), np.uint8)).save(paths[-1])
    logger = FeatureLogger(tiny_model(), logdir=tmp_path / "run", stages=[0])
    logger.log(paths, step=1)
    logger.log(paths[::-1], step=2)  # the order changes, the names stay with the files
    logger.close()
    acc = read_events(tmp_path / "run")
    shown = {
        name: [e.encoded_image_string for e in acc.Images(f"features/00_Conv2d/{name}")]
        for name in ("val_bus", "test_bus")
    }
    assert shown["val_bus"][0] == shown["val_bus"][1] != shown["test_bus"][0]
    assert shown["test_bus"][0] == shown["test_bus"][1]


# ------------------------------------------------------------------ crafted manifests
@pytest.mark.parametrize(
    "data, why",
    [
        (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
        (b'{"steps": {"1": {}}, "x": "\xff\xfe"}', "UnicodeDecodeError"),
        (b'{"steps": {"one": {}}}', "step 'one' is not an integer step"),
        (b'{"steps": {"1": 5}}', "step '1' is not an integer step"),
    ],
    ids=["deep nesting", "bad bytes", "a step that is no number", "a step that is no entry"],
)
def test_a_crafted_manifest_is_one_error_naming_the_file(tmp_path, data, why):
    from tbfeat.sweep import SweepError, read_manifest

    (tmp_path / MANIFEST).write_bytes(data)
    with pytest.raises(SweepError) as e:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(e.value) and why in str(e.value)
    assert len(str(e.value)) < 400


def test_an_interrupted_probe_writes_nothing_of_its_step(tmp_path):
    """Ctrl-C in the middle of a probe's forward: the stages before it were captured,
    but no half step is written; the next step is logged as usual."""

    class Stop(torch.nn.Module):
        armed = False

        def forward(self, x):
            if self.armed:
                raise KeyboardInterrupt
            return x

    stop = Stop()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), stop, torch.nn.ReLU())
    x = torch.rand(1, 3, 12, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FeatureLogger(model, logdir=tmp_path, max_channels=2) as logger:
            logger.log(x, step=1)
            stop.armed = True
            with pytest.raises(KeyboardInterrupt):
                logger.log(x, step=2)
            stop.armed = False
            logger.log(x, step=3)
    said = [str(w.message) for w in caught if "interrupted" in str(w.message)]
    assert said == ["tbfeat: the probe of step 2 was interrupted before it ended; nothing "
                    "of that step was written"]  # fmt: skip
    events = read_events(tmp_path)
    for tag in events.Tags()["scalars"]:
        assert [e.step for e in events.Scalars(tag)] == [1, 3], tag
    assert [e.step for e in events.Images("features/00_Conv2d/0")] == [1, 3]


def test_odd_entries_named_like_event_files_are_left_alone_with_one_warning(tmp_path):
    """A restart trims tbfeat's own event files; a FIFO, a folder or a link named like
    one is never opened (a FIFO would block) and is named in one warning."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.rand(1, 3, 12, 12)
    logger = FeatureLogger(model, logdir=tmp_path, cam=None)
    for step in range(3):
        logger.log(x, step=step)
    logger.close()
    odd = {"events.out.tfevents.1.fifo.0.tbfeat": "a FIFO",
           "events.out.tfevents.2.dir.0.tbfeat": "a folder",
           "events.out.tfevents.3.link.0.tbfeat": "a link"}  # fmt: skip
    os.mkfifo(tmp_path / "events.out.tfevents.1.fifo.0.tbfeat")
    (tmp_path / "events.out.tfevents.2.dir.0.tbfeat").mkdir()
    (tmp_path / "events.out.tfevents.3.link.0.tbfeat").symlink_to(tmp_path / "nowhere")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = FeatureLogger(model, logdir=tmp_path, cam=None)
        logger.log(x, step=1)  # a restart at step 1: steps 1 and 2 of the old run go
        logger.close()
    said = [str(w.message) for w in caught if "left alone" in str(w.message)]
    assert len(said) == 1
    assert all(f"{name} ({why})" in said[0] for name, why in odd.items()), said
    for name in odd:  # TensorBoard's own reader would block on the FIFO, fail on the rest
        path = tmp_path / name
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    assert [e.step for e in read_events(tmp_path).Scalars("stats/00_Conv2d/mean")] == [0, 1]
