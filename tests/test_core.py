"""The core's ownership guarantees: history at every step end, runs that restart cleanly,
loggers that cross process boundaries, captures never processed off the worker thread,
and imports layered one way."""

import ast
import pickle
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import cloudpickle
import pytest
import torch
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.util.tensor_util import make_ndarray
from torch import nn

from tbfeat import STAT_NAMES, FeatureLogger
from tbfeat.drift import HISTORY_FILE, History

from .helpers import read_events

ROOT = Path(__file__).resolve().parents[1]


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())


def nudge(model: nn.Module, step: int) -> None:
    """A deterministic change of the weights per step (a training step)."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        model[0].weight.add_(0.3 * torch.randn(model[0].weight.shape, generator=g))


PROBES = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))


def drift_at(acc, tag="drift/00_Conv2d"):
    return {e.step: e.value for e in acc.Scalars(tag)}


# ------------------------------------------------------------------ history
def test_history_survives_a_with_block_without_close(tmp_path):
    """Five log() steps inside a with block, then a new logger on the same logdir: the
    new logger continues the history exactly as one uninterrupted logger does."""
    model = net()
    first = FeatureLogger(model, logdir=tmp_path / "split")
    with first:
        for step in range(1, 6):
            nudge(model, step)
            first.log(PROBES, step=step)
    assert History.load(tmp_path / "split" / HISTORY_FILE).last_step == 5  # not closed yet
    nudge(model, 6)
    second = FeatureLogger(model, logdir=tmp_path / "split")
    second.log(PROBES, step=6)
    second.close()

    model = net()
    whole = FeatureLogger(model, logdir=tmp_path / "whole")
    for step in range(1, 7):
        nudge(model, step)
        whole.log(PROBES, step=step)
    whole.close()
    first.close()

    split = read_events(tmp_path / "split", derived=True)
    one = read_events(tmp_path / "whole", derived=True)
    assert sorted(drift_at(split)) == [2, 3, 4, 5, 6]
    assert drift_at(split)[6] == pytest.approx(drift_at(one)[6], abs=1e-6)  # vs step 5
    assert drift_at(split, "drift/00_Conv2d_vs_first")[6] == pytest.approx(
        drift_at(one, "drift/00_Conv2d_vs_first")[6], abs=1e-6
    )
    strip = split.Images("evolution/00_Conv2d")[-1]
    assert strip.step == 6 and strip.width == 6 * (12 + 1) - 1  # 6 columns of 12 px cells


# ------------------------------------------------------------------ restarts
class Served:
    """A logdir as TensorBoard's own Python backend loads it (``EventMultiplexer``, which
    purges orphaned data): each tag's events, as (step, value) for scalars."""

    def __init__(self, logdir) -> None:
        self.mux = EventMultiplexer({"run": str(logdir)}, size_guidance={"tensors": 0})
        self.mux.Reload()

    def steps(self, tag):
        return [e.step for e in self.mux.Tensors("run", tag)]

    def scalars(self, tag):
        return [(e.step, float(make_ndarray(e.tensor_proto))) for e in self.mux.Tensors("run", tag)]

    def image_width(self, tag):
        return int(make_ndarray(self.mux.Tensors("run", tag)[-1].tensor_proto)[0])


def multiplexed(logdir):
    return Served(logdir)


def test_a_new_run_in_an_old_logdir_replaces_the_old_steps(tmp_path):
    model = net()
    old = FeatureLogger(model, logdir=tmp_path)
    for step in (1, 2, 3):
        old.log(PROBES, step=step)
    old.close()
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # the new run's values differ
    time.sleep(1.1)  # event files are named by the second
    new = FeatureLogger(model, logdir=tmp_path)
    with pytest.warns(RuntimeWarning, match="new run in .* replaces the steps from 1 on") as w:
        for step in (1, 2):
            new.log(PROBES, step=step)
        new.close()
    assert len([x for x in w if "new run" in str(x.message)]) == 1  # said once
    with torch.no_grad():
        expected = float(model[0](PROBES).mean())
    served = multiplexed(tmp_path)
    means = served.scalars("stats/00_Conv2d/mean")
    assert [s for s, _ in means] == [1, 2]  # each step once; the old step 3 is gone
    assert all(v == pytest.approx(expected, rel=1e-5) for _, v in means)
    assert served.steps("features/00_Conv2d/0") == [1, 2]
    # the history restarted with the run: no drift at its first step, 2 strip columns
    assert served.steps("drift/00_Conv2d") == [2]
    assert served.image_width("evolution/00_Conv2d") == 2 * 13 - 1
    assert History.load(tmp_path / HISTORY_FILE).first_step == 1


