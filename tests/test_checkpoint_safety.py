"""No checkpoint runs code without the user's consent.

Crafted checkpoints whose unpickling would leave a marker on disk prove that nothing of
them runs: the marker must not exist afterwards, while loading the same file with
``trust`` (the control) does create it.
"""

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tbfeat
from tbfeat.checkpoints import (
    CheckpointError,
    UnsafeCheckpointError,
    allowed_global,
    kind_of,
    load_model,
)
from tbfeat.integrations.torchvision import build, load_checkpoint

from .helpers import read_events, save_with_globals

pytest.importorskip("ultralytics")  # the optional extra; `make test` installs it
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils import ASSETS  # noqa: E402
from ultralytics.utils.files import increment_path  # noqa: E402

BUS = str(Path(ASSETS) / "bus.jpg")
ROOT = Path(__file__).resolve().parents[1]
ARCH = "mobilenet_v3_small"


# ------------------------------------------------------------------ crafted payloads
class OpenFile:
    """Unpickled, creates ``path`` (``open(path, "a")``)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "a"))


class MakeDir:
    """Unpickled, creates the folder ``path`` through an ``ultralytics.`` function."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (increment_path, (self.path, False, "", True))


def yolo_cfg(marker):
    """A model yaml whose ``activation`` Ultralytics' ``parse_model`` evaluates."""
    act = f"__import__('pathlib').Path({str(marker)!r}).touch() or __import__('torch').nn.SiLU()"
    return {"activation": act, "nc": 1, "backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": []}


class CallModel:
    """Unpickled, calls ``DetectionModel(cfg)``: an allowed class, constructed (REDUCE)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (DetectionModel, (yolo_cfg(self.marker),))


class PassModel:
    """Unpickled, hands ``DetectionModel`` as a value to torch's own
    ``_rebuild_from_type_v2``, which calls it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        rebuild = torch._tensor._rebuild_from_type_v2
        return (rebuild, (DetectionModel, torch.Tensor, (yolo_cfg(self.marker),), {}))


class Harmless:
    """A custom class: harmless, but not on the allow-list."""

    def __init__(self, value):
        self.value = value


def save_builtins_open(obj, path):
    """``open`` written as ``builtins.open`` (pickle's own name for it is ``io.open``),
    the way a hand-crafted checkpoint would."""
    save_with_globals(obj, path, {open: b"builtins\nopen\n"})


