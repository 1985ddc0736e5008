"""End to end in the real TensorBoard: a `tbfeat demo` run (2 epochs of YOLOv8n, its epoch
checkpoints swept over bus.jpg and zidane.jpg) served by the TensorBoard server that
`tbfeat board` starts, read back through TensorBoard's own HTTP data endpoints and shown
in headless Chromium (scripts/install_browser.sh installs it; without it the browser test
is skipped, or fails when CI is set).

The server and browser helpers live in scripts/screenshots.py, which takes the README's
screenshots the same way.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tbfeat.cli import BOARD_IMAGE_SAMPLES

from .helpers import screenshots

pytest.importorskip("ultralytics")  # the demo trains YOLOv8n

shots = screenshots()

RUNS = ("sweep", "train")
STEPS = [1, 2]
# YOLOv8n's layers without the Detect head
STAGES = [
    "00_Conv", "01_Conv", "02_C2f", "03_Conv", "04_C2f", "05_Conv", "06_C2f", "07_Conv",
    "08_C2f", "09_SPPF", "10_Upsample", "11_Concat", "12_C2f", "13_Upsample", "14_Concat",
    "15_C2f", "16_Conv", "17_Concat", "18_C2f", "19_Conv", "20_Concat", "21_C2f",
]  # fmt: skip
STATS = ["mean", "std", "min", "max", "zero_fraction", "negative_fraction", "nonfinite_count"]
PROBES = {"sweep": ["bus", "zidane"], "train": ["val_000", "val_001", "val_002", "val_003"]}
METRICS = [  # the demo's Ultralytics losses and metrics, in the training run
    "train/box_loss", "train/cls_loss", "train/dfl_loss", "val/box_loss", "val/cls_loss",
    "val/dfl_loss", "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)",
    "metrics/mAP50-95(B)",
]  # fmt: skip
STAGE = "09_SPPF"  # the stage the browser filters to
# TensorBoard plugins: /data/plugin/<name>/tags and /data/plugin/<name>/<name>?run=&tag=,
# read by EventAccumulator.Tags()[<name>] and EventAccumulator.<Name>(tag)
PLUGINS = ("images", "histograms", "scalars")


def expected_steps(tag: str) -> list[int]:
    """Every epoch; Ultralytics' metrics also at the final validation of best.pt, one
    step on (as its own TensorBoard callback writes them)."""
    return [*STEPS, STEPS[-1] + 1] if tag.startswith("metrics/") else STEPS


def expected_tags(run: str) -> dict[str, set[str]]:
    return {
        "images": {f"features/{s}/{p}" for s in STAGES for p in PROBES[run]},
        "histograms": {f"activations/{s}" for s in STAGES},
        "scalars": {f"stats/{s}/{n}" for s in STAGES for n in STATS}
        | (set(METRICS) if run == "train" else set()),
    }


def event_steps(events) -> dict[tuple[str, str, str], list[int]]:
    """(plugin, run, tag) -> steps, as TensorBoard's own reader reads the event files."""
    out = {}
    for run, acc in events.items():
        tags = acc.Tags()
        for plugin in PLUGINS:
            for tag in tags[plugin]:
                values = getattr(acc, plugin.capitalize())(tag)
                out[(plugin, run, tag)] = [e.step for e in values]
    return out


def read_events(logdir: Path) -> EventAccumulator:
    """Every event of a run folder, nothing sampled away."""
    acc = EventAccumulator(
        str(logdir), size_guidance={"images": 0, "scalars": 0, "histograms": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def fetch_all(tb, requests: list[tuple[str, dict]], parse=True) -> list:
    """Many GETs at once: each of TensorBoard's image and histogram answers waits ~40 ms
    on the data server, so one at a time they would take most of a minute."""
    get = tb.json if parse else tb.get
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda r: get(r[0], **r[1]), requests))


def served_data(tb) -> dict[tuple[str, str, str], list]:
    """(plugin, run, tag) -> the rows TensorBoard's data endpoints serve."""
    keys = [
        (plugin, run, tag)
        for plugin in PLUGINS
        for run, tags in tb.json(f"/data/plugin/{plugin}/tags").items()
        for tag in tags
    ]
    rows = fetch_all(tb, [(f"/data/plugin/{p}/{p}", {"run": r, "tag": t}) for p, r, t in keys])
    return dict(zip(keys, rows, strict=True))


def row_step(plugin: str, row) -> int:
    return row["step"] if plugin == "images" else row[1]  # scalars, histograms: [wall, step, x]


