"""Faults the training must never see: a full disk, a removed logdir, a broken writer,
two threads probing one model."""

import copy
import os
import shutil
import subprocess
import sys
import threading
import traceback
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tbfeat import FeatureLogger

from .helpers import read_events


# ------------------------------------------------------------------ a real small disk
@pytest.fixture
def disk(tmp_path):
    """A 24 MiB tmpfs (CI runs as root): filled and freed by the tests."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"mounting a tmpfs needs root: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk):
    """Take every free byte of the disk; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (2**20, 4096, 1):
            block = b"\0" * chunk
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free == 0
    return filler


def event_files(folder):
    return sorted(folder.glob("events.out.tfevents.*"))


def load_all(path):
    """Every event of a file, read with TensorBoard's loader (it stops at a bad record)."""
    return list(EventFileLoader(str(path)).Load())


def tbfeat_warnings(record):
    return [str(w.message) for w in record if str(w.message).startswith("tbfeat")]


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())


X = torch.rand(2, 3, 32, 32)


def test_a_full_disk_never_reaches_the_training_and_logging_resumes(disk):
    model = net()
    run = disk / "run"
    logger = FeatureLogger(model, logdir=run, step=0)
    logger.log(X)
    logger.flush()
    assert logger.flushed_step == 0
    filler = fill(disk)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(1, 4):  # every way a step ends, none may raise
            logger.log(X, step=step)
            logger.flush()
        with logger.at(4):
            model(X)
        logger.flush()
    said = tbfeat_warnings(record)
    assert len(said) == 1, said
    assert "cannot write step 1 to logdir" in said[0] and str(run) in said[0]
    assert "No space left on device" in said[0]
    assert logger.flushed_step == 0  # honest: nothing after step 0 is on disk
    (first,) = event_files(run)  # no new file per attempt
    assert not list(run.glob(".*.tmp"))  # no temporary file left behind

    filler.unlink()
    logger.log(X, step=5)
    logger.close()  # closing with storage back: no warning either
    assert logger.flushed_step == 5
    files = event_files(run)
    assert len(files) == 2 and first in files  # resumed in a fresh file
    for path in files:  # whole records only: the failed steps were cut back
        assert [e.step for e in load_all(path) if e.HasField("summary")] in ([0], [5])
    acc = read_events(run)
    assert [e.step for e in acc.Images("features/00_Conv2d/1")] == [0, 5]
    assert [e.step for e in acc.Scalars("stats/01_ReLU/mean")] == [0, 5]


def test_a_disk_full_before_the_first_write_creates_no_file_per_attempt(disk):
    run = disk / "run"
    logger = FeatureLogger(net(), logdir=run)  # created while there is room
    filler = fill(disk)
    with pytest.warns(RuntimeWarning, match="cannot write step 0") as record:
        for step in range(3):
            logger.log(X, step=step)
        logger.flush()
    assert len(tbfeat_warnings(record)) == 1
    assert event_files(run) == [] and logger.flushed_step is None
    filler.unlink()
    logger.log(X, step=3)
    logger.close()
    assert len(event_files(run)) == 1
    assert [e.step for e in read_events(run).Scalars("stats/00_Conv2d/max")] == [3]


