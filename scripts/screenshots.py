"""Documentation screenshots of tbfeat runs in the real TensorBoard, taken with headless
Chromium; also the browser and server helpers of tests/test_tensorboard_e2e.py.

    python scripts/screenshots.py                     # tbfeat demo (10 epochs), then docs/*.png
    python scripts/screenshots.py --logdir runs/demo  # an existing demo run instead
    scripts/install_browser.sh                        # once: Debian's chromium + chromedriver

Writes docs/dashboard_compare.png, docs/dashboard_cams.png, docs/dashboard_drift.png and
docs/dashboard_channel.png (the tbfeat dashboard: a few stages' grids and maps at the
first, a middle and the last step, the drift map, one channel at every step),
docs/grid_epoch1.png and docs/grid_epoch<last>.png (the Images dashboard filtered to
the same stages of bus.jpg, every card's step slider at the first or the last epoch),
docs/histograms.png (activation histograms), docs/scalars.png (statistics
scalars), docs/overview_drift.png (the training run's drift overview, as logged) and
docs/export_grid.png (``tbfeat export``'s figure of one stage of the sweep).

The browser is driven through chromedriver's W3C WebDriver HTTP API with urllib (about a
hundred lines below, no Python dependency): the Debian packages ``chromium`` and
``chromium-driver`` are the same build, and nothing here can download a browser or a
driver. TensorBoard's dashboards are Polymer elements inside shadow roots, so the page is
inspected and driven with small scripts that walk the shadow trees.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]
VIEWPORT = (1200, 800)
MAX_PNG_BYTES = 400_000


def browser_missing() -> str | None:
    """Why the browser cannot run here, or ``None``."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return f"{' and '.join(missing)} not installed (run scripts/install_browser.sh)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# ------------------------------------------------------------------------- TensorBoard
class TensorBoard:
    """The real TensorBoard server on 127.0.0.1 and a free port, as ``tbfeat board`` runs
    it (or, with ``plain``, as ``tensorboard --logdir`` does, run by ``python``: another
    environment's TensorBoard); a context manager that always stops it."""

    def __init__(
        self,
        logdir: str | Path,
        *,
        port: int | None = None,
        log: Path | None = None,
        plain: bool = False,
        python: str = sys.executable,
    ):
        from tbfeat.cli import board_command

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = board_command(logdir, self.port)
        if plain:  # plain `tensorboard --logdir`, with no flag of tbfeat's
            self.command = [python, "-m", "tensorboard.main", "--logdir", str(logdir),
                            "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        self.own_log = log is None  # removed by stop()
        if log is None:
            fd, name = tempfile.mkstemp(prefix="tensorboard-", suffix=".log")
            os.close(fd)
            log = Path(name)
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> TensorBoard:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"TensorBoard exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                self.get("/data/plugins_listing", timeout=2)
                return self
            except OSError:  # urllib's URLError included
                if time.monotonic() > deadline:
                    message = f"TensorBoard did not answer in {timeout:.0f}s:\n{self.tail()}"
                    self.stop()
                    raise TimeoutError(message) from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
        if self.own_log:
            self.log.unlink(missing_ok=True)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 30, **params: Any) -> bytes:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=timeout) as response:
            return response.read()

    def json(self, path: str, **params: Any) -> Any:
        return json.loads(self.get(path, **params))

    def wait_for(self, check, timeout: float = 60, what: str = "data") -> Any:
        """Poll ``check()`` until it returns something truthy (TensorBoard's data server
        loads event files after it starts answering)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = check()
            except (OSError, ValueError):  # a tag not loaded yet answers 404
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"TensorBoard did not serve {what} in {timeout:.0f}s")
            time.sleep(0.5)

    def __enter__(self) -> TensorBoard:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ------------------------------------------------------------------------- browser
_DEEP = """
const deepAll = (selector, root = document) => {
  const found = [];
  const walk = (node) => {
    found.push(...node.querySelectorAll(selector));
    for (const el of node.querySelectorAll('*')) if (el.shadowRoot) walk(el.shadowRoot);
  };
  walk(root);
  return found;
};
// Cards under "Tags matching /filter/" (the search-results category of a dashboard).
const searchResults = (selector) => deepAll('tf-category-paginated-view')
  .filter((view) => view.category && view.category.metadata
          && view.category.metadata.type === 0)
  .flatMap((view) => [...view.querySelectorAll(selector)]);