def served_steps(tb) -> dict[tuple[str, str, str], list[int]]:
    return {k: [row_step(k[0], r) for r in rows] for k, rows in served_data(tb).items()}


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    # 64 images at batch 16: one optimizer step per epoch (Ultralytics accumulates to 64),
    # so the two epochs' feature maps differ
    cmd = [sys.executable, "-m", "tbfeat", "demo", "--dir", str(root), "--epochs", "2"]
    cmd += ["--train-images", "64", "--imgsz", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def events(demo):
    return {run: read_events(demo / run) for run in RUNS}


@pytest.fixture(scope="module")
def board(demo, events, tmp_path_factory):
    """The TensorBoard server `tbfeat board` runs, on a free port, stopped at the end;
    yielded once it serves every step of the event files (its data server loads them
    after it starts answering) or after 60 s."""
    tb = shots.TensorBoard(demo, log=tmp_path_factory.mktemp("tb") / "tensorboard.log")
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(demo)]
    command += ["--host", "127.0.0.1", "--port", str(tb.port)]
    command += ["--samples_per_plugin", f"images={BOARD_IMAGE_SAMPLES}"]
    assert tb.command == command  # as `tbfeat board` runs it
    tb.start(timeout=60)
    try:
        want = event_steps(events)
        deadline = time.monotonic() + 60
        tb.wait_for(lambda: served_steps(tb) == want or time.monotonic() > deadline, timeout=90)
        yield tb  # the tests compare what is served then
    finally:
        tb.stop()
        assert tb.proc.returncode is not None


# ------------------------------------------------------------------------- tests
def test_demo_logs_every_stage_at_every_epoch(events):
    got = event_steps(events)
    for run in RUNS:
        for plugin, tags in expected_tags(run).items():
            missing = sorted(tags - {t for p, r, t in got if (p, r) == (plugin, run)})
            assert not missing, (run, plugin, missing[:10])
            for tag in tags:
                assert got[(plugin, run, tag)] == expected_steps(tag), (run, plugin, tag)


def test_tensorboard_serves_every_tag_and_step(board, events):
    served = served_steps(board)
    want = event_steps(events)
    assert sorted(served) == sorted(want)  # the same runs and tags, nothing else
    assert served == want  # every step of every tag: none sampled away
    for run in RUNS:
        for plugin, tags in expected_tags(run).items():
            for tag in tags:
                assert served[(plugin, run, tag)] == expected_steps(tag), (plugin, run, tag)
    images = board.json("/data/plugin/images/tags")
    assert images["sweep"][f"features/{STAGE}/bus"]["samples"] == 1


def test_served_scalars_and_histograms_are_the_logged_values(board, events):
    served = served_data(board)
    for run, acc in events.items():
        for tag in acc.Tags()["scalars"]:
            rows, logged = served[("scalars", run, tag)], acc.Scalars(tag)
            assert [r[1] for r in rows] == [e.step for e in logged]
            assert [r[2] for r in rows] == pytest.approx([e.value for e in logged], rel=1e-6)
        for tag in acc.Tags()["histograms"]:
            rows, logged = served[("histograms", run, tag)], acc.Histograms(tag)
            assert [r[1] for r in rows] == [e.step for e in logged]
            for (_, _, buckets), event in zip(rows, logged, strict=True):
                h = event.histogram_value
                assert h.num > 0
                assert sum(b[2] for b in buckets) == pytest.approx(h.num)
                assert buckets[0][0] == pytest.approx(h.min)
                assert buckets[-1][1] == pytest.approx(h.max)
    # training moved the weights: the statistics differ between the two epochs
    means = served[("scalars", "sweep", f"stats/{STAGE}/mean")]
    assert means[0][2] != means[1][2]


def test_served_images_are_the_logged_pngs(board, events):
    served = served_data(board)
    keys = [k for k in served if k[0] == "images"]
    queries = [
        ("/data/plugin/images/individualImage?" + row["query"], {})
        for k in keys
        for row in served[k]
    ]
    pngs = iter(fetch_all(board, queries, parse=False))
    changed = Counter()
    for _, run, tag in keys:
        logged = events[run].Images(tag)
        assert [r["step"] for r in served[("images", run, tag)]] == [e.step for e in logged]
        seen = set()
        for event in logged:
            png = next(pngs)
            assert png == event.encoded_image_string, (run, tag, event.step)
            with Image.open(io.BytesIO(png)) as im:
                assert im.format == "PNG"
                assert im.size == (event.width, event.height), (run, tag, event.step)
                im.load()
            seen.add(png)
        if tag.startswith("features/"):
            changed[run] += len(seen) > 1
    # one optimizer step per epoch changes the feature maps of most stages
    for run in RUNS:
        assert changed[run] >= len(STAGES) * len(PROBES[run]) // 2, changed


