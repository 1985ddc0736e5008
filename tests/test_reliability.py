"""Reliability: the logger never breaks the job it watches and never loses what it logged."""

import gc
import os
import signal
import subprocess
import sys
import time
import warnings
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tbfeat import FeatureLogger
from tbfeat.pictures import NONFINITE_RGB

from .helpers import decode, read_events


class Emit(nn.Module):
    """Returns a fixed tensor whatever the input (batch taken from the input)."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------ hooks never leak
def test_two_loggers_on_one_model_and_one_logger_entered_twice(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    a = FeatureLogger(model, logdir=tmp_path / "a")
    b = FeatureLogger(model, logdir=tmp_path / "b", stages=[1])
    with a.at(1), b.at(1):
        model(torch.rand(1, 3, 8, 8))
    with a.at(2):
        model(torch.rand(1, 3, 8, 8))
    with a.at(3):
        model(torch.rand(1, 3, 8, 8))
    assert no_hooks(model)
    a.close()
    b.close()
    assert [e.step for e in read_events(tmp_path / "a").Images("features/00_Conv2d/0")] == [1, 2, 3]
    assert read_events(tmp_path / "b").Tags()["images"] == ["features/01_ReLU/0"]


def test_an_exception_in_the_writer_keeps_the_model_clean(tmp_path, monkeypatch):
    import tbfeat.writer as w

    def broken(self, bundle):
        raise OSError("disk gone")

    monkeypatch.setattr(w.EventSink, "write", broken)
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).train()
    with pytest.warns(RuntimeWarning, match="disk gone"), FeatureLogger(model, logdir=tmp_path):
        out = model(torch.rand(1, 3, 8, 8))
    assert out.shape == (1, 4, 6, 6) and no_hooks(model) and model.training


# ------------------------------------------------------------------ bad activations
def run_stage(tmp_path, value, **kw):
    model = nn.Sequential(Emit(value))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here may even warn
        with FeatureLogger(model, logdir=tmp_path, **kw):
            out = model(torch.zeros(1))
    assert out is value
    return read_events(tmp_path)


def test_nan_and_inf_are_marked_counted_and_kept_out_of_the_histogram(tmp_path):
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    x[0, 0, 1, 1] = float("inf")
    x[0, 0, 2, 2] = -float("inf")
    acc = run_stage(tmp_path, x)
    rgb = decode(acc.Images("features/00_Emit/0")[0])
    assert tuple(rgb[0, 0]) == NONFINITE_RGB and tuple(rgb[1, 1]) == NONFINITE_RGB
    assert tuple(rgb[0, 1]) != NONFINITE_RGB
    assert acc.Scalars("stats/00_Emit/nonfinite_count")[0].value == 3
    finite = x[torch.isfinite(x)]
    assert acc.Scalars("stats/00_Emit/mean")[0].value == pytest.approx(float(finite.mean()))
    hist = acc.Histograms("activations/00_Emit")[0].histogram_value
    assert hist.num == 13 and hist.max == 15.0


def test_constant_zero_and_huge_channels(tmp_path):
    x = torch.zeros(1, 3, 5, 5)
    x[0, 1] = 7.0
    x[0, 2] = torch.from_numpy(np.linspace(-3e38, 3e38, 25, dtype=np.float32).reshape(5, 5))
    acc = run_stage(tmp_path, x)
    rgb = decode(acc.Images("features/00_Emit/0")[0])
    assert len(np.unique(rgb[:, :5].reshape(-1, 3), axis=0)) == 1  # a flat tile
    assert len(np.unique(rgb[:, 12:].reshape(-1, 3), axis=0)) > 10  # the ramp survives
    assert acc.Scalars("stats/00_Emit/zero_fraction")[0].value == pytest.approx(25 / 75 + 1 / 75)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs(tmp_path, dtype):
    x = torch.linspace(-2, 2, 2 * 3 * 6 * 6).reshape(2, 3, 6, 6)
    acc = run_stage(tmp_path, x.to(dtype))
    assert len(acc.Tags()["images"]) == 2
    assert acc.Scalars("stats/00_Emit/mean")[0].value == pytest.approx(0.0, abs=1e-2)


def test_channels_last_non_contiguous_and_degenerate_shapes(tmp_path):
    base = torch.rand(2, 6, 9, 9)
    cases = {
        "cl": base.contiguous(memory_format=torch.channels_last),
        "strided": base[:, ::2, ::2, 1:],
        "one_by_one": base[:, :, :1, :1],
        "few_channels": base[:, :2],
    }
    for name, x in cases.items():
        acc = run_stage(tmp_path / name, x, max_channels=32)
        image = acc.Images("features/00_Emit/0")[0]
        c, h, w = x.shape[1:]
        assert (image.width, image.height) == (min(c, 8) * (w + 1) - 1, h), name
        assert acc.Scalars("stats/00_Emit/max")[0].value == pytest.approx(float(x.max())), name


def test_empty_batch_logs_nothing_and_breaks_nothing(tmp_path):
    model = nn.Sequential(Emit(torch.zeros(0, 3, 4, 4)))
    with FeatureLogger(model, logdir=tmp_path / "e"):
        model(torch.zeros(1))
    assert not (tmp_path / "e").exists() or not read_events(tmp_path / "e").Tags()["images"]


def test_outputs_that_require_grad_keep_no_graph_alive(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).train()
    logger = FeatureLogger(model, logdir=tmp_path)
    with logger.at(0):
        out = model(torch.rand(1, 3, 8, 8))  # the ReLU stage's output, with its graph
    assert out.requires_grad and out.grad_fn is not None
    ref = weakref.ref(out)
    out.sum().backward()  # the user's training step still works
    del out
    gc.collect()
    assert ref() is None  # nothing of ours holds the output (or the graph behind it)
    assert read_events(tmp_path).Tags()["images"] == ["features/00_Conv2d/0", "features/01_ReLU/0"]
    logger.close()


def test_inference_mode_outputs(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with FeatureLogger(model, logdir=tmp_path), torch.inference_mode():
        model(torch.rand(1, 3, 8, 8))
    assert read_events(tmp_path).Tags()["images"] == ["features/00_Conv2d/0"]


# ------------------------------------------------------------------ nothing lost
KILL_CHILD = r"""
import sys, torch
from torch import nn
from tbfeat import FeatureLogger
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
logger = FeatureLogger(model, logdir=sys.argv[1])
step = 0
while True:
    logger.log(torch.rand(1, 3, 32, 32), step=step)
    flushed = logger.flushed_step
    if flushed is not None:
        print(flushed, flush=True)
    step += 1