const shown = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
const imageCards = () => searchResults('tf-image-loader').map((el) => {
  const root = el.shadowRoot;
  const img = root.querySelector('#main-image-container img');
  const slider = root.querySelector('paper-slider#steps');
  const heading = root.querySelector('tf-card-heading');
  return {
    tag: el.tag, run: el.run,
    steps: (el._steps || []).map((s) => s.step),
    stepIndex: el._stepIndex,
    step: el._stepValue,
    heading: heading ? (heading.shadowRoot.querySelector('figcaption').innerText + ' '
        + heading.innerText).replace(/\\s+/g, ' ').trim() : '',
    slider: slider ? {max: slider.max, value: slider.value, shown: shown(slider)} : null,
    image: img && img.complete && img.naturalWidth > 0 ?
        {src: img.src, width: img.naturalWidth, height: img.naturalHeight, shown: shown(img),
         rect: (({x, y, width, height}) => ({x, y, width, height}))(img.getBoundingClientRect())}
        : null,
    loading: !!el._isImageLoading,
    shown: shown(el),
  };
});
const imageSlider = (tag, run) => searchResults('tf-image-loader')
  .filter((el) => el.tag === tag && el.run === run)
  .map((el) => el.shadowRoot.querySelector('paper-slider#steps'))[0] || null;
