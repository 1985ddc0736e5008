"""The tbfeat command end to end, in subprocesses."""

import contextlib
import io
import json
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tbfeat import FeatureLogger
from tbfeat.integrations.torchvision import build

from .helpers import read_events

pytest.importorskip("ultralytics")  # the optional extra; `make test` installs it
from ultralytics.utils import ASSETS  # noqa: E402

BUS = str(Path(ASSETS) / "bus.jpg")


def tbfeat(*args, timeout=600):
    proc = subprocess.run(
        [sys.executable, "-m", "tbfeat", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


def tbfeat_here(*args):
    """The CLI's ``main`` in this process, its output captured as a subprocess's would be:
    for error paths, where starting an interpreter and torch would cost seconds each (the
    tests above and below run the entry point itself in subprocesses)."""
    from tbfeat.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: usage errors and --help
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_usage_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tbfeat: error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def tv_checkpoints(tmp_path_factory):
    """A torchvision detector's state dict saved at two epochs, reference format."""
    root = tmp_path_factory.mktemp("tv")
    torch.manual_seed(0)
    model = build("fasterrcnn_mobilenet_v3_large_fpn", weights_backbone=None, num_classes=3)
    torch.save({"model": model.state_dict(), "epoch": 0}, root / "model_0.pth")
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.mul_(1.5)
    torch.save({"model": model.state_dict(), "epoch": 1}, root / "model_1.pth")
    return root


def test_sweep_ultralytics_checkpoints_in_epoch_order_once(tmp_path, yolo_weights):
    logdir = tmp_path / "sweep"
    proc = tbfeat("sweep", yolo_weights, "--images", BUS, "--logdir", logdir, "--imgsz", 64)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "img" in proc.stderr  # the progress bar
    acc = read_events(logdir)
    tags = acc.Tags()["images"]
    assert len(tags) == 2 * 22 + 1 and all(t.endswith("/bus") for t in tags)
    for stage in ("00_Conv", "09_SPPF", "21_C2f"):  # grids and maps at every checkpoint
        for kind in ("features", "cam"):
            assert [e.step for e in acc.Images(f"{kind}/{stage}/bus")] == [1, 2]
    assert [e.step for e in acc.Images("input/bus")] == [1]  # the same image at both
    # again: nothing twice
    again = tbfeat("sweep", yolo_weights, "--images", BUS, "--logdir", logdir, "--imgsz", 64)
    assert again.returncode == 0 and "already in" in again.stderr
    assert [e.step for e in read_events(logdir).Images("features/09_SPPF/bus")] == [1, 2]
    # --overwrite replaces the sweep's run
    over = tbfeat(
        "sweep",
        yolo_weights,
        "--images",
        BUS,
        "--logdir",
        logdir,
        "--imgsz",
        64,
        "--overwrite",
        "--stages",
        "9",
    )
    assert over.returncode == 0, over.stderr[-2000:]
    acc = read_events(logdir)
    assert sorted(acc.Tags()["images"]) == ["cam/09_SPPF/bus", "features/09_SPPF/bus", "input/bus"]
    assert [e.step for e in acc.Images("features/09_SPPF/bus")] == [1, 2]


def test_sweep_state_dicts_with_arch_given_out_of_order(tmp_path, tv_checkpoints):
    logdir = tmp_path / "tv"
    proc = tbfeat(
        "sweep",
        tv_checkpoints / "model_1.pth",
        tv_checkpoints / "model_0.pth",
        "--images",
        BUS,
        "--logdir",
        logdir,
        "--arch",
        "fasterrcnn_mobilenet_v3_large_fpn",
        "--imgsz",
        96,
        "--stages",
        "fpn_0",
        "--max-channels",
        4,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    acc = read_events(logdir)
    assert sorted(acc.Tags()["images"]) == [
        "cam/17_fpn_0/bus", "features/17_fpn_0/bus", "input/bus"
    ]  # fmt: skip
    assert [e.step for e in acc.Images("features/17_fpn_0/bus")] == [1, 2]
    assert [e.step for e in acc.Images("cam/17_fpn_0/bus")] == [1, 2]
    means = [e.value for e in acc.Scalars("stats/17_fpn_0/mean")]
    assert means[0] != means[1]  # two different checkpoints


def test_sweep_errors_exit_2_with_one_line(tmp_path, tv_checkpoints, yolo_weights):
    arch = ["--arch", "fasterrcnn_mobilenet_v3_large_fpn"]
    good = tv_checkpoints / "model_0.pth"
    out = ["--logdir", tmp_path / "err"]
    assert_usage_error(
        tbfeat("sweep", tmp_path / "nope.pt", "--images", BUS, *out),  # the entry point
        "checkpoint not found",
        "nope.pt",
    )
    truncated = tmp_path / "model_5.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    assert_usage_error(
        tbfeat_here("sweep", truncated, "--images", BUS, *out, *arch),
        "model_5.pth",
        "corrupt or truncated",
    )
    assert_usage_error(
        tbfeat_here("sweep", good, "--images", BUS, *out, "--arch", "retinanet_resnet50_fpn"),
        "does not fit retinanet_resnet50_fpn",
        "missing",
    )
    assert_usage_error(
        tbfeat_here("sweep", good, "--images", BUS, *out, "--arch", "fasterrcnn_mobilenet"),
        "unknown arch 'fasterrcnn_mobilenet'",
        "did you mean",
    )
    assert_usage_error(tbfeat_here("sweep", good, "--images", BUS, *out), "--arch")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_usage_error(
        tbfeat_here("sweep", good, "--images", empty, *out, *arch), "no images", "empty"
    )
    bad_image = tmp_path / "broken.jpg"
    bad_image.write_bytes(b"not a jpeg")
    assert_usage_error(
        # (Ultralytics is loaded in this process: its Image.open patch is in the way)
        tbfeat_here("sweep", good, "--images", bad_image, *out, *arch),
        "cannot read image", "broken.jpg", "cannot identify image file",
    )
    assert_usage_error(
        tbfeat_here("sweep", yolo_weights, "--images", BUS, *out, "--stages", "SPFF"),
        "unknown stage 'SPFF'",
        "did you mean 'SPPF'",
    )
    # what was logged before a failing checkpoint stays
    keep = tmp_path / "keep"
    proc = tbfeat_here(
        "sweep",
        good,
        truncated,
        "--images",
        BUS,
        "--logdir",
        keep,
        *arch,
        "--imgsz",
        96,
        "--stages",
        "fpn_0",
    )
    assert_usage_error(proc, "model_5.pth", f"steps 1 are kept in {keep}")
    assert [e.step for e in read_events(keep).Images("features/17_fpn_0/bus")] == [1]
    assert not (tmp_path / "err").exists()  # no failure above created the logdir
    debug = tbfeat("--debug", "sweep", tmp_path / "nope.pt", "--images", BUS, *out)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    # after the subcommand too, down to the first cause that a plain error hides
    debug = tbfeat("sweep", truncated, "--images", BUS, *out, *arch, "--debug")
    chained = ("During handling of the above exception", "was the direct cause")
    assert sum(debug.stderr.count(c) for c in chained) == 2  # 3 errors shown
    assert "corrupt or truncated" in debug.stderr and "SweepError" in debug.stderr


def test_cli_rough_edges(tmp_path):
    # a reader that goes away: a quiet exit, no error
    proc = subprocess.run(
        f"{sys.executable} -m tbfeat stages yolov8n.yaml --imgsz 64 | head -2",
        shell=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert len(proc.stdout.splitlines()) == 2 and proc.stderr == "", proc.stderr
    # --debug after the subcommand, with every cause in the traceback
    debug = tbfeat("stages", "resnet18", "--stages", "layr1", "--debug")
    assert "Traceback" in debug.stderr and "unknown stage 'layr1'" in debug.stderr
    assert_usage_error(
        tbfeat_here("stages", "yolov8n.yml"), "'yolov8n.yml'", "did you mean 'yolov8n.yaml'?"
    )
    bad = tbfeat_here("sweep", "x.pt", "--images", BUS, "--logdir", tmp_path,
                      "--max-channels", 0)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("usage: tbfeat sweep")
    assert "tbfeat sweep: error: argument --max-channels: must be >= 1, got 0" in bad.stderr
    hint = tbfeat_here("stages", "yolov8n.yaml", "--stages", "layer1", "--imgsz", 64)
    assert_usage_error(hint, "unknown stage 'layer1'", "such as 'model.")
    assert "layer1.0.conv1" not in hint.stderr
    assert_usage_error(tbfeat_here("stages", "yolov8n.yaml", "--arch", "resnet18"), "leave it out")
    assert "(default: 8)" in tbfeat_here("sweep", "--help").stdout


def test_sweep_messages_go_above_the_bar_and_printed_commands_are_quoted(tmp_path):
    """What the sweep says while its progress bar is shown starts a line of its own (the
    bar's line is cleared first), and the command it prints pastes into a shell."""
    folder = tmp_path / "my checkpoints"
    folder.mkdir()
    state = build("resnet18").state_dict()
    for name in ("first.pth", "second.pth"):  # no epoch, no number: steps by order
        torch.save(state, folder / name)
    logdir = tmp_path / "my runs" / "it's here"
    proc = tbfeat("sweep", folder, "--arch", "resnet18", "--images", BUS, "--imgsz", 32,
                  "--stages", "layer1", "--logdir", logdir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in proc.stderr.split("\n") if "tbfeat: " in line]
    assert len(said) == 2 and all("stores no epoch and has no number" in s for s in said)
    for line in said:  # after the bar's last carriage return, the message alone
        assert line.split("\r")[-1].startswith("tbfeat: "), repr(line)
    (opened,) = [line for line in proc.stdout.splitlines() if line.startswith("open: ")]
    assert shlex.split(opened.removeprefix("open: ")) == ["tbfeat", "board", str(logdir)]


def test_stages_prints_the_table():
    proc = tbfeat("stages", "yolov8n.yaml", "--imgsz", 64)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    row = next(line for line in lines if "09_SPPF" in line)
    assert row.startswith("*") and "model.9" in row and "1x256x2x2" in row
    head = next(line for line in lines if "22_Detect" in line)
    assert not head.startswith("*")
    tv = tbfeat("stages", "fasterrcnn_resnet50_fpn", "--imgsz", 128)
    assert tv.returncode == 0, tv.stderr[-2000:]
    assert "09_fpn_pool" in tv.stdout and "00_stem" in tv.stdout
    assert_usage_error(tbfeat("stages", "resnet_9000"), "unknown model 'resnet_9000'")


def test_stages_marks_and_measures_the_stages_the_logger_logs():
    spec = ["layer*", "layer1.0.conv1", "fc"]
    proc = tbfeat("stages", "resnet18", "--imgsz", 64, "--stages", *spec)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:-1]]
    marked = {r[2]: r[5] for r in rows if r[0] == "*"}  # tag key: output shape
    model = build("resnet18")
    logger = FeatureLogger(model, stages=spec)
    chosen = {s.key: s.name for s in logger.stages}
    logger.close()
    shapes = {}  # measured with plain forward hooks on the same 64x64 input

    def measure(name):
        def hook(module, args, out):
            shapes.setdefault(name, "x".join(map(str, out.shape)))

        return hook

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(measure(name)) for name in chosen.values()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 64, 64))
    for h in handles:
        h.remove()
    assert marked == {key: shapes[name] for key, name in chosen.items()}
    assert marked["07_layer4"] == "1x512x2x2" and marked["09_Linear"] == "1x1000"


