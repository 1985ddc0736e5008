"""The dashboard's routes, served by TensorBoard's own WSGI application in this process,
on real runs of a small model: every answer is compared with the event files as
TensorBoard's reader reads them, or with what tbfeat export draws."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.application import TensorBoardWSGI
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from tbfeat.dashboard.data import MAX_STEPS
from tbfeat.dashboard.plugin import DashboardPlugin
from tbfeat.export import export

from .helpers import TINY_IMAGES, TINY_SHAPES, TWO_RUNS, read_events, tiny_model, tiny_run, two_runs

STEPS = TWO_RUNS["a"][0]
PREFIX = "/data/plugin/tbfeat"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    return two_runs(tmp_path_factory.mktemp("dashboard"))


@pytest.fixture(scope="module")
def events(logdir):
    return {run: read_events(logdir / run, derived=True) for run in TWO_RUNS}


def serve(logdir: Path) -> Client:
    plugin = DashboardPlugin(base_plugin.TBContext(logdir=str(logdir)))
    return Client(TensorBoardWSGI([plugin]))


@pytest.fixture(scope="module")
def client(logdir) -> Client:
    return serve(logdir)


def get(client: Client, route: str, status: int = 200, **params):
    response = client.get(f"{PREFIX}/{route}", query_string=params)
    assert response.status_code == status, (route, params, response.get_data(as_text=True))
    return response


def get_json(client: Client, route: str, **params):
    return json.loads(get(client, route, **params).get_data())


def rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def test_runs_and_a_runs_layout_are_what_was_logged(client):
    runs = get_json(client, "runs")
    assert [(r["run"], r["steps"], r["first"], r["last"]) for r in runs] == [
        ("a", STEPS, 0, STEPS - 1), ("b", 6, 0, 5)]  # fmt: skip
    info = get_json(client, "run", run="a")
    assert info["images"] == sorted(TINY_IMAGES)
    assert info["steps"]["all"] == info["steps"]["features"] == list(range(STEPS))
    # the stages in forward order, with the shapes the model's own forward gives
    import torch

    shapes, model, x = [], tiny_model(), torch.rand(1, 3, 32, 40)
    for module in model:
        x = module(x)
        shapes.append(tuple(x.shape[1:]))
    assert [tuple(o["shape"]) for o in info["outputs"]] == shapes
    assert [o["base"] for o in info["outputs"]][:5] == list(TINY_SHAPES)
    assert info["grids"] == info["maps"] == list(TINY_SHAPES)
    assert info["inputs"] == {name: [0] for name in TINY_IMAGES}  # written once, unchanged
    assert info["metrics"]["metrics/mAP50(B)"] == [
        [s, pytest.approx(s / 100, rel=1e-6)] for s in range(STEPS)]  # fmt: skip


def test_every_picture_is_served_with_its_logged_bytes(client, events):
    acc = events["a"]
    for tag in acc.Tags()["images"]:
        for event in acc.Images(tag)[::13]:
            response = get(client, "image", run="a", tag=tag, step=event.step)
            assert response.headers["Content-Type"] == "image/png"
            assert response.get_data() == event.encoded_image_string, (tag, event.step)


def test_a_tile_is_the_crop_of_the_logged_grid(client, events):
    # channels "first" (the default): tile i shows channel i, 8 per row, 1 px separators
    for base, (c, h, w) in TINY_SHAPES.items():
        for step in (0, 17, STEPS - 1):
            grid = rgb(events["a"].Images(f"features/{base}/zidane")[step].encoded_image_string)
            for channel in (0, c - 1):
                row, col = divmod(channel, 8)
                crop = grid[row * (h + 1) : row * (h + 1) + h, col * (w + 1) : col * (w + 1) + w]
                tile = get(client, "tile", run="a", tag=f"features/{base}/zidane", step=step,
                           channel=channel).get_data()  # fmt: skip
                assert np.array_equal(rgb(tile), crop), (base, step, channel)


def test_drift_is_every_stages_logged_drift(client, events):
    drift = get_json(client, "drift", run="a")
    assert drift["bases"] == list(TINY_SHAPES)
    assert drift["steps"] == list(range(1, STEPS))
    for i, base in enumerate(drift["bases"]):
        for key, tag in (("delta", f"drift/{base}"), ("first", f"drift/{base}_vs_first")):
            logged = [e.value for e in events["a"].Scalars(tag)]
            assert drift[key][i] == pytest.approx(logged, rel=1e-6, abs=0), (key, base)


def test_figure_is_what_tbfeat_export_draws(client, logdir, tmp_path):
    steps = [0, 20, 39]
    response = get(client, "figure", run="a", kind="features", stage="02_Conv2d",
                   image="bus", steps="0,20,39")  # fmt: skip
    assert "features_02_Conv2d_bus.png" in response.headers["Content-Disposition"]
    (only,) = [p for p in export(logdir / "a", tmp_path, stages=["02_Conv2d"], steps=steps,
                                 images=["bus"]) if p.name.startswith("features_")]  # fmt: skip
    assert np.array_equal(rgb(response.get_data()), rgb(only.read_bytes()))


@pytest.mark.parametrize(
    ("route", "params", "message"),
    [
        ("run", {}, "parameter 'run' is required"),
        ("run", {"run": "nope"}, "unknown run 'nope'; runs: 'a', 'b'"),
        ("image", {"run": "a", "tag": "features/00_Conv2d/bus", "step": "x"},
         "step must be an integer, got 'x'"),
        ("image", {"run": "a", "tag": "features/00_Conv2d/bus", "step": "99999999999999999999"},
         "step must be an integer"),
        ("image", {"run": "a", "tag": "features/00_Conv2d/bus", "step": "40"},
         "run 'a' has no step 40 of tag 'features/00_Conv2d/bus'"),
        ("image", {"run": "a", "tag": "stats/00_Conv2d/mean", "step": "1"},
         "has no tbfeat image tag 'stats/00_Conv2d/mean'"),
        ("image", {"run": "a", "tag": "../../etc/passwd", "step": "1"},
         "has no tbfeat image tag '../../etc/passwd'"),
        ("tile", {"run": "a", "tag": "features/00_Conv2d/bus", "step": "1", "channel": "8"},
         "channel 8 is not in the grid of '00_Conv2d' at step 1"),
        ("tile", {"run": "a", "tag": "cam/00_Conv2d/bus", "step": "1", "channel": "0"},
         "tiles are cut from features/ tags"),
        ("figure", {"run": "a", "kind": "grids", "stage": "00_Conv2d", "image": "bus",
                    "steps": "1"}, "kind must be one of features, cam, got 'grids'"),
        ("figure", {"run": "a", "kind": "cam", "stage": "00_Conv2d", "image": "bus",
                    "steps": ",".join(["1"] * (MAX_STEPS + 1))}, f"at most {MAX_STEPS} steps"),
        ("figure", {"run": "a", "kind": "cam", "stage": "00_Conv2d", "image": "car",
                    "steps": "1"}, "run 'a' has no tag 'cam/00_Conv2d/car'"),
        ("drift", {"run": "a" * 2000}, "longer than 1024 characters"),
    ],
)  # fmt: skip
def test_bad_parameters_are_answered_400_with_a_message(client, route, params, message):
    response = get(client, route, 400, **params)
    assert message in response.get_json()["error"]


def test_only_the_front_ends_own_files_are_served(client):
    entry = get(client, "index.js")
    assert entry.headers["Content-Type"].startswith("text/javascript")
    assert b"export async function render" in entry.get_data()
    assert get(client, "static/style.css").headers["Content-Type"].startswith("text/css")
    for path in ("static/../plugin.py", "static/plugin.py", "static/", "data.py"):
        assert client.get(f"{PREFIX}/{path}").status_code == 404, path


def test_listed_as_an_iframe_dashboard(client):
    listing = json.loads(client.get("/data/plugins_listing").get_data())
    assert listing["tbfeat"]["enabled"] is True
    assert listing["tbfeat"]["loading_mechanism"] == {
        "type": "IFRAME", "module_path": f"{PREFIX}/index.js"}  # fmt: skip


def _event_file(run: Path) -> Path:
    """The run's newest event file of tbfeat's own writer."""
    return max(p for p in run.iterdir() if p.name.startswith("events.out.tfevents")
               and p.name.endswith(".tbfeat"))  # fmt: skip


def test_a_damaged_or_cut_file_shows_what_is_whole(logdir, tmp_path, caplog):
    shutil.copytree(logdir / "b", tmp_path / "b")
    path = _event_file(tmp_path / "b")
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) - 100]))  # the last step cut short
    client = serve(tmp_path)
    assert get_json(client, "run", run="b")["steps"]["all"] == [0, 1, 2, 3, 4]
    # a record damaged in the middle: one line in the server's log, the steps before it kept
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="tbfeat"):
        steps = get_json(serve(tmp_path), "run", run="b")["steps"]["all"]
    assert steps and steps == list(range(len(steps))) and len(steps) < 5
    damaged = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert len(damaged) == 1 and "\n" not in damaged[0].getMessage()


def test_a_run_being_written_shows_its_new_steps_and_never_half_a_record(tmp_path):
    tiny_run(tmp_path / "live", 2)
    client = serve(tmp_path)
    assert get_json(client, "run", run="live")["steps"]["all"] == [0, 1]
    tiny_run(tmp_path / "live", 2, start=2)
    assert get_json(client, "run", run="live")["steps"]["all"] == [0, 1, 2, 3]
    # a record still being written: the new file's last record cut short, then whole
    tiny_run(tmp_path / "live", 1, start=4)
    path = _event_file(tmp_path / "live")
    whole = path.read_bytes()
    path.write_bytes(whole[:-1000])
    assert get_json(client, "run", run="live")["steps"]["all"] == [0, 1, 2, 3]
    path.write_bytes(whole)
    info = get_json(client, "run", run="live")
    assert info["steps"]["all"] == [0, 1, 2, 3, 4]
    events = read_events(tmp_path / "live")
    (last,) = [e for e in events.Images("features/00_Conv2d/bus") if e.step == 4]
    served = get(client, "image", run="live", tag="features/00_Conv2d/bus", step=4).get_data()
    assert served == last.encoded_image_string


def test_the_plugin_never_loads_torch(logdir):
    """TensorBoard imports every installed plugin at start: the dashboard answers its
    routes without torch (0.6 GiB resident on its own)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tensorboard.plugins import base_plugin\n"
        "from werkzeug.test import Client\n"
        "from tensorboard.backend.application import TensorBoardWSGI\n"
        "from tbfeat.dashboard.plugin import DashboardPlugin\n"
        f"plugin = DashboardPlugin(base_plugin.TBContext(logdir={str(logdir)!r}))\n"
        "client = Client(TensorBoardWSGI([plugin]))\n"
        "for route in ('runs', 'run?run=a', 'drift?run=a',\n"
        "              'image?run=a&tag=cam/00_Conv2d/bus&step=3',\n"
        "              'tile?run=a&tag=features/00_Conv2d/bus&step=3&channel=1'):\n"
        "    assert client.get('/data/plugin/tbfeat/' + route).status_code == 200, route\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False"]
