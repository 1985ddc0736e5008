"""The tbfeat dashboard in a real TensorBoard (plain ``tensorboard --logdir``, no flag)
and a real browser (Debian's headless Chromium through chromedriver; see
scripts/install_browser.sh), on a 40-step run and a 6-step one of a small model. What
the page shows is compared with the event files as TensorBoard's reader reads them."""

from __future__ import annotations

import base64
import io
import os
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tbfeat.pictures import blend, cam_values

from .helpers import TINY_SHAPES, TWO_RUNS, indices, read_events, screenshots, two_runs

shots = screenshots()

STEPS = TWO_RUNS["a"][0]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    return two_runs(tmp_path_factory.mktemp("dashboard-browser"))


@pytest.fixture(scope="module")
def events(logdir):
    return {run: read_events(logdir / run, derived=True) for run in TWO_RUNS}


@pytest.fixture(scope="module")
def tb(logdir, tmp_path_factory):
    """Plain TensorBoard; ``TBFEAT_TENSORBOARD_PYTHON`` runs it with another environment's
    Python (another TensorBoard release, tbfeat installed there too)."""
    python = os.environ.get("TBFEAT_TENSORBOARD_PYTHON", sys.executable)
    log = tmp_path_factory.mktemp("tb") / "tb.log"
    with shots.TensorBoard(logdir, plain=True, python=python, log=log) as t:
        yield t


# ------------------------------------------------------------------------- helpers
def open_view(browser, tb, state: str = "") -> None:
    shots.open_dashboard(browser, tb, state)


def wait_drawn(browser) -> None:
    shots.wait_for_dashboard(browser)


def address(browser) -> dict[str, str]:
    """The top page's address state (``#tbfeat&key=value``)."""
    href = browser.execute("return window.parent.location.href;")
    parts = urllib.parse.urlsplit(href).fragment.split("&")
    assert parts[0] == "tbfeat", href
    return dict(urllib.parse.unquote(p).split("=", 1) for p in parts[1:])


def cells(browser, selector: str = "img.grid") -> list[dict]:
    return browser.execute(f"""return [...document.querySelectorAll('{selector}')].map((e) => ({{
        run: e.dataset.run, tag: e.dataset.tag, step: Number(e.dataset.step), src: e.src || '',
        width: e.naturalWidth || e.width}}));""")


def headers(browser) -> list[tuple[str, int, str]]:
    return [(h[0], int(h[1]), h[2]) for h in browser.execute(
        "return [...document.querySelectorAll('.head')].map((h) => "
        "[h.dataset.run, h.dataset.step, h.innerText]);")]  # fmt: skip


def canvas_rgb(browser, selector: str, index: int = 0) -> np.ndarray:
    """The pixels of a canvas, or of an image drawn into one, as the browser decoded them."""
    url = browser.execute(f"""const e = document.querySelectorAll('{selector}')[{index}];
        if (e.tagName === 'CANVAS') return e.toDataURL('image/png');
        const c = document.createElement('canvas');
        c.width = e.naturalWidth; c.height = e.naturalHeight;
        c.getContext('2d').drawImage(e, 0, 0);
        return c.toDataURL('image/png');""")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("RGB"))


def logged(events, run: str, tag: str, step: int) -> bytes:
    (event,) = [e for e in events[run].Images(tag) if e.step == step]
    return event.encoded_image_string


def rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def check_cells(tb, events, shown: list[dict]) -> None:
    """Each cell's picture, fetched as the page fetched it, is the logged PNG."""
    for cell in shown:
        path = urllib.parse.urlsplit(cell["src"])
        served = tb.get(path.path, **dict(urllib.parse.parse_qsl(path.query)))
        assert served == logged(events, cell["run"], cell["tag"], cell["step"]), cell


# ------------------------------------------------------------------------- tests
def test_plain_tensorboard_lists_the_dashboard(tb):
    listing = tb.json("/data/plugins_listing")["tbfeat"]
    assert listing["enabled"] is True and listing["tab_name"] == "tbfeat"
    assert listing["loading_mechanism"]["type"] == "IFRAME"


def test_first_view_shows_the_logged_pngs_at_first_middle_and_last_step(browser, tb, events):
    open_view(browser, tb)
    assert [(run, step) for run, step, _ in headers(browser)] == [("a", 0), ("a", 19), ("a", 39)]
    metrics = headers(browser)[1][2]  # the training's metrics at that step, a shared last
    assert "mAP50(B) 0.19" in metrics  # name (box_loss) shown with its whole tag
    assert "train/box_loss 0.05" in metrics and "val/box_loss 0.1" in metrics
    shown = cells(browser)
    stages = [t["tag"].split("/")[1] for t in shown[::3]]
    assert stages == list(TINY_SHAPES)  # forward order, one row per stage with a grid
    assert all(c["width"] > 0 for c in shown)
    check_cells(tb, events, shown)
    # the pixels the browser decoded are the logged ones
    first = shown[0]
    assert np.array_equal(canvas_rgb(browser, "img.grid", 0),
                          rgb(logged(events, "a", first["tag"], first["step"])))  # fmt: skip
    assert address(browser)["steps"] == "0,19,39"