"""


def test_a_killed_process_keeps_every_step_reported_flushed(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    reported = -1
    deadline = time.time() + 120
    while reported < 25 and time.time() < deadline:
        line = proc.stdout.readline()
        if line.strip():
            reported = max(reported, int(line))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert reported >= 25
    steps = {e.step for e in read_events(tmp_path).Scalars("stats/00_Conv2d/mean")}
    assert set(range(reported + 1)) <= steps
    images = {e.step for e in read_events(tmp_path).Images("features/01_ReLU/0")}
    assert set(range(reported + 1)) <= images


def test_an_unwritable_logdir_fails_at_construction(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(OSError, match=r"logdir .*file/run.* is not writable"):
        FeatureLogger(model, logdir=blocker / "run")
    import tbfeat.writer as w

    monkeypatch.setattr(w.shutil, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    with pytest.raises(OSError, match="has only 0 MiB free"):
        FeatureLogger(model, logdir=tmp_path / "full")


# ------------------------------------------------------------------ long runs
def test_a_thousand_steps_keep_memory_and_file_handles_flat(tmp_path):
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    x = torch.rand(1, 3, 24, 24)
    logger = FeatureLogger(model, logdir=tmp_path, max_channels=8)
    # warm-up: the evolution strips and drift history fill up to their bounds (32 steps),
    # the overview picture is drawn every tenth step from the tenth drift step on
    for step in range(100):
        logger.log(x, step=step)
    logger.flush()
    gc.collect()
    rss, fds = rss_mb(), len(os.listdir("/proc/self/fd"))
    for step in range(100, 1100):
        logger.log(x, step=step)
    logger.flush()
    gc.collect()
    assert rss_mb() - rss < 50
    assert len(os.listdir("/proc/self/fd")) == fds
    assert logger.flushed_step == 1099
    logger.close()


# ------------------------------------------------------------------ inputs
def test_grayscale_rgba_and_16_bit_images_are_converted(tmp_path):
    paths = []
    for name, arr, mode in [
        ("gray", np.full((8, 10), 100, np.uint8), "L"),
        ("rgba", np.full((8, 10, 4), 200, np.uint8), "RGBA"),
        ("deep", np.full((8, 10), 40000, np.uint16), "I;16"),
    ]:
        path = tmp_path / f"{name}.png"
        Image.fromarray(arr, mode=mode).save(path) if mode != "I;16" else Image.fromarray(arr).save(
            path
        )
        paths.append(path)
    model = nn.Sequential(nn.Identity())
    logger = FeatureLogger(model, logdir=tmp_path / "run")
    logger.log(paths, step=0)
    logger.close()
    acc = read_events(tmp_path / "run")
    means = {
        t.split("/")[-1]: acc.Scalars(t)[0].value
        for t in acc.Tags()["scalars"]
        if t.endswith("/mean")
    }
    assert sorted(acc.Tags()["images"]) == [
        f"features/00_Identity/{n}" for n in ("deep", "gray", "rgba")
    ]
    assert means  # statistics over all three images
    assert acc.Scalars("stats/00_Identity/max")[0].value == pytest.approx(200 / 255, rel=1e-5)


def test_tags_from_image_names_are_sanitized(tmp_path):
    model = nn.Sequential(nn.Identity())
    logger = FeatureLogger(model, logdir=tmp_path)
    logger.log(torch.rand(2, 3, 4, 4), step=0, names=["../../etc/passwd", "a\nb\tc\x00"])
    logger.close()
    tags = read_events(tmp_path).Tags()["images"]
    assert sorted(tags) == ["features/00_Identity/a_b_c", "features/00_Identity/etc_passwd"]
    files = os.listdir(tmp_path)  # nothing named after an image reaches the logdir
    assert all(f.startswith("events.out.tfevents.") or f == "tbfeat-history.pt" for f in files)
