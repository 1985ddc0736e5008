"""Sweeps logged side by side (``workers=N``, ``tbfeat sweep --workers N``, the ranks of
``torchrun``) write the run a serial sweep writes: the same events, drift and history."""

import contextlib
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tbfeat import sweep
from tbfeat.drift import HISTORY_FILE
from tbfeat.sweep import MANIFEST, SweepError

from .helpers import read_events
from .test_distributed import clean_env

NET = textwrap.dedent(
    """
    from torch import nn


    def create():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
        )
    """
)
EPOCHS = 5


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory):
    """A small classifier's state dict at 5 epochs (each its own weights), its model file
    and two probe images."""
    root = tmp_path_factory.mktemp("ckpts")
    (root / "net.py").write_text(NET)
    namespace: dict = {}
    exec(NET, namespace)  # noqa: S102 - the model file written above
    torch.manual_seed(0)
    net = namespace["create"]()
    g = torch.Generator().manual_seed(1)
    for epoch in range(EPOCHS):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        torch.save({"model": net.state_dict(), "epoch": epoch}, root / f"model_{epoch}.pth")
    rng = np.random.default_rng(0)
    for name in "ab":
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)).save(root / f"{name}.png")
    return root


def files(root, epochs=range(EPOCHS)):
    return [root / f"model_{e}.pth" for e in epochs]


def run_sweep(root, logdir, checkpoints=None, **kwargs):
    return sweep(
        files(root) if checkpoints is None else checkpoints,
        images=[root / "a.png", root / "b.png"],
        logdir=logdir,
        model=f"{root / 'net.py'}:create",
        **kwargs,
    )


def image(event):
    """What an image event shows: its mode, palette and pixels. (The PNG bytes of one
    image may differ between processes: ISA-L's deflate, when installed, may pick other,
    equivalent matches for the same rows.)"""
    with Image.open(io.BytesIO(event.encoded_image_string)) as im:
        return im.mode, im.getpalette(), np.asarray(im).tobytes()


def assert_same_runs(a, b):
    """Two sweeps' runs are the same: tags, steps and values of every scalar, image and
    histogram (drift and evolution included), the drift history, the manifest's steps."""
    ea, eb = (
        read_events(a, derived=True, metadata=True),
        read_events(b, derived=True, metadata=True),
    )
    tags = ea.Tags()
    assert tags == eb.Tags()
    assert len(tags["scalars"]) > 20 and len(tags["images"]) > 10
    assert any(t.startswith("drift/") for t in tags["scalars"])
    assert any(t.startswith("cam/") for t in tags["images"])
    for tag in tags["scalars"]:
        assert [(e.step, e.value) for e in ea.Scalars(tag)] == [
            (e.step, e.value) for e in eb.Scalars(tag)
        ], tag
    for tag in tags["images"]:
        assert [(e.step, image(e)) for e in ea.Images(tag)] == [
            (e.step, image(e)) for e in eb.Images(tag)
        ], tag
    for tag in tags["histograms"]:
        assert [(e.step, e.histogram_value) for e in ea.Histograms(tag)] == [
            (e.step, e.histogram_value) for e in eb.Histograms(tag)
        ], tag
    assert ea.run_info() == eb.run_info()
    assert (a / HISTORY_FILE).read_bytes() == (b / HISTORY_FILE).read_bytes()
    steps = [sorted(json.loads((d / MANIFEST).read_text())["steps"]) for d in (a, b)]
    assert steps[0] == steps[1]


def test_two_workers_write_the_run_a_serial_sweep_writes(tmp_path, sweep_files):
    serial = run_sweep(sweep_files, tmp_path / "serial")
    done = []
    parallel = run_sweep(sweep_files, tmp_path / "parallel", workers=2,
                         on_step=lambda p, n: done.append((p.step, n)))  # fmt: skip
    assert serial.logged == parallel.logged == [1, 2, 3, 4, 5]
    assert done == [(step, 2) for step in range(1, EPOCHS + 1)]  # in step order
    assert_same_runs(tmp_path / "serial", tmp_path / "parallel")
    means = [e.value for e in read_events(tmp_path / "parallel").Scalars("stats/00_Conv2d/mean")]
    assert len(set(means)) == EPOCHS  # every checkpoint its own weights

    # a sweep extended with a later checkpoint continues, as a serial one does
    more = sweep_files / "more"
    more.mkdir(exist_ok=True)
    torch.save({**torch.load(files(sweep_files)[0]), "epoch": EPOCHS}, more / "model_5.pth")
    extended = [*files(sweep_files), more / "model_5.pth"]
    run_sweep(sweep_files, tmp_path / "serial", extended)
    result = run_sweep(sweep_files, tmp_path / "parallel", extended, workers=3)
    assert result.logged == [6] and result.skipped == [1, 2, 3, 4, 5]
    assert_same_runs(tmp_path / "serial", tmp_path / "parallel")