def test_run_modes_append_and_new(tmp_path):
    model = net()
    for step in (1, 2):
        with FeatureLogger(model, logdir=tmp_path / "a", step=step):
            model(PROBES)
    # append: a second logger at an old step adds to the run instead of replacing it
    with FeatureLogger(model, logdir=tmp_path / "a", step=2, run="append"):
        model(PROBES[:1])
    assert multiplexed(tmp_path / "a").steps("stats/00_Conv2d/mean") == [1, 2, 2]
    # new: everything of the old run disappears, also steps before the new first step
    time.sleep(1.1)
    with FeatureLogger(model, logdir=tmp_path / "a", step=5, run="new"):
        model(PROBES)
    assert multiplexed(tmp_path / "a").steps("stats/00_Conv2d/mean") == [5]
    with pytest.raises(ValueError, match="run must be one of 'auto', 'new', 'append'"):
        FeatureLogger(model, run="resume")


# ------------------------------------------------------------------ processes
CHILD = r"""
import pickle, sys
import cloudpickle
import torch
data = sys.stdin.buffer.read()
logger = (cloudpickle if sys.argv[1] == "cloudpickle" else pickle).loads(data)
out = logger.log(step=2)
logger.close()
print("none" if out is None else "logged")
"""


@pytest.mark.parametrize("lib", [pickle, cloudpickle], ids=["pickle", "cloudpickle"])
def test_a_logger_that_has_logged_pickles_and_logs_in_another_process(tmp_path, lib):
    model = net()
    logger = FeatureLogger(model, logdir=tmp_path / "run", images=PROBES, max_channels=4)
    logger.log(step=1)  # the writer thread runs, the writer is open
    data = lib.dumps(logger)
    assert len(data) < 200_000  # configuration: the model, the probe images, the options
    for rank, expect in (("0", "logged"), ("1", "none")):
        env = {"RANK": rank, "PATH": "/usr/bin:/bin"}
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, lib.__name__],
            input=data,
            capture_output=True,
            env=env,
            cwd=ROOT,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        assert proc.stdout.decode().split()[-1] == expect
    logger.log(step=3)  # the original goes on
    logger.close()
    acc = read_events(tmp_path / "run", derived=True)
    assert sorted(e.step for e in acc.Scalars("stats/00_Conv2d/mean")) == [1, 2, 3]
    # the child continued the run's history: drift at its step against step 1
    assert sorted(drift_at(acc)) == [2, 3]
    events = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert len(events) == 2  # the parent's and rank 0's; rank 1 wrote nothing


def test_an_unpickled_logger_is_configured_like_the_original(tmp_path):
    logger = FeatureLogger(
        net(), logdir=tmp_path, stages=[1], step=4, max_channels=3, cmap="magma", run="append"
    )
    copy = pickle.loads(pickle.dumps(logger))
    assert copy.options == logger.options and copy.step == 4 and copy.run == "append"
    assert [s.key for s in copy.stages] == ["01_ReLU"] and copy.logdir == str(tmp_path)
    logger.close()
    copy.close()


