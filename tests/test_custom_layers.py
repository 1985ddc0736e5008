"""The user's own layers load without ``--trust-checkpoints``; nothing else of their code
runs; shape mismatches say which shape is the checkpoint's.

A class of the user's own modules (files under the working directory or ``PYTHONPATH``)
is allocated as torch's ``weights_only`` unpickler allocates torch's layers. Crafted files
that call such a class or a function of the user's, pass a class around, or allocate a
class that runs code while loading are refused: their markers never appear, while the
trusted control creates them.
"""

import contextlib
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from tbfeat.checkpoints import UnsafeCheckpointError, allowed_global, check_checkpoint, torch_load

from .helpers import read_events, save_with_globals

ROOT = Path(__file__).resolve().parents[1]
ATTN = '''
from torch import nn


class TinyAttn(nn.Module):
    """Channel attention, the first half of CBAM."""

    def __init__(self, c1):
        super().__init__()
        self.fc = nn.Conv2d(c1, c1, 1)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return x * self.act(self.fc(x.mean((2, 3), keepdim=True)))
'''
# imported, it leaves "imported"; called, Layer and boom leave "ran"
EVIL = """
from pathlib import Path
from torch import nn

Path(__file__).with_name("imported").touch()


class Layer(nn.Module):
    def __init__(self, *args):
        super().__init__()
        Path(__file__).with_name("ran").touch()


def boom(*args):
    Path(__file__).with_name("ran").touch()
"""
HOOKED = """
from pathlib import Path
from torch import nn


class Layer(nn.Module):
    def __setstate__(self, state):
        Path(__file__).with_name("ran").touch()
        super().__setstate__(state)
"""
GOOD = """
from torch import nn


class Layer(nn.Module):
    def forward(self, x):
        return x
"""
MODULES = ("myattn", "evil_layers", "hooked_layers", "good_layers", "goodpkg")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with the user's modules; the modules it imports are forgotten afterwards."""
    proj = tmp_path / "proj"
    (proj / "goodpkg").mkdir(parents=True)
    for name, source in (("myattn", ATTN), ("evil_layers", EVIL), ("hooked_layers", HOOKED),
                         ("good_layers", GOOD), ("goodpkg/attn", GOOD)):  # fmt: skip
        (proj / f"{name}.py").write_text(textwrap.dedent(source))
    (proj / "goodpkg" / "__init__.py").write_text("")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    yield proj
    for name in [m for m in sys.modules if m.split(".")[0] in MODULES]:
        del sys.modules[name]


# ------------------------------------------------------------------ crafting
class StandIn:
    """Pickled as the global it stands for (``NAMES``), so a file can name a module that
    the test never imports."""

    def __init__(self):
        self.training = False


class EvilLayer(StandIn):
    pass


class HookedLayer(StandIn):
    pass


class MissingLayer(StandIn):
    pass


class Boom(StandIn):  # a class stands for the function: pickled through save_global
    pass


NAMES = {
    EvilLayer: b"evil_layers\nLayer\n",
    HookedLayer: b"hooked_layers\nLayer\n",
    MissingLayer: b"evil_layers\nMissing\n",
    Boom: b"evil_layers\nboom\n",
}


def save_named(obj, path):
    save_with_globals(obj, path, NAMES)


def Allocate(cls):  # noqa: N802 - reads as the other payloads
    """Unpickled, allocates ``cls`` (``NEWOBJ``) and sets its state (``BUILD``), as
    ``torch.save`` pickles a module."""
    return cls()


class Call:
    """Unpickled, calls ``target(*args)`` (``REDUCE``)."""

    def __init__(self, target, *args):
        self.target, self.args = target, args

    def __reduce__(self):
        return self.target, self.args


class Pass:
    """Unpickled, hands ``cls`` to torch's own ``_rebuild_from_type_v2``, which calls it."""

    def __init__(self, cls):
        self.cls = cls

    def __reduce__(self):
        return torch._tensor._rebuild_from_type_v2, (self.cls, torch.Tensor, (), {})


# ------------------------------------------------------------------ tests
def test_shape_mismatch_says_which_shape_is_the_checkpoints(tmp_path):
    from tbfeat.integrations.torchvision import load_checkpoint

    path = tmp_path / "model_0.pth"
    torch.save({"model": nn.Sequential(nn.Linear(4, 6)).state_dict(), "epoch": 0}, path)
    with pytest.raises(ValueError) as raised:
        load_checkpoint(path, nn.Sequential(nn.Linear(4, 21)))
    message = str(raised.value)
    assert "2 shapes differ, e.g. 0.weight: checkpoint (6, 4), model (21, 4); " in message
    assert "0.bias: checkpoint (6), model (21)" in message and " vs " not in message