def test_a_failing_checkpoint_keeps_the_steps_before_it(tmp_path, sweep_files):
    """The third of five checkpoints does not fit the model: both sweeps stop there with
    the same error, keeping steps 1 and 2 and nothing after (the parallel one had logged
    later steps already)."""
    broken = tmp_path / "ckpts"
    broken.mkdir()
    checkpoints = []
    for epoch, path in enumerate(files(sweep_files)):
        data = torch.load(path)
        if epoch == 2:
            data["model"]["0.weight"] = torch.zeros(4, 3, 3, 3)  # 4 channels, not 8
        checkpoints.append(broken / path.name)
        torch.save(data, checkpoints[-1])
    errors = []
    for name, workers in (("serial", 1), ("parallel", 2)):
        with pytest.raises(SweepError) as caught:
            run_sweep(sweep_files, tmp_path / name, checkpoints, workers=workers)
        errors.append(str(caught.value).replace(name, "<logdir>"))
    assert errors[0] == errors[1]
    assert "model_2.pth' does not fit Sequential" in errors[0]
    assert "steps 1, 2 are kept" in errors[0]
    acc = read_events(tmp_path / "parallel")
    assert [e.step for e in acc.Images("features/00_Conv2d/a")] == [1, 2]
    assert_same_runs(tmp_path / "serial", tmp_path / "parallel")


@pytest.mark.parametrize(
    ("workers", "error"),
    [(0, ValueError), (-2, ValueError), (1.5, TypeError), ("2", TypeError), (True, TypeError)],
)
def test_bad_workers_fail_before_anything_exists(tmp_path, sweep_files, workers, error):
    with pytest.raises(error, match=rf"workers must be an int >= 1, got {workers!r}"):
        run_sweep(sweep_files, tmp_path / "run", workers=workers)
    assert not (tmp_path / "run").exists()


def test_a_model_that_cannot_reach_the_workers_fails_before_anything_exists(tmp_path, sweep_files):
    def create():  # a local function: it cannot be pickled
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))

    with pytest.raises(ValueError, match="cannot be pickled.*MODULE:FUNCTION"):
        sweep(files(sweep_files), images=[sweep_files / "a.png"], logdir=tmp_path / "run",
              model=create, workers=2)  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_more_workers_than_steps_log_them_all(tmp_path, sweep_files):
    result = run_sweep(sweep_files, tmp_path / "run", files(sweep_files, [3, 4]), workers=8)
    assert result.logged == [4, 5]
    acc = read_events(tmp_path / "run")
    assert [e.step for e in acc.Images("features/00_Conv2d/b")] == [4, 5]


@contextlib.contextmanager
def one_thread():
    """Torch on one thread, as in a process started with ``OMP_NUM_THREADS=1``: the
    statistics' float sums then add up in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_the_cli_flag_logs_with_two_workers(tmp_path, sweep_files):
    with one_thread():  # as the command, started with OMP_NUM_THREADS=1
        run_sweep(sweep_files, tmp_path / "serial")
    proc = subprocess.run(
        [sys.executable, "-m", "tbfeat", "sweep", *map(str, files(sweep_files)), "--images",
         str(sweep_files / "a.png"), str(sweep_files / "b.png"), "--logdir",
         str(tmp_path / "cli"), "--model", f"{sweep_files / 'net.py'}:create", "--workers", "2",
         "--max-channels", "32"],
        capture_output=True, text=True, timeout=600, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logged steps 1, 2, 3, 4, 5" in proc.stdout
    assert_same_runs(tmp_path / "serial", tmp_path / "cli")
    bad = subprocess.run(
        [sys.executable, "-m", "tbfeat", "sweep", "x.pt", "--images", "a.png", "--logdir",
         str(tmp_path / "bad"), "--workers", "0"],
        capture_output=True, text=True, timeout=120, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "argument --workers: must be >= 1, got 0" in bad.stderr
    assert not (tmp_path / "bad").exists()


RANKS = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import tbfeat

    root, logdir = Path(sys.argv[1]), sys.argv[2]
    result = tbfeat.sweep(
        [root / f"model_{e}.pth" for e in range(5)], images=[root / "a.png", root / "b.png"],
        logdir=logdir, model=f"{root / 'net.py'}:create",
    )
    rank = int(os.environ["RANK"])  # each rank its own file: their stdout lines interleave
    Path(f"result-{rank}.json").write_text(
        json.dumps({"rank": rank, "logged": result.logged, "pid": os.getpid()})
    )
    os._exit(0)  # leave without gloo's native teardown (see test_distributed.py)
    """
)


def test_a_torchrun_sweep_writes_the_run_a_serial_sweep_writes(tmp_path, sweep_files):
    """Two ranks (gloo, CPU) share the checkpoints; rank 0 alone writes. The ranks run
    one thread each (``OMP_NUM_THREADS=1``), and so does the serial sweep compared."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(sweep_files), str(tmp_path / "ranks")],
        capture_output=True, text=True, env=clean_env(), timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    by_rank = {r["rank"]: r for r in results}
    assert sorted(by_rank) == [0, 1]
    assert by_rank[0]["logged"] == by_rank[1]["logged"] == [1, 2, 3, 4, 5]
    (event_file,) = (tmp_path / "ranks").glob("events.out.tfevents.*")
    assert f".{by_rank[0]['pid']}." in event_file.name  # rank 0 wrote, alone
    with one_thread():
        run_sweep(sweep_files, tmp_path / "serial")
    assert_same_runs(tmp_path / "serial", tmp_path / "ranks")