const setImageStep = (index) => {
  const cards = searchResults('tf-image-loader');
  for (const el of cards) {
    const last = (el._steps || []).length - 1;
    el._stepIndex = index < 0 ? last + 1 + index : Math.min(index, last);
  }
  return cards.length;
};
const histogramCards = () => searchResults('tf-histogram-loader').map((el) => ({
  tag: el.tag, run: el.run, shown: shown(el), loaded: !!el.dataLoadedAtLeastOnce,
  loading: !!el.dataLoading, paths: deepAll('path', el.shadowRoot).length,
}));
const scalarCards = () => searchResults('tf-scalar-card').map((el) => ({
  tag: el.tag, shown: shown(el), lines: deepAll('path.line', el.shadowRoot).length,
}));
const uncheck = (label) => {
  const box = deepAll('paper-checkbox').find((el) => el.textContent.includes(label));
  if (box && box.checked) box.click();
  return box ? !box.checked : null;
};
"""


class WebDriverError(RuntimeError):
    pass


class Browser:
    """Headless Chromium driven through chromedriver's W3C WebDriver HTTP API.

    A fresh ``--user-data-dir`` in a temporary folder each time; ``close()`` ends the
    session, chromedriver (which ends Chromium) and removes the profile."""

    def __init__(self, viewport: tuple[int, int] = VIEWPORT):
        reason = browser_missing()
        if reason:
            raise FileNotFoundError(reason)
        self.tmp = Path(tempfile.mkdtemp(prefix="tbfeat-chromium-"))
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.log = self.tmp / "chromedriver.log"
        self.driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={port}", f"--log-path={self.log}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        self.session: str | None = None
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if self._call("GET", "/status", timeout=2).get("ready"):
                        break
                except (OSError, WebDriverError):
                    pass
                if self.driver.poll() is not None or time.monotonic() > deadline:
                    raise WebDriverError(f"chromedriver did not start: {self._log_tail()}")
                time.sleep(0.1)
            width, height = viewport
            args = [*CHROMIUM_ARGS, f"--user-data-dir={self.tmp / 'profile'}"]
            args.append(f"--window-size={width},{height}")
            capabilities = {
                "browserName": "chrome",
                "pageLoadStrategy": "normal",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            }
            value = self._call(
                "POST", "/session", {"capabilities": {"alwaysMatch": capabilities}}, timeout=60
            )
            self.session = value["sessionId"]
            self.version = value["capabilities"].get("browserVersion", "?")
            self.command("POST", "/timeouts", {"pageLoad": 60_000, "script": 60_000})
            self.set_viewport(width, height)
        except BaseException:
            self.close()
            raise

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 90) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as e:
            try:
                value = json.loads(e.read())["value"]
                message = f"{value.get('error')}: {value.get('message', '')[:1000]}"
            except (ValueError, KeyError, AttributeError):
                message = str(e)
            raise WebDriverError(f"{method} {path}: {message}") from None

    def command(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self.command("POST", "/url", {"url": url})

    def execute(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``deepAll(selector)`` finds elements through
        shadow roots) and return its JSON result."""
        return self.command("POST", "/execute/sync", {"script": _DEEP + script, "args": args})

    def wait_for(self, script: str, *args: Any, timeout: float = 60, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.execute(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never showed {what or script!r} in {timeout:.0f}s")
            time.sleep(0.25)

    def set_viewport(self, width: int, height: int) -> None:
        """Resize the window so that the page itself gets ``width`` x ``height`` px."""
        for _ in range(3):
            inner = self.execute("return [window.innerWidth, window.innerHeight];")
            if inner == [width, height]:
                return
            rect = self.command("GET", "/window/rect")
            self.command(
                "POST",
                "/window/rect",
                {
                    "width": rect["width"] + width - inner[0],
                    "height": rect["height"] + height - inner[1],
                },
            )

    def send_keys(self, element: dict[str, str], text: str) -> None:
        """Type ``text`` into an element returned by ``execute`` (W3C key codes: ``LEFT``)."""
        (element_id,) = element.values()
        self.command("POST", f"/element/{element_id}/value", {"text": text})

    LEFT = "\ue012"
    RIGHT = "\ue014"

    def frame(self, element: dict[str, str] | None) -> None:
        """Drive the iframe ``element`` (from ``execute``), or the top page with ``None``."""
        if element is None:
            self.command("POST", "/frame/parent", {})
        else:
            self.command("POST", "/frame", {"id": element})

    def click_at(self, element: dict[str, str], x: float, y: float) -> None:
        """A real mouse click at ``(x, y)`` CSS pixels from the element's centre."""
        move = {"type": "pointerMove", "origin": element, "x": round(x), "y": round(y)}
        self._actions("pointer", [move, {"type": "pointerDown", "button": 0},
                                  {"type": "pointerUp", "button": 0}])  # fmt: skip

    def press(self, key: str) -> None:
        """Press and release a key (W3C key code: ``Browser.RIGHT``) in the focused page."""
        self._actions("key", [{"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}])

    def _actions(self, kind: str, steps: list[dict[str, Any]]) -> None:
        source: dict[str, Any] = {"type": kind, "id": kind, "actions": steps}
        if kind == "pointer":
            source["parameters"] = {"pointerType": "mouse"}
        self.command("POST", "/actions", {"actions": [source]})
        self.command("DELETE", "/actions")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.command("GET", "/screenshot"))

    def close(self) -> None:
        try:
            if self.session is not None:
                self._call("DELETE", f"/session/{self.session}", timeout=30)
        except (OSError, WebDriverError):
            pass
        finally:
            self.session = None
            _stop(self.driver)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------- dashboards
def dashboard_url(
    tensorboard: TensorBoard, plugin: str, tag_filter: str, runs: str = "", **hash_params: Any
) -> str:
    """A dashboard with its tag filter (a regex) and run filter (a regex) set through the
    URL hash, where TensorBoard's dashboards keep them (``tagFilter``, ``regexInput``)."""
    params = {**hash_params, "regexInput": runs, "tagFilter": tag_filter}
    fragment = "&".join(
        f"{k}={urllib.parse.quote(str(v), safe='')}" for k, v in params.items() if v != ""
    )
    return f"{tensorboard.url}/#{plugin}&{fragment}"


def image_cards(browser: Browser) -> list[dict[str, Any]]:
    """The image cards under "Tags matching /filter/": tag, run, steps, the slider, the
    loaded image's natural size."""
    return browser.execute("return imageCards();")


def wait_for_image_cards(browser: Browser, expected: int, timeout: float = 60) -> list[dict]:
    """Until ``expected`` image cards match the filter, each showing a loaded image."""
    deadline = time.monotonic() + timeout
    while True:
        cards = image_cards(browser)
        done = [c for c in cards if c["shown"] and c["image"] and not c["loading"]]
        if len(cards) >= expected and len(done) == len(cards):
            return cards
        if time.monotonic() > deadline:
            raise TimeoutError(f"image cards never loaded: {cards}")
        time.sleep(0.25)


def set_image_step(browser: Browser, index: int) -> None:
    """Move every matching image card's step slider to ``index`` (negative: from the end)."""
    browser.execute("return setImageStep(arguments[0]);", index)


def save_png(png: bytes, path: Path, max_bytes: int = MAX_PNG_BYTES) -> Path:
    """Save a screenshot, re-encoded smaller (optimized, then a 256-colour palette if
    still over ``max_bytes``)."""
    from PIL import Image

    from tbfeat.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        data = io.BytesIO()
        im.save(data, format="PNG", optimize=True)
        if data.tell() > max_bytes:
            data = io.BytesIO()
            palette = im.quantize(256, method=Image.Quantize.MEDIANCUT)
            palette.save(data, format="PNG", optimize=True)
    atomic_write(path, lambda f: f.write(data.getvalue()), durable=False)
    return path


# ------------------------------------------------------------------------- docs
def run_demo(directory: Path, epochs: int, train_images: int, imgsz: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "tbfeat",
        "demo",
        "--dir",
        str(directory),
        "--epochs",
        str(epochs),
        "--train-images",
        str(train_images),
        "--imgsz",
        str(imgsz),
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _save(browser: Browser, path: Path) -> None:
    save_png(browser.screenshot(), path)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)", flush=True)


def take_screenshots(
    logdir: Path, out: Path, stages: list[str], image: str, hist_stages: list[str], stats: str
) -> None:
    """The documentation screenshots of a ``tbfeat demo`` folder (runs ``sweep`` and
    ``train``); the cards come from the sweep over the Ultralytics asset images."""
    from tbfeat import tags

    last_tag = tags.features(stages[-1], image)
    steps = sorted(e.step for e in _accumulator(logdir / "sweep").Images(last_tag))
    with TensorBoard(logdir) as tb, Browser() as browser:
        print(f"TensorBoard at {tb.url}, Chromium {browser.version}", flush=True)

        def served() -> bool:
            images = tb.json("/data/plugin/images/images", run="sweep", tag=last_tag)
            return [e["step"] for e in images] == steps

        tb.wait_for(served, what=f"every step of {last_tag}")

        grid = tags.pattern(*(tags.features(s, image) for s in stages))
        browser.get(dashboard_url(tb, "images", grid, runs="^sweep$"))
        wait_for_image_cards(browser, len(stages))
        save_first_and_last(browser, steps, out / "grid_epoch{step}.png")

        # class activation maps: the training run's probes, validation shapes the model
        # learns to find (the sweep's photos hold nothing it was trained on)
        train = _accumulator(logdir / "train")
        parsed = [tags.parse(t) for t in train.Tags()["images"]]
        shape = sorted(p.image for p in parsed if p and p.kind == "cam" and p.base == stages[0])[0]
        take_dashboard(tb, browser, out, stages, image, shape)

        hist = tags.pattern(*map(tags.activations, hist_stages))
        browser.get(dashboard_url(tb, "histograms", hist, runs="^sweep$"))
        browser.wait_for(
            "const cards = histogramCards(); return cards.length === arguments[0]"
            " && cards.every((c) => c.loaded && !c.loading && c.paths > 0);",
            len(hist_stages),
            what="histogram charts",
        )
        time.sleep(1.5)  # the chart's transitions
        _save(browser, out / "histograms.png")

        browser.get(dashboard_url(tb, "scalars", stats, runs="^sweep$", _smoothingWeight=0))
        browser.wait_for("return uncheck('Ignore outliers');", what="the outlier checkbox")
        browser.wait_for(
            "const cards = scalarCards();"
            " return cards.length > 0 && cards.every((c) => c.lines > 0);",
            what="scalar charts",
        )
        time.sleep(1.5)
        _save(browser, out / "scalars.png")

        drift = tags.pattern(*map(tags.drift, stages))
        browser.get(dashboard_url(tb, "scalars", drift, runs="^sweep$", _smoothingWeight=0))
        browser.wait_for("return uncheck('Ignore outliers');", what="the outlier checkbox")
        browser.wait_for(
            "const cards = scalarCards();"
            " return cards.length === arguments[0] && cards.every((c) => c.lines > 0);",
            len(stages),
            what="drift charts",
        )
        time.sleep(1.5)
        _save(browser, out / "drift.png")

        evolution = tags.pattern(*map(tags.evolution, stages[::2]))
        browser.get(dashboard_url(tb, "images", evolution, runs="^sweep$"))
        wait_for_image_cards(browser, len(stages[::2]))
        time.sleep(0.5)
        _save(browser, out / "evolution.png")


def open_dashboard(browser: Browser, tensorboard: TensorBoard, state: str = "") -> None:
    """Open TensorBoard at the tbfeat dashboard (``state``: ``&key=value...``, as in its
    address), drive the dashboard's iframe, and wait until its view is drawn."""
    browser.frame(None)
    browser.get(f"{tensorboard.url}/#tbfeat{state}")
    browser.command("POST", "/refresh", {})  # a new hash alone does not reload the page
    frame = browser.wait_for("const f = deepAll('iframe'); return f.length ? f[0] : null;",
                             timeout=60, what="the dashboard's iframe")  # fmt: skip
    browser.frame(frame)
    wait_for_dashboard(browser)


def wait_for_dashboard(browser: Browser, timeout: float = 120) -> None:
    """Wait until the dashboard's view is drawn, its pictures included."""
    browser.wait_for("return document.body.dataset.ready === '1' && [...document"
                     ".querySelectorAll('img')].every((i) => i.complete || i.loading === 'lazy');",
                     timeout=timeout, what="the dashboard's view")  # fmt: skip


def take_dashboard(tb: TensorBoard, browser: Browser, out: Path, stages: list[str],
                   image: str, shape: str) -> None:  # fmt: skip
    """The dashboard's views: grids and maps side by side, the drift map, one channel."""
    chosen = ",".join(stages)
    views = {
        "dashboard_compare.png": f"&run=sweep&image={image}&stages={chosen}",
        "dashboard_cams.png": f"&run=train&image={shape}&stages={chosen}&mode=cam",
        "dashboard_drift.png": "&run=train&view=drift",
        "dashboard_channel.png": f"&run=sweep&image={image}&view=channel&stage={stages[0]}"
                                 "&channel=3",
    }  # fmt: skip
    for name, state in views.items():
        open_dashboard(browser, tb, state)
        time.sleep(0.5)  # the last pictures paint
        browser.frame(None)
        _save(browser, out / name)


def save_first_and_last(browser: Browser, steps: list[int], pattern: Path) -> None:
    """Screenshots of the image cards with every step slider at the first step, then at
    the last; ``pattern`` holds ``{step}``."""
    for index in (0, -1):
        step = steps[index]
        set_image_step(browser, index)
        browser.wait_for(
            "return imageCards().every((c) => c.step === arguments[0] && c.image"
            " && c.image.src.includes('blob_key') && !c.loading);",
            step,
            what=f"every card at step {step}",
        )
        time.sleep(0.5)  # the new image paints
        _save(browser, Path(str(pattern).format(step=step)))


def save_overview(logdir: Path, out: Path) -> None:
    """The training run's last ``overview/drift`` picture, as logged (no browser)."""
    from tbfeat.tags import OVERVIEW

    events = _accumulator(logdir / "train").Images(OVERVIEW)
    from tbfeat.files import atomic_write

    path = out / "overview_drift.png"
    png = events[-1].encoded_image_string
    atomic_write(path, lambda f: f.write(png), durable=False)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)", flush=True)


def save_export(logdir: Path, out: Path, stage: str, image: str) -> None:
    """``tbfeat export``'s figure of one stage of the sweep at its first, middle and last
    step (150 dpi for the README; exports default to 300)."""
    from tbfeat import tags
    from tbfeat.export import export

    steps = sorted(
        e.step for e in _accumulator(logdir / "sweep").Images(tags.features(stage, image))
    )
    chosen = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    with tempfile.TemporaryDirectory() as tmp:
        written = export(
            logdir / "sweep", tmp, stages=[stage], steps=chosen, images=[image], dpi=150
        )
        (figure,) = [p for p in written if p.name.startswith("features_")]
        path = out / "export_grid.png"
        shutil.copyfile(figure, path)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)", flush=True)


def _accumulator(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, help="an existing `tbfeat demo --dir` folder")
    parser.add_argument("--demo-dir", type=Path, help="where to run the demo (default: temporary)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-images", type=int, default=128)
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument(
        "--stages",
        nargs="+",
        default=["02_C2f", "04_C2f", "06_C2f", "09_SPPF", "15_C2f", "18_C2f"],
        help="stage keys of the grid screenshots",
    )
    parser.add_argument("--image", default="bus", help="probe image of the grid screenshots")
    parser.add_argument(
        "--hist-stages", nargs="+", default=["02_C2f", "04_C2f", "06_C2f", "09_SPPF"]
    )
    parser.add_argument(
        "--stats", help="scalar tag regex (default: the mean and std of 04_C2f and 09_SPPF)"
    )
    args = parser.parse_args(argv)
    reason = browser_missing()
    if reason:
        parser.error(reason)
    sys.path.insert(0, str(ROOT))  # tbfeat.cli.board_command from this checkout
    if args.stats is None:
        from tbfeat import tags

        stats = [tags.stats(b, n) for b in ("04_C2f", "09_SPPF") for n in ("mean", "std")]
        args.stats = tags.pattern(*stats)
    tmp = None
    try:
        logdir = args.logdir
        if logdir is None:
            if args.demo_dir is None:
                tmp = tempfile.mkdtemp(prefix="tbfeat-docs-")
            logdir = args.demo_dir or Path(tmp)
            run_demo(logdir, args.epochs, args.train_images, args.imgsz)
        take_screenshots(logdir, args.out, args.stages, args.image, args.hist_stages, args.stats)
        save_overview(logdir, args.out)
        save_export(logdir, args.out, args.stages[1], args.image)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