def test_a_removed_logdir_is_recreated_and_nothing_flushed_is_lost(tmp_path):
    run = tmp_path / "run"
    logger = FeatureLogger(net(), logdir=run)
    logger.log(X, step=0)
    logger.flush()
    shutil.rmtree(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was lost: nothing to warn about
        logger.log(X, step=1)
        logger.flush()
    assert logger.flushed_step == 1
    shutil.rmtree(run)
    run.write_text("in the way")  # a logdir that cannot be recreated
    with pytest.warns(RuntimeWarning, match=r"cannot write step 2 to logdir .*run") as record:
        for step in (2, 3):
            logger.log(X, step=step)
        logger.flush()
    assert len(tbfeat_warnings(record)) == 1 and logger.flushed_step == 1
    run.unlink()
    logger.log(X, step=4)
    logger.close()
    assert [e.step for e in read_events(run).Scalars("stats/00_Conv2d/mean")] == [4]
    assert logger.flushed_step == 4


def test_a_logdir_that_vanishes_before_exit_gives_no_traceback(tmp_path):
    script = f"""
import shutil, torch
from pathlib import Path
from torch import nn
from tbfeat import FeatureLogger
run = Path({str(tmp_path / "run")!r})
logger = FeatureLogger(nn.Sequential(nn.Conv2d(3, 4, 3)), logdir=run)
logger.log(torch.rand(1, 3, 16, 16), step=0)
logger.flush()
shutil.rmtree(run)
run.write_text("in the way")
with logger.at(1):
    logger.model(torch.rand(1, 3, 16, 16))
logger.log(torch.rand(1, 3, 16, 16), step=2)
print("training finished")
"""  # exits without close(): the exit handler writes the rest
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "training finished"
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("cannot write step") == 1, done.stderr


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failed_writer_given_costs_no_memory_per_step_and_never_raises(disk):
    writer = SummaryWriter(disk / "given")
    logger = FeatureLogger(net(), writer=writer)
    logger.log(X, step=0)
    logger.flush()
    fill(disk)
    with pytest.warns(RuntimeWarning, match=r"cannot write step 1 to logdir .*given") as record:
        for step in range(1, 40):
            logger.log(X, step=step)
        logger.flush()
        logger.close()
    assert len(tbfeat_warnings(record)) == 1 and logger.flushed_step == 0
    # TensorBoard's writer raises its one stored error again on every call; kept frames
    # would hold every step's images
    error = writer.file_writer.event_writer._async_writer._worker.exception
    assert isinstance(error, OSError)
    assert len(traceback.extract_tb(error.__traceback__)) < 10


# ------------------------------------------------------------------ two threads, one model
def bn_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()


def expected_mean(model, x):
    """The mean of the BatchNorm's output for ``x`` in eval mode, computed apart."""
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        return twin[1](twin[0](x)).mean().item()


def test_two_threads_probing_one_model_never_change_it(tmp_path):
    model = bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = {"a": torch.zeros(1, 3, 24, 24), "b": torch.full((1, 3, 24, 24), 10.0)}
    loggers = {k: FeatureLogger(model, logdir=tmp_path / k, stages=[1]) for k in inputs}
    start, errors = threading.Barrier(2), []

    def run(key):
        try:
            start.wait()
            for step in range(25):
                loggers[key].log(inputs[key], step=step)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    closers = [threading.Thread(target=logger.close) for logger in loggers.values()]
    for t in closers:
        t.start()
    for t in closers:
        t.join(60)
    assert not any(t.is_alive() for t in closers), "close() hung"

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched
    assert all(m.training for m in model.modules())
    for key, x in inputs.items():
        means = [e.value for e in read_events(tmp_path / key).Scalars("stats/01_BatchNorm2d/mean")]
        assert len(means) == 25
        assert means == pytest.approx([expected_mean(model, x)] * 25, abs=1e-5)


def test_a_probe_inside_a_block_stays_out_of_the_blocks_steps(tmp_path):
    model = bn_net().eval()
    block = FeatureLogger(model, logdir=tmp_path / "block", stages=[1])
    other = FeatureLogger(model, logdir=tmp_path / "other", stages=[1])
    mine, probed = torch.zeros(1, 3, 24, 24), torch.full((1, 3, 24, 24), 10.0)
    with block.at(1), torch.no_grad():
        model(mine)
        other.log(probed, step=7)  # another logger's probe: not the block's forward
        model(mine)
        block.log(probed, step=5)  # the block's own logger: a probe step of its own
        block.step = 2
        model(mine)
    other.close()
    block.close()
    means = read_events(tmp_path / "block").Scalars("stats/01_BatchNorm2d/mean")
    a, b = expected_mean(model, mine), expected_mean(model, probed)
    assert [(e.step, round(e.value, 5)) for e in means] == [
        (1, round(a, 5)),  # two forwards of ``mine``, the probe not among them
        (5, round(b, 5)),
        (2, round(a, 5)),
    ]
    (seen,) = read_events(tmp_path / "other").Scalars("stats/01_BatchNorm2d/mean")
    assert (seen.step, seen.value) == (7, pytest.approx(b, abs=1e-5))