def test_a_yolo_with_the_users_own_layer_trains_and_sweeps_without_trust(
    project, tmp_path, monkeypatch
):
    pytest.importorskip("ultralytics")
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn import tasks
    from ultralytics.utils import ASSETS

    from tbfeat.checkpoints import load_ultralytics_checkpoint
    from tbfeat.synthetic import make_shapes_dataset

    monkeypatch.syspath_prepend(str(project))
    import myattn

    monkeypatch.setattr(tasks, "TinyAttn", myattn.TinyAttn, raising=False)  # parse_model's name
    cfg = {"nc": 2, "head": [[[2, 3], 1, "Detect", ["nc"]]], "backbone": [
        [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]],
        [-1, 1, "TinyAttn", [32]], [-1, 1, "Conv", [64, 3, 2]]]}  # fmt: skip
    (project / "attn.yaml").write_text(yaml.safe_dump(cfg))
    data = make_shapes_dataset(tmp_path / "data", n_train=4, n_val=2, imgsz=64)
    yolo = YOLO(str(project / "attn.yaml"))
    yolo.train(
        data=str(data), epochs=1, imgsz=64, batch=4, workers=0, device="cpu", plots=False,
        project=str(tmp_path), name="t", save_period=1, amp=False, verbose=False, val=False,
    )  # fmt: skip
    epoch0 = Path(yolo.trainer.save_dir) / "weights" / "epoch0.pt"
    assert "myattn.TinyAttn" in torch.serialization.get_unsafe_globals_in_checkpoint(epoch0)

    # in this process, where the training imported it: the same weights, allocated
    monkeypatch.chdir(project)
    ema = torch.load(epoch0, weights_only=False)["ema"].float().state_dict()
    loaded = load_ultralytics_checkpoint(epoch0).model
    assert type(loaded.model[2]) is myattn.TinyAttn
    weights = loaded.state_dict()
    assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)

    # a fresh `tbfeat sweep` in the project, as the console script runs it (-P: the working
    # directory is not on sys.path), without --trust-checkpoints
    logdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "tbfeat", "sweep", epoch0.parent, "--logdir", logdir,
         "--images", Path(ASSETS) / "bus.jpg", "--max-channels", "4"],  # fmt: skip
        capture_output=True, text=True, timeout=300, cwd=project, env={
            **os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "logged steps 1 to" in proc.stdout
    said = [line for line in proc.stderr.replace("\r", "\n").splitlines() if "module" in line]
    assert said == [
        f"tbfeat: imported your own module myattn ({project / 'myattn.py'}) for "
        f"{str(epoch0)!r}, which allocates myattn.TinyAttn without calling it"
    ], proc.stderr
    images = read_events(logdir).Images("features/02_TinyAttn/bus")
    assert [e.step for e in images] == [1]


@pytest.mark.parametrize("where", ["cwd", "PYTHONPATH"])
@pytest.mark.parametrize("name", ["good_layers.Layer", "goodpkg.attn.Layer"])
def test_the_users_own_classes_are_imported_and_allocated(
    project, tmp_path, monkeypatch, capsys, where, name
):
    path = tmp_path / "ckpt.pt"
    names = {**NAMES, EvilLayer: name.replace(".Layer", "\nLayer\n").encode()}
    monkeypatch.setattr(sys.modules[__name__], "NAMES", names)
    save_named({"epoch": 0, "layer": Allocate(EvilLayer)}, path)
    monkeypatch.chdir(project if where == "cwd" else tmp_path)
    if where == "PYTHONPATH":
        monkeypatch.setenv("PYTHONPATH", str(project))
    module = name.rpartition(".")[0]
    assert module not in sys.modules
    check_checkpoint(path)
    layer = torch_load(path)["layer"]
    assert type(layer).__module__ == module and isinstance(layer, nn.Module)
    assert type(layer) is sys.modules[module].Layer and layer.training is False
    assert str(sys.modules[module].__file__).startswith(str(project))
    assert str(project) not in sys.path  # the import did not leave it there
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"tbfeat: imported your own module {module} "
        f"({project / (module.replace('.', '/') + '.py')}) for {str(path)!r}, which allocates "
        f"{name} without calling it"
    ]
    check_checkpoint(path)  # imported already: said once
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "payload, named, imports, control",
    [
        (Call(Boom, "x"), "evil_layers.boom", False, "ran"),
        (Call(EvilLayer, "x"), "evil_layers.Layer", False, "ran"),
        (Pass(EvilLayer), "evil_layers.Layer", False, "ran"),
        (Allocate(MissingLayer), "evil_layers.Missing", False, "imported"),
        (Allocate(HookedLayer), "hooked_layers.Layer", True, "ran"),
    ],
    ids=["function-called", "class-called", "class-passed", "class-not-defined", "setstate"],
)
def test_the_users_code_never_runs_beyond_allocation(
    project, monkeypatch, payload, named, imports, control
):
    path = project / "ckpt.pt"
    save_named({"epoch": 0, "x": payload}, path)
    monkeypatch.chdir(project)
    with pytest.raises(UnsafeCheckpointError) as e:
        torch_load(path)
    assert named in str(e.value) and "--trust-checkpoints" in str(e.value)
    assert not (project / "ran").exists() and not (project / "imported").exists()
    # only a module that defines the class it allocates is imported
    assert (named.split(".")[0] in sys.modules) is imports
    monkeypatch.syspath_prepend(str(project))  # the control: trusted, it runs
    with contextlib.suppress(Exception):
        torch_load(path, trust=True)
    assert (project / control).exists()


def test_classes_outside_the_users_own_modules_are_refused(project, tmp_path, monkeypatch):
    from torchvision.ops.misc import Conv2dNormActivation

    monkeypatch.chdir(project)
    for name in (
        "torchvision.ops.misc.Conv2dNormActivation",  # an installed package
        "collections.OrderedDict",  # the standard library
        "good_layers.forward",  # not a class
        "__main__.Layer",
    ):
        assert allowed_global(name) is None, name
    path = tmp_path / "layer.pt"
    torch.save({"layer": copy.deepcopy(Conv2dNormActivation(3, 4))}, path)
    with pytest.raises(UnsafeCheckpointError, match="torchvision.ops.misc.Conv2dNormActivation"):
        check_checkpoint(path)
    # a module of the user's outside the working directory and PYTHONPATH
    monkeypatch.chdir(tmp_path)
    assert allowed_global("good_layers.Layer") is None and "good_layers" not in sys.modules
    monkeypatch.chdir(project)
    assert allowed_global("good_layers.Layer")[1] is False  # allocated, never called
