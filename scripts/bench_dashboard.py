"""What the tbfeat dashboard costs on a big run: first view, one cell, server memory.

Writes (or reuses) the synthetic logdir of ``scripts/bench_scale.py`` (300 steps x 8
images x 22 stages by default, with the run's layout and drift), then, on a plain
``tensorboard --logdir`` server with the dashboard and on one without it (the same
TensorBoard, its ``tbfeat`` entry point left out), measures:

- ``first view``: from opening ``#tbfeat`` in headless Chromium until every cell of the
  first view (22 stages x first, middle and last step) is drawn; medians of ``--rounds``
  rounds, each in a fresh page;
- ``one cell``: one grid served by ``/data/plugin/tbfeat/image``, at a random step not
  asked for before (its step's record read and parsed) and again (the record kept);
  medians of 60 requests each;
- ``memory``: the server's resident memory, children included, once it has loaded the
  logdir and then after the dashboard showed the first view, a channel strip of every
  step and the drift map; against the server without the plugin, after the same wait.
- ``tbfeat board``'s server (``--samples_per_plugin images=N``, ``--board N``) for
  comparison: its memory once it has loaded the last step, and how long that took.

    python scripts/bench_dashboard.py
    python scripts/bench_dashboard.py --logdir /tmp/big --keep --board 100000
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import bench_scale  # noqa: E402
import screenshots as shots  # noqa: E402

WITHOUT_PLUGIN = """
import sys
from tensorboard import default, program
plugins = [p for p in default.get_plugins()
           if getattr(p, "plugin_name", None) != "tbfeat"]
tb = program.TensorBoard(plugins=plugins)
tb.configure(argv=[None, *sys.argv[1:]])
sys.exit(tb.main())
"""


def server(logdir: Path, plugin: bool) -> shots.TensorBoard:
    tb = shots.TensorBoard(logdir, plain=True)
    if not plugin:
        tb.command = [sys.executable, "-c", WITHOUT_PLUGIN, *tb.command[3:]]
    return tb.start(timeout=120)


def settle(tb: shots.TensorBoard, seconds: float = 20) -> None:
    """Let TensorBoard's data server load the logdir (it reloads in the background)."""
    time.sleep(seconds)
    tb.get("/data/runs")


def first_view(browser: shots.Browser, tb: shots.TensorBoard) -> float:
    browser.frame(None)
    browser.get("about:blank")
    start = time.perf_counter()
    browser.get(f"{tb.url}/#tbfeat")
    frame = browser.wait_for("const f = deepAll('iframe'); return f.length ? f[0] : null;")
    browser.frame(frame)
    browser.wait_for("return document.body.dataset.ready === '1' && "
                     "[...document.querySelectorAll('img.grid')].every((i) => i.complete);",
                     timeout=120, what="the first view")  # fmt: skip
    seconds = time.perf_counter() - start
    cells = browser.execute("return document.querySelectorAll('img.grid').length;")
    if cells < 3:
        raise SystemExit(f"the first view shows {cells} cells")
    return seconds


def cell_seconds(tb: shots.TensorBoard, steps: int, images: int, stages: int) -> tuple:
    rng = random.Random(0)
    fresh, again = [], []
    for step in rng.sample(range(1, steps + 1), min(60, steps)):
        tag = f"features/{rng.randrange(stages):02d}_Conv2d/img{rng.randrange(images)}"
        for times in (fresh, again):
            start = time.perf_counter()
            tb.get("/data/plugin/tbfeat/image", run=".", tag=tag, step=step)
            times.append(time.perf_counter() - start)
    return statistics.median(fresh), statistics.median(again)


def strip_and_drift(browser: shots.Browser, tb: shots.TensorBoard) -> None:
    """The heaviest views: one channel at every step (every tile loaded), the drift map."""
    for state in ("&view=channel&stage=00_Conv2d&channel=4&image=img0", "&view=drift"):
        shots.open_dashboard(browser, tb, state)
        browser.execute("for (const i of document.querySelectorAll('#strip img'))"
                        " i.loading = 'eager';")  # fmt: skip
        browser.wait_for("return [...document.querySelectorAll('#strip img')]"
                         ".every((i) => i.complete);", timeout=300)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--stages", type=int, default=22)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--logdir", type=Path)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--board", type=int, metavar="N", help="also tbfeat board at images=N")
    args = p.parse_args()
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="tbfeat-bench-dashboard-"))
    try:
        if not any(logdir.glob("events.out.tfevents.*")):
            bench_scale.write_logdir(logdir, args.steps, args.images, args.stages, args.size)
        size = sum(f.stat().st_size for f in logdir.glob("events.out.tfevents.*"))
        print(f"{args.steps} steps x {args.images} images x {args.stages} stages: "
              f"{size / 2**20:.0f} MiB")  # fmt: skip
        rows = measure(logdir, args)
        if args.board is not None:
            row = bench_scale.board_memory(logdir, args.steps, args.images, args.board)
            rows.append((f"tbfeat board, images={args.board}: memory MiB", row["peak MiB"]))
            rows.append((f"tbfeat board, images={args.board}: load s", row["seconds"]))
        for name, value in rows:
            print(f"{name:<52} {value:10.3f}")
    finally:
        if not args.keep and args.logdir is None:
            shutil.rmtree(logdir, ignore_errors=True)


def measure(logdir: Path, args: argparse.Namespace) -> list[tuple[str, float]]:
    rows = []
    tb = server(logdir, plugin=False)
    try:
        settle(tb)
        bare = bench_scale.tree_rss_mib(tb.proc.pid)
    finally:
        tb.stop()
    tb = server(logdir, plugin=True)
    try:
        settle(tb)
        loaded = bench_scale.tree_rss_mib(tb.proc.pid)
        with shots.Browser() as browser:
            views = [first_view(browser, tb) for _ in range(args.rounds)]
            fresh, again = cell_seconds(tb, args.steps, args.images, args.stages)
            strip_and_drift(browser, tb)
        shown = bench_scale.tree_rss_mib(tb.proc.pid)
    finally:
        tb.stop()
    rows += [("first view, median s", statistics.median(views)),
             ("first view, slowest s", max(views)),
             ("one cell, a step not read before, median ms", fresh * 1000),
             ("one cell, its step's record kept, median ms", again * 1000),
             ("server without the plugin, loaded: MiB", bare),
             ("server with the plugin, loaded: MiB", loaded),
             ("server with the plugin, after the views: MiB", shown),
             ("the plugin's share after the views: MiB", shown - bare)]  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