def test_images_dashboard_in_headless_chromium(browser, board, events, tmp_path):
    browser.get(shots.dashboard_url(board, "images", f"features/{STAGE}/"))
    want = {(run, f"features/{STAGE}/{p}") for run in RUNS for p in PROBES[run]}
    cards = shots.wait_for_image_cards(browser, len(want))
    assert {(c["run"], c["tag"]) for c in cards} == want  # the filter keeps this stage only
    for card in cards:
        logged = events[card["run"]].Images(card["tag"])
        assert card["steps"] == STEPS
        assert card["slider"] is not None and card["slider"]["shown"], card
        assert card["slider"]["max"] == len(STEPS) - 1
        assert card["step"] == STEPS[-1]  # the slider starts at the latest step
        assert card["tag"] in card["heading"] and f"step {STEPS[-1]}" in card["heading"]
        assert card["image"]["shown"]
        assert (card["image"]["width"], card["image"]["height"]) == (
            logged[-1].width,
            logged[-1].height,
        )

    # step the bus card back one epoch from the keyboard (ArrowLeft on its slider)
    tag = f"features/{STAGE}/bus"
    slider = browser.execute("return imageSlider(arguments[0], 'sweep');", tag)
    assert slider is not None
    browser.send_keys(slider, browser.LEFT)
    card = browser.wait_for(
        "return imageCards().find((c) => c.tag === arguments[0] && c.run === 'sweep'"
        " && c.step === arguments[1] && c.image && !c.loading) || null;",
        tag,
        STEPS[0],
        what=f"{tag} at step {STEPS[0]}",
    )
    first = events["sweep"].Images(tag)[0]
    assert f"step {STEPS[0]}" in card["heading"]
    assert (card["image"]["width"], card["image"]["height"]) == (first.width, first.height)
    shown_png = board.get(card["image"]["src"].removeprefix(board.url))
    assert shown_png == first.encoded_image_string  # the card shows epoch 1's grid
    others = [c for c in shots.image_cards(browser) if c["tag"] != tag]
    assert all(c["step"] == STEPS[-1] for c in others)  # one slider per card

    time.sleep(0.5)  # the new image paints
    path = shots.save_png(browser.screenshot(), tmp_path / "images_dashboard.png")
    assert path.stat().st_size > 10_000
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    assert rgb.size == shots.VIEWPORT
    colours, counts = np.unique(np.asarray(rgb).reshape(-1, 3), axis=0, return_counts=True)
    assert len(colours) > 50, len(colours)
    assert counts.max() < 0.9 * counts.sum()  # not blank
    # the grid itself is drawn: its box on the page holds many colormap colours
    r = card["image"]["rect"]
    box = [round(r["x"]) + 1, round(r["y"]) + 1]
    box += [round(r["x"] + r["width"]) - 1, round(r["y"] + r["height"]) - 1]
    grid = np.unique(np.asarray(rgb.crop(box)).reshape(-1, 3), axis=0)
    assert len(grid) >= 8, grid


def test_the_overview_layout_is_served_and_charts_every_stages_drift(board, demo):
    """TensorBoard's custom scalars plugin serves the run's layout (where ``tbfeat board``
    opens), and its drift charts name every drift tag the training logged."""
    layout = board.json("/data/plugin/custom_scalars/layout")
    (category,) = [c for c in layout["category"] if c["title"] == "tbfeat overview"]
    charts = {c["title"]: c["multiline"]["tag"] for c in category["chart"]}
    for run in RUNS:
        tags = read_events(demo / run).Tags()["scalars"]
        drift = {t for t in tags if t.startswith("drift/")}
        # each chart entry is a regex TensorBoard matches from the start of a tag
        drawn = {
            title: {t for t in drift if any(re.match(p, t) for p in patterns)}
            for title, patterns in charts.items()
        }
        assert drift, run
        assert drawn["drift vs the step before"] == {
            t for t in drift if not t.endswith("_vs_first")
        }, run
        assert drawn["drift vs the first step"] == {t for t in drift if t.endswith("_vs_first")}


def test_the_dashboard_on_the_demo_shows_the_logged_grids_and_the_trainings_metrics(
    browser, board, events
):
    """``tbfeat board`` opens the dashboard (``#tbfeat``): the training run's first view
    holds the logged grids of every stage at its epochs, and each column's header the
    mAP50 that Ultralytics logged at that epoch."""
    browser.get(f"{board.url}/#tbfeat&run=train&image=val_000")
    browser.command("POST", "/refresh", {})
    frame = browser.wait_for("const f = deepAll('iframe'); return f.length ? f[0] : null;")
    browser.frame(frame)
    try:
        browser.wait_for("return document.body.dataset.ready === '1';", what="the dashboard")
        shown = browser.execute(
            "return [...document.querySelectorAll('img.grid')].map((i) => "
            "[i.dataset.tag, Number(i.dataset.step), i.src]);"
        )
        heads = browser.execute(
            "return [...document.querySelectorAll('.head')].map((h) => h.innerText);"
        )
    finally:
        browser.frame(None)
    assert {tag.split("/")[1] for tag, _, _ in shown} == set(STAGES)
    assert sorted({step for _, step, _ in shown}) == STEPS
    for tag, step, src in shown:
        (event,) = [e for e in events["train"].Images(tag) if e.step == step]
        assert board.get(src.removeprefix(board.url)) == event.encoded_image_string, (tag, step)
    for step, head in zip(STEPS, heads, strict=True):
        (m,) = [e.value for e in events["train"].Scalars("metrics/mAP50(B)") if e.step == step]
        assert f"step {step}" in head and "mAP50(B)" in head, head
        if m == 0 or 0.001 <= abs(m) < 1000:  # 3 significant digits, as the page writes them
            assert f"mAP50(B) {float(f'{m:.3g}'):g}" in head, (head, m)