def test_demo_runs_end_to_end_with_few_epochs(tmp_path):
    proc = tbfeat(
        "demo", "--dir", tmp_path / "demo", "--epochs", 2, "--train-images", 16, "--imgsz", 64
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # next steps that run without an activated environment: this interpreter, -m
    assert f"{sys.executable} -m tbfeat board {tmp_path / 'demo'}" in proc.stdout
    assert f"{sys.executable} -m tensorboard.main --logdir" in proc.stdout
    assert "samples_per_plugin images=" in proc.stdout
    train = read_events(tmp_path / "demo" / "train")
    assert [e.step for e in train.Scalars("stats/09_SPPF/mean")] == [1, 2]
    assert [e.step for e in train.Scalars("train/box_loss")] == [1, 2]
    sweep = read_events(tmp_path / "demo" / "sweep")
    assert [e.step for e in sweep.Images("features/09_SPPF/bus")] == [1, 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_board_serves_the_logdir_on_localhost_keeping_the_image_steps_asked(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "run") as w:
        w.add_scalar("x", 1.0, 0)
        for step in range(12):
            w.add_image("features/00_Conv/a", torch.full((1, 2, 2), step / 11), step)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tbfeat",
            "board",
            tmp_path,
            "--port",
            str(port),
            "--image-samples",
            "5",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 60
        body = None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert body is not None and "run" in body
        query = "run=run&tag=features/00_Conv/a"
        url = f"http://127.0.0.1:{port}/data/plugin/images/images?{query}"
        with urllib.request.urlopen(url, timeout=30) as r:
            steps = [e["step"] for e in json.loads(r.read())]
        assert len(steps) == 5 and steps[-1] == 11  # a sample, and always the last
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    # it opens where the story starts: the dashboard that compares steps
    assert f"http://127.0.0.1:{port}/#tbfeat" in output
    assert_usage_error(tbfeat("board", tmp_path / "missing"), "logdir not found")
    bad = tbfeat("board", tmp_path, "--image-samples", "0")
    assert bad.returncode == 2 and "--image-samples: must be >= 1, got 0" in bad.stderr