def test_a_config_builds_the_same_logger_for_another_copy_of_the_model(tmp_path):
    """What crosses to a DDP rank: the configuration without the model; built there on
    the rank's own model, it continues the run the first logger started."""
    model = net()
    logger = FeatureLogger(model, logdir=tmp_path, stages=[0], step=1, max_channels=3)
    logger.log(PROBES)
    config = logger.config()
    logger.close()
    data = pickle.dumps(config)
    assert len(data) < 2_000 and b"Conv2d" not in data  # no model in it
    copy = pickle.loads(data).build(net())
    assert copy.options == logger.options and copy.logdir == str(tmp_path)
    assert [s.key for s in copy.stages] == ["00_Conv2d"]
    copy.log(PROBES, step=2)
    copy.close()
    acc = read_events(tmp_path, derived=True)
    assert [e.step for e in acc.Scalars("stats/00_Conv2d/mean")] == [1, 2]
    assert sorted(drift_at(acc)) == [2]  # the history went on


# ------------------------------------------------------------------ one owner
def test_captures_are_processed_only_on_the_worker_thread_within_the_budget(tmp_path, monkeypatch):
    """A budget far below one capture: the forward waits for room, never processes
    inline, and every step's statistics are exact."""
    import tbfeat.stats
    import tbfeat.worker

    monkeypatch.setattr(tbfeat.worker, "MAX_INFLIGHT_BYTES", 1024)
    threads = set()
    real = tbfeat.stats.RunningStats.update

    def update(self, x):
        threads.add(threading.current_thread().name)
        time.sleep(0.002)  # a slow writer: the forwards must wait for it
        return real(self, x)

    monkeypatch.setattr(tbfeat.stats.RunningStats, "update", update)
    inputs = [torch.full((2, 3, 16, 16), float(k)) for k in range(8)]

    def run(logdir, xs):
        model = nn.Sequential(*[nn.Identity() for _ in range(6)])
        with FeatureLogger(model, logdir=logdir, grids=False) as logger:
            for step, x in enumerate(xs):
                logger.step = step
                model(x)

    workers = [
        threading.Thread(target=run, args=(tmp_path / f"t{i}", inputs[i::2])) for i in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert threads == {"tbfeat-writer"}
    for i in range(2):
        acc = read_events(tmp_path / f"t{i}")
        for stage in range(6):
            means = [e.value for e in acc.Scalars(f"stats/{stage:02d}_Identity/mean")]
            assert means == [float(k) for k in range(i, 8, 2)]


def test_a_capture_that_finds_no_room_in_time_is_dropped_with_one_warning(tmp_path, monkeypatch):
    import tbfeat.stats
    import tbfeat.worker

    monkeypatch.setattr(tbfeat.worker, "MAX_INFLIGHT_BYTES", 1024)
    monkeypatch.setattr(tbfeat.worker, "WAIT_S", 0.2)
    release = threading.Event()
    real = tbfeat.stats.RunningStats.update

    def stuck(self, x):
        release.wait(30)
        return real(self, x)

    monkeypatch.setattr(tbfeat.stats.RunningStats, "update", stuck)
    model = nn.Sequential(nn.Identity(), nn.Identity())
    logger = FeatureLogger(model, logdir=tmp_path, grids=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.begin()
        out = model(torch.ones(1, 3, 16, 16))  # stage 0 queued and stuck; stage 1 dropped
        release.set()
        logger.end()
        logger.close()
    assert torch.equal(out, torch.ones(1, 3, 16, 16))
    dropped = [str(w.message) for w in caught if "did not make room" in str(w.message)]
    assert len(dropped) == 1 and "01_Identity" in dropped[0]
    tags = read_events(tmp_path).Tags()["scalars"]
    assert sorted(tags) == sorted(f"stats/00_Identity/{n}" for n in STAT_NAMES)


# ------------------------------------------------------------------ structure
def package_imports() -> dict[str, set[str]]:
    """tbfeat module -> tbfeat modules it imports (at module level or inside functions)."""
    graph = {}
    for path in sorted((ROOT / "tbfeat").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                deps.add(target)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tbfeat"):
                deps.add(node.module)
        graph[name] = {d for d in deps if d != name and d != "tbfeat"}
    return graph


def test_imports_are_layered_one_way():
    graph = package_imports()
    assert "tbfeat.logger" in graph and "tbfeat.stages" in graph
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            pytest.fail(f"import cycle: {' -> '.join(path + [node])}")
        if state.get(node) == 2 or node not in graph:
            return
        state[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        state[node] = 2
        order.append(node)

    for node in sorted(graph):
        visit(node, [])
    # the leaves of the core import nothing of tbfeat's upper layers
    for leaf in ("tbfeat.stages", "tbfeat.stats", "tbfeat.render", "tbfeat.options"):
        assert not graph[leaf] & {"tbfeat.logger", "tbfeat.adapters", "tbfeat.recorder"}


TAG_PREFIXES = (
    "features/", "cam/", "input/", "activations/", "stats/", "drift/", "evolution/", "overview/"
)  # fmt: skip


def tag_literals(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of each string constant or f-string in ``path`` that begins with a
    tag prefix (an f-string's first part, and every constant part of it)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            text = first.value if isinstance(first, ast.Constant) else ""
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        if isinstance(text, str) and text.startswith(TAG_PREFIXES):
            found.append((node.lineno, text))
    return sorted(set(found))  # an f-string's first part is also a constant of its own


def test_only_tbfeat_tags_writes_tag_strings():
    own = {text.split("/")[0] + "/" for _, text in tag_literals(ROOT / "tbfeat" / "tags.py")}
    assert own == set(TAG_PREFIXES)  # the check finds what it looks for
    for path in sorted((ROOT / "tbfeat").rglob("*.py")):
        if path.name == "tags.py" and path.parent.name == "tbfeat":
            continue
        found = tag_literals(path)
        assert not found, f"{path.relative_to(ROOT)} writes tags itself: {found}"


def test_integrations_use_only_the_public_api():
    for path in (ROOT / "tbfeat" / "integrations").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Attribute | ast.Name)
                and getattr(node.value, "attr", getattr(node.value, "id", "")) == "logger"
            ):
                pytest.fail(f"{path.name}:{node.lineno} reads logger.{node.attr}")
        assert "_getframe" not in path.read_text(), path.name


def test_only_the_run_reaches_the_worker_side():
    """The writer side (worker thread, recorder, sink) is built and read by the Run alone;
    everything else posts messages to it."""
    owned = {"Worker", "Recorder", "EventSink"}
    reads = {"_worker", "_recorder", "sink"}
    found = []
    for path in sorted((ROOT / "tbfeat").rglob("*.py")):
        if path.name in ("run.py", "recorder.py"):  # the owner; the recorder owns the sink
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in owned:
                found.append(f"{path.name}:{node.lineno} builds {node.func.id}")
            if isinstance(node, ast.Attribute) and node.attr in reads:
                found.append(f"{path.name}:{node.lineno} reads .{node.attr}")
    assert not found, found
    run_py = ast.parse((ROOT / "tbfeat" / "run.py").read_text())
    built = {n.func.id for n in ast.walk(run_py) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) in owned}  # fmt: skip
    assert built == owned  # the check looks where the parts really are built


def test_log_never_runs_more_than_one_step_ahead_of_the_writer(tmp_path, monkeypatch):
    """At most one step's copies wait in memory: the first capture of a step waits until
    the steps before it are written, however slow the writer."""
    import tbfeat.stats

    real = tbfeat.stats.RunningStats.update

    def slow(self, x):
        time.sleep(0.02)
        return real(self, x)

    monkeypatch.setattr(tbfeat.stats.RunningStats, "update", slow)
    model = nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity())
    logger = FeatureLogger(model, logdir=tmp_path, grids=False)
    behind = []
    for step in range(8):
        logger.log(torch.rand(1, 3, 8, 8), step=step)
        flushed = logger.flushed_step
        behind.append(step - (-1 if flushed is None else flushed))
    logger.close()
    assert max(behind) == 1  # the step just posted; everything before it is on disk
    assert [e.step for e in read_events(tmp_path).Scalars("stats/00_Identity/mean")] == list(
        range(8)
    )