def tbfeat_cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "tbfeat", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def error_line(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tbfeat: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


class LoadSpy:
    """Records the ``weights_only`` of every ``torch.load`` call."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = torch.load

        def load(*args, **kwargs):
            self.calls.append(kwargs.get("weights_only"))
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, "load", load)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    return build(ARCH, num_classes=3).state_dict()


# ------------------------------------------------------------------ tests
def test_allow_list():
    from torch import nn
    from ultralytics.utils.loss import BboxLoss

    allowed = {
        "torch.nn.modules.conv.Conv2d": nn.Conv2d,
        "ultralytics.nn.tasks.DetectionModel": DetectionModel,
        "ultralytics.utils.loss.BboxLoss": BboxLoss,
        "argparse.Namespace": argparse.Namespace,
    }
    for name, obj in allowed.items():
        assert allowed_global(name)[0] is obj, name
    assert allowed_global("torch.nn.modules.conv.Conv2d")[1] is False  # allocated, not called
    assert allowed_global("numpy.dtypes.Float64DType") is not None
    assert allowed_global("numpy._core.multiarray.scalar") is not None
    for name in (
        "builtins.open",
        "io.open",
        "os.system",
        "builtins.getattr",
        "torch.nn.functional.conv2d",  # a function under torch.nn
        "torch.nn.modules.container.Container",  # overrides __new__
        "ultralytics.nn.tasks.torch_safe_load",  # a function under ultralytics.nn
        "ultralytics.nn.autobackend.AutoBackend",  # a module whose constructor loads files
        "ultralytics.nn.text_model.CLIP",  # importing it installs packages
        "ultralytics.utils.files.increment_path",
        "ultralytics.utils.loss.torch",  # a module, not a class of the module
        "numpy.dtypes.os",
    ):
        assert allowed_global(name) is None, name


def test_kind_comes_from_globals_and_state_dicts_load_weights_only(
    tmp_path, state_dict, monkeypatch
):
    path = tmp_path / "model_0.pth"
    args = argparse.Namespace(data="ultralytics.nn.tasks/coco.yaml")
    torch.save({"model": state_dict, "epoch": 0, "args": args, "note": "ultralytics.utils"}, path)
    assert b"ultralytics." in path.read_bytes()
    assert kind_of(path) == "state_dict"
    spy = LoadSpy(monkeypatch)
    loaded = load_checkpoint(path, ARCH)
    assert loaded.epoch == 0 and loaded.extras["args"].data.startswith("ultralytics.")
    result = tbfeat.sweep([path], images=[BUS], logdir=tmp_path / "run", arch=ARCH, stages=[0])
    assert result.logged == [1]
    assert spy.calls and all(w is True for w in spy.calls), spy.calls
    # damaged files keep their clear error
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt.*corrupt or truncated"):
        kind_of(garbage)


def test_cli_stops_a_crafted_checkpoint_before_it_runs(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "weights"
    folder.mkdir()
    crafted = folder / "epoch0.pt"
    payload = {"epoch": 0, "note": "ultralytics.nn.tasks.DetectionModel", "x": OpenFile(marker)}
    save_builtins_open(payload, crafted)
    assert "builtins.open" in torch.serialization.get_unsafe_globals_in_checkpoint(crafted)
    logdir = tmp_path / "sweep"
    for args in (
        ("sweep", folder, "--images", BUS, "--logdir", logdir),
        ("sweep", crafted, "--images", BUS, "--logdir", logdir, "--arch", ARCH),
        ("stages", crafted),
        ("stages", crafted, "--arch", ARCH),
    ):
        line = error_line(tbfeat_cli(*args))
        for fragment in ("epoch0.pt", "builtins.open", "--trust-checkpoints"):
            assert fragment in line, (fragment, line)
        assert not marker.exists(), args
    assert not logdir.exists() or not any(logdir.iterdir())
    torch.load(crafted, weights_only=False)  # the control: unpickled, it runs
    assert marker.exists()


@pytest.mark.parametrize(
    "payload, named",
    [
        (MakeDir, "ultralytics.utils.files.increment_path"),
        (CallModel, "ultralytics.nn.tasks.DetectionModel [called]"),
        (PassModel, "ultralytics.nn.tasks.DetectionModel [as a value]"),
    ],
    ids=["ultralytics-function", "constructor-called", "class-passed-to-torch"],
)
def test_ultralytics_globals_outside_the_allow_list_never_run(tmp_path, payload, named):
    marker = tmp_path / "marker"
    crafted = tmp_path / "epoch0.pt"
    torch.save({"epoch": 0, "ema": payload(marker), "train_args": {"imgsz": 64}}, crafted)
    assert kind_of(crafted) == "ultralytics"
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoints") as e:
        tbfeat.sweep([crafted], images=[BUS], logdir=tmp_path / "run")
    assert named in str(e.value)
    with pytest.raises(UnsafeCheckpointError):
        load_model(str(crafted))
    assert not marker.exists()
    assert not (tmp_path / "run").exists()
    with contextlib.suppress(Exception):  # the control: trusted, it runs
        load_model(str(crafted), trust=True)
    assert marker.exists()


def events(logdir):
    """Every image and scalar of a run, derived ones included, by tag and step."""
    acc = read_events(logdir, derived=True)
    tags = acc.Tags()
    images = {t: [(e.step, e.encoded_image_string) for e in acc.Images(t)] for t in tags["images"]}
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    return images, scalars


def stage_table(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    return lines[next(i for i, line in enumerate(lines) if "tag key" in line) :]


def test_real_checkpoints_log_as_the_trusted_path_and_reruns_load_nothing(
    tmp_path, yolo_weights, monkeypatch
):
    spy = LoadSpy(monkeypatch)
    kwargs = {"images": [BUS], "imgsz": 64, "max_channels": 8}
    safe = tbfeat.sweep([yolo_weights], logdir=tmp_path / "safe", **kwargs)
    assert safe.logged == [1, 2]
    assert all(w is True for w in spy.calls), spy.calls
    trusted = tbfeat.sweep([yolo_weights], logdir=tmp_path / "trusted", trust=True, **kwargs)
    assert trusted.logged == [1, 2]
    images, scalars = events(tmp_path / "safe")
    assert (images, scalars) == events(tmp_path / "trusted")
    assert "features/09_SPPF/bus" in images and len(images) > 20
    assert [s for s, _ in images["features/09_SPPF/bus"]] == [1, 2]
    # without imgsz, the training imgsz stored in the checkpoint applies (64, not 640)
    plain = tbfeat.sweep(
        [yolo_weights / "epoch0.pt"], logdir=tmp_path / "plain", images=[BUS], max_channels=8
    )
    assert plain.logged == [1]
    features = {t: v for t, v in events(tmp_path / "plain")[0].items() if t.startswith("feat")}
    assert features == {t: images[t][:1] for t in features}

    # a re-run with nothing to do opens no checkpoint: reading one would raise here
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was opened")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "get_unsafe_globals_in_checkpoint", refuse)
    monkeypatch.setattr(torch._C, "PyTorchFileReader", refuse)
    again = tbfeat.sweep([yolo_weights], logdir=tmp_path / "safe", **kwargs)
    assert again.logged == [] and again.skipped == [1, 2]
    monkeypatch.undo()

    epoch1 = yolo_weights / "epoch1.pt"
    table = stage_table(tbfeat_cli("stages", epoch1, "--imgsz", 64))
    assert table == stage_table(tbfeat_cli("stages", epoch1, "--imgsz", 64, "--trust-checkpoints"))
    assert any("09_SPPF" in line and "1x256x2x2" in line for line in table)


def test_rerun_with_nothing_to_do_unpickles_nothing(tmp_path, state_dict):
    """A checkpoint that creates a marker whenever it is unpickled, swept with trust: the
    re-runs (trusted or not) plan from the manifest and leave no marker."""
    marker = tmp_path / "marker"
    path = tmp_path / "model_0.pth"
    torch.save({"model": state_dict, "epoch": 0, "hook": OpenFile(marker)}, path)
    sweep = ("sweep", path, "--images", BUS, "--logdir", tmp_path / "run", "--arch", ARCH)
    sweep += ("--stages", "0", "--max-channels", "4")
    line = error_line(tbfeat_cli(*sweep))
    assert "io.open" in line and "--trust-checkpoints" in line and not marker.exists()

    first = tbfeat_cli(*sweep, "--trust-checkpoints")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "logged steps 1" in first.stdout and marker.exists()  # unpickled: it ran
    marker.unlink()
    for extra in (("--trust-checkpoints",), ()):
        again = tbfeat_cli(*sweep, *extra)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "nothing to do" in again.stdout
        assert not marker.exists(), extra
    logged = read_events(tmp_path / "run").Images("features/00_Conv2dNormActivation/bus")
    assert [e.step for e in logged] == [1]
    # a changed file is read again: inspected, and refused without trust
    path.write_bytes(path.read_bytes())
    assert "io.open" in error_line(tbfeat_cli(*sweep))
    assert not marker.exists()


def test_every_loader_returns_a_loaded_checkpoint_with_its_stored_epoch(
    tmp_path, yolo_weights, state_dict
):
    import dataclasses

    from tbfeat.checkpoints import (
        LoadedCheckpoint,
        load_state_dict_checkpoint,
        load_ultralytics_checkpoint,
    )
    from tbfeat.checkpoints import load_checkpoint as load_file
    from tbfeat.integrations import ultralytics as yolo

    sd, bare = tmp_path / "model_4.pth", tmp_path / "bare.pth"
    torch.save({"model": state_dict, "epoch": 4, "args": argparse.Namespace(lr=0.5)}, sd)
    torch.save(state_dict, bare)
    epoch0, epoch1, last = (yolo_weights / f for f in ("epoch0.pt", "epoch1.pt", "last.pt"))

    def own_model():
        return build(ARCH, num_classes=3)

    assert torch.load(last, weights_only=False)["epoch"] == -1  # stripped: it stores none
    cases = [
        ("ultralytics", lambda: yolo.load_checkpoint(epoch0), 0),
        ("ultralytics", lambda: yolo.load_checkpoint(epoch1), 1),
        ("ultralytics", lambda: yolo.load_checkpoint(epoch1, trust=True), 1),
        ("ultralytics", lambda: yolo.load_checkpoint(last), None),
        ("ultralytics", lambda: load_ultralytics_checkpoint(epoch1), 1),
        ("ultralytics", lambda: load_file(epoch1, "ultralytics", None, None), 1),
        ("state_dict", lambda: load_checkpoint(sd, ARCH), 4),
        ("state_dict", lambda: load_checkpoint(sd, own_model()), 4),
        ("bare", lambda: load_checkpoint(bare, ARCH), None),
        ("state_dict", lambda: load_state_dict_checkpoint(sd, ARCH), 4),
        ("state_dict", lambda: load_file(sd, "state_dict", ARCH, None), 4),
        ("state_dict", lambda: load_file(sd, "state_dict", None, None, model=own_model), 4),
    ]
    ema = torch.load(epoch1, weights_only=False)["ema"].float().state_dict()
    for i, (kind, load, epoch) in enumerate(cases):
        loaded = load()
        assert type(loaded) is LoadedCheckpoint, i
        assert loaded.epoch == epoch, (i, loaded.epoch)
        assert isinstance(loaded.model, torch.nn.Module), i
        if kind == "ultralytics":
            assert loaded.extras["train_args"]["imgsz"] == 64, i
            assert not {"model", "ema"} & set(loaded.extras), i
        else:
            weights = loaded.model.state_dict()
            assert all(torch.equal(weights[k], v) for k, v in state_dict.items()), i
            if kind == "bare":
                assert loaded.extras == {}, i
            else:
                assert set(loaded.extras) == {"epoch", "args"} and loaded.extras["epoch"] == 4, i
                assert loaded.extras["args"].lr == 0.5, i
    weights = yolo.load_checkpoint(epoch1).model.state_dict()
    assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.epoch = 0


def test_trust_loads_a_checkpoint_with_a_custom_global(tmp_path, yolo_weights, state_dict):
    ckpt = torch.load(yolo_weights / "epoch0.pt", map_location="cpu", weights_only=False)
    ckpt["extra"] = Harmless(3)
    custom = tmp_path / "weights" / "epoch0.pt"
    custom.parent.mkdir()
    torch.save(ckpt, custom)
    with pytest.raises(UnsafeCheckpointError, match=r"Harmless.*--trust-checkpoints"):
        tbfeat.sweep([custom], images=[BUS], logdir=tmp_path / "refused", imgsz=64)
    result = tbfeat.sweep([custom], images=[BUS], logdir=tmp_path / "run", imgsz=64, trust=True)
    assert result.logged == [1]
    assert type(load_model(str(custom), trust=True)).__name__ == "YOLO"

    sd = tmp_path / "model_0.pth"
    torch.save({"model": state_dict, "epoch": 0, "extra": Harmless(4)}, sd)
    with pytest.raises(UnsafeCheckpointError, match="Harmless"):
        load_checkpoint(sd, ARCH)
    assert load_checkpoint(sd, ARCH, trust=True).extras["extra"].value == 4