def test_steps_that_tensorboards_sampling_dropped_are_shown(browser, tb, events):
    served = tb.json("/data/plugin/images/images", run="a", tag="features/02_Conv2d/bus")
    kept = {row["step"] for row in served}
    dropped = sorted(set(range(STEPS)) - kept)[:4]
    assert len(kept) == 10 and len(dropped) == 4  # plain TensorBoard keeps 10 steps a tag
    open_view(browser, tb, f"&run=a&image=bus&steps={','.join(map(str, dropped))}")
    assert [step for _, step, _ in headers(browser)] == dropped
    check_cells(tb, events, cells(browser))


def test_a_click_on_a_drift_cell_opens_that_stage_before_and_at_that_step(browser, tb):
    open_view(browser, tb, "&view=drift&run=a")
    selector = "#driftmap .dcell[data-base='02_Conv2d'][data-step='17']"
    cell = browser.execute(f'return document.querySelector("{selector}");')
    title = browser.execute("return arguments[0].title;", cell)
    assert title.startswith("02_Conv2d · step 17 · drift ")
    browser.command("POST", f"/element/{next(iter(cell.values()))}/click", {})
    wait_drawn(browser)
    state = address(browser)
    assert (state["view"], state["stages"], state["steps"]) == ("compare", "02_Conv2d", "0,16,17")
    assert [c["tag"] for c in cells(browser)] == ["features/02_Conv2d/bus"] * 3


def test_the_channel_strip_equals_the_crops_of_the_logged_grids(browser, tb, events):
    open_view(browser, tb, "&run=a&image=zidane&stages=02_Conv2d&steps=5")
    c, h, w = TINY_SHAPES["02_Conv2d"]
    channel = 11  # row 1, column 3 of 8
    img = browser.execute("return document.querySelector('img.grid');")
    width, natural = browser.execute(
        "const i = arguments[0]; return [i.clientWidth, i.naturalWidth];", img)
    scale = width / natural
    row, col = divmod(channel, 8)
    x, y = (col * (w + 1) + w / 2) * scale, (row * (h + 1) + h / 2) * scale
    height = browser.execute("return arguments[0].clientHeight;", img)
    browser.click_at(img, x - width / 2, y - height / 2)
    wait_drawn(browser)
    assert (address(browser)["view"], address(browser)["channel"]) == ("channel", str(channel))
    browser.wait_for("return [...document.querySelectorAll('#strip img.tile')]"
                     ".every((i) => i.complete && i.naturalWidth > 0);")  # fmt: skip
    strip = cells(browser, "#strip img.tile")
    assert [t["step"] for t in strip] == list(range(STEPS))
    for k, tile in enumerate(strip):
        grid = rgb(logged(events, "a", "features/02_Conv2d/zidane", tile["step"]))
        crop = grid[row * (h + 1) : row * (h + 1) + h, col * (w + 1) : col * (w + 1) + w]
        assert np.array_equal(canvas_rgb(browser, "#strip img.tile", k), crop), tile["step"]


def test_two_runs_side_by_side(browser, tb, events):
    open_view(browser, tb, "&run=a&runB=b&image=bus&steps=0,5")
    assert [(run, step) for run, step, _ in headers(browser)] == [
        ("a", 0), ("b", 0), ("a", 5), ("b", 5)]  # fmt: skip
    shown = cells(browser)
    assert [c["run"] for c in shown[:4]] == ["a", "b", "a", "b"]
    check_cells(tb, events, shown)
    assert browser.execute("return document.querySelector('#runB').value;") == "b"


def test_a_deep_link_reproduces_the_view_and_maps_are_drawn_over_the_input(browser, tb, events):
    state = "&run=b&image=zidane&steps=2,4&mode=both&stages=03_ReLU&alpha=0.3"
    open_view(browser, tb, state)
    assert [step for _, step, _ in headers(browser)] == [2, 4]
    assert {c["tag"] for c in cells(browser)} == {"features/03_ReLU/zidane"}
    maps = cells(browser, "canvas.cam")
    assert [(m["tag"], m["step"]) for m in maps] == [("cam/03_ReLU/zidane", 2),
                                                     ("cam/03_ReLU/zidane", 4)]  # fmt: skip
    assert {k: address(browser)[k] for k in ("run", "image", "steps", "mode", "stages", "alpha")} \
        == {"run": "b", "image": "zidane", "steps": "2,4", "mode": "both", "stages": "03_ReLU",
            "alpha": "0.3"}  # fmt: skip
    # the map at its stage's resolution, drawn over the probe picture at the picture's size
    (picture,) = events["b"].Images("input/zidane")
    expected = blend(rgb(picture.encoded_image_string),
                     cam_values(indices([e for e in events["b"].Images("cam/03_ReLU/zidane")
                                         if e.step == 4][0])), alpha=0.3)  # fmt: skip
    drawn = canvas_rgb(browser, "canvas.cam", 1)
    assert drawn.shape == expected.shape
    # the browser's own bilinear resize: within a few levels of numpy's
    assert np.abs(drawn.astype(int) - expected.astype(int)).mean() < 4


def test_arrow_keys_move_the_step_columns(browser, tb):
    open_view(browser, tb, "&run=a&image=bus&steps=0,19,39")
    browser.execute("document.body.focus(); window.focus();")
    browser.press(browser.RIGHT)
    wait_drawn(browser)
    assert address(browser)["steps"] == "1,20,39"
    browser.press(browser.LEFT)
    browser.press(browser.LEFT)
    wait_drawn(browser)
    assert address(browser)["steps"] == "0,18,37"
