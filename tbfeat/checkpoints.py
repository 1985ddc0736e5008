"""Checkpoints and models: find them, tell Ultralytics from state dicts, load them, read
their epoch; build a model from a checkpoint, an Ultralytics yaml or a builder name.

Every checkpoint loader (:func:`load_checkpoint` here, ``load_checkpoint`` of the
Ultralytics and torchvision integrations) returns a :class:`LoadedCheckpoint`.

Nothing a checkpoint names runs without the user's consent. Before any load, the pickle
inside the file is inspected without executing it (:mod:`tbfeat.safeload`): the globals
it references decide its kind (an ``ultralytics.`` class makes it an Ultralytics
checkpoint, anything else is a state dict), and every one of them must be on tbfeat's
allow-list. Files that pass load with ``torch.load(weights_only=True)`` (or Ultralytics'
own restricted loader); any other file raises :class:`UnsafeCheckpointError` unless
``trust=True`` (``--trust-checkpoints``), which loads it with full unpickling. A Hugging
Face ``Trainer``'s ``checkpoint-<N>`` folder is a checkpoint of its own kind, ``"hf"``
(:mod:`tbfeat.hf_checkpoints`).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import difflib
import functools
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import hf_checkpoints as hf
from .options import did_you_mean
from .safeload import (
    TRUST_HINT,
    CheckpointError,
    Inspection,
    LoadedCheckpoint,
    UnsafeCheckpointError,
    allowed_global,
    check_checkpoint,
    error_text,
    inspect_checkpoint,
    stored_epoch,
    torch_load,
)
from .safeload import kind_of as file_kind

__all__ = [
    "TRUST_HINT",
    "CheckpointError",
    "Inspection",
    "LoadedCheckpoint",
    "UnsafeCheckpointError",
    "allowed_global",
    "check_checkpoint",
    "check_model_args",
    "detector_size",
    "find_checkpoints",
    "inspect_checkpoint",
    "kind_of",
    "load_checkpoint",
    "load_model",
    "load_state_dict_checkpoint",
    "load_ultralytics_checkpoint",
    "model_factory",
    "natural_key",
    "read_epoch_step",
    "set_input_size",
    "takes_input_size",
    "step_from_name",
    "torch_load",
]

SUFFIXES = (".pt", ".pth", ".ckpt")
_EPOCH_NAME = re.compile(r"^(?:epoch|model_)(\d+)$")  # Ultralytics epochN, torchvision model_N
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


# ------------------------------------------------------------------ files and steps
def natural_key(path: Path) -> list[Any]:
    """Sort key that puts ``model-2`` before ``model-10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def find_checkpoints(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given; folders expand to their epoch checkpoints (``epoch*.pt``,
    ``model_<N>.pth``), or to every checkpoint file when none is numbered like that, in
    natural order (``model-2`` before ``model-10``). A Hugging Face ``Trainer``'s
    ``checkpoint-<N>`` folder is one checkpoint, as is a folder holding its weights
    (:mod:`tbfeat.hf_checkpoints`); a folder of ``checkpoint-<N>`` folders gives them all,
    in step order.

    Raises:
        CheckpointError: a path that is missing or no checkpoint, a folder without any, or
            a ``checkpoint-<N>`` folder without weights (naming the files allowed).
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        folders = hf.trainer_folders(path) if path.is_dir() else []
        if folders or hf.is_checkpoint_folder(path):
            folders = folders or [path]
            for folder in folders:
                hf.weights_file(folder)  # raises for a folder without weights
            found += folders
        elif path.is_dir():
            files = sorted(
                (p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file()),
                key=natural_key,
            )
            numbered = [p for p in files if _EPOCH_NAME.match(p.stem)]
            chosen = numbered or files
            if not chosen:
                raise CheckpointError(
                    f"no checkpoint files ({', '.join(SUFFIXES)}) nor Hugging Face "
                    f"checkpoint-<N> folders in folder {str(path)!r}"
                )
            found += chosen
        elif path.is_file() and path.suffix in SUFFIXES:
            found.append(path)
        elif path.is_file():
            raise CheckpointError(_not_a_checkpoint(path))
        else:
            raise CheckpointError(f"checkpoint not found: {str(path)!r}{_closest_file(path)}")
    return found


def step_from_name(path: Path) -> int | None:
    """The step a file name implies: ``epoch3.pt``/``model_3.pth`` (0-based) give 4; any
    other last number in the name is taken as is; ``None`` without a number."""
    m = _EPOCH_NAME.match(path.stem)
    if m:
        return int(m.group(1)) + 1
    m = _LAST_NUMBER.search(path.stem)
    return int(m.group(1)) if m else None


def read_epoch_step(path: Path, *, trust: bool = False) -> int | None:
    """The 1-based epoch a checkpoint stores (Ultralytics and torchvision store 0-based,
    -1 once stripped), read with a memory-mapped :func:`torch_load`; for a Hugging Face
    checkpoint folder, the ``global_step`` of its ``trainer_state.json`` (no weights are
    read).

    Raises:
        UnsafeCheckpointError: without ``trust``, a global off the allow-list.
        CheckpointError: a damaged file.
    """
    if path.is_dir():
        return hf.global_step(path)
    try:
        ckpt = torch_load(path, trust=trust)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} (corrupt or truncated?): "
            f"{error_text(e, 160)}"
        ) from None
    epoch = stored_epoch(ckpt.get("epoch")) if isinstance(ckpt, dict) else None
    return None if epoch is None else epoch + 1


def kind_of(path: Path, *, trust: bool = False) -> str:
    """``"hf"`` for a Hugging Face checkpoint folder (one without weights, or with an
    unreadable ``trainer_state.json``, raises its reason), else the kind of a
    ``torch.save`` file (:func:`tbfeat.safeload.kind_of`: ``"ultralytics"`` or
    ``"state_dict"``)."""
    if path.is_dir():
        hf.weights_file(path)
        hf.global_step(path)
        return hf.KIND
    return file_kind(path, trust=trust)


def load_ultralytics_checkpoint(path: Path, *, trust: bool = False) -> LoadedCheckpoint:
    """An Ultralytics checkpoint: its model, stored epoch and other entries.

    Without ``trust`` the checkpoint loads within the allow-list (Ultralytics' restricted
    loader where it has one, else ``torch.load(weights_only=True)``) and the model is the
    bare ``DetectionModel`` (or other task model); with ``trust`` it is ``YOLO(path)``
    (``RTDETR``), fully unpickled as Ultralytics loads it.

    Raises:
        UnsafeCheckpointError: without ``trust``, a global off the allow-list.
        CheckpointError: Ultralytics is not installed, or the file does not load.
    """
    try:
        from .integrations import ultralytics as integration
    except ImportError:
        raise CheckpointError(
            f"{str(path)!r} is an Ultralytics checkpoint; install the extra: "
            "pip install 'tbfeat[ultralytics]'"
        ) from None
    try:
        return integration.load_checkpoint(path, trust=trust)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"cannot load Ultralytics checkpoint {str(path)!r}: {error_text(e)}"
        ) from None


# ------------------------------------------------------------------ models
ModelSource = str | Callable[[], Any] | Any
"""Where a state dict goes: ``"MODULE:FUNCTION"``, ``"path/to/file.py:FUNCTION"``, a
function returning an ``nn.Module``, or an ``nn.Module``."""


def model_factory(source: ModelSource) -> Callable[[], Any]:
    """A function that returns the ``nn.Module`` a state-dict checkpoint loads into.

    Args:
        source: ``"MODULE:FUNCTION"`` (imported with the working directory on the path),
            ``"path/to/file.py:FUNCTION"`` (the file runs as an import would run it, with
            its folder on the path), a function of no arguments, or an ``nn.Module`` (a
            copy of it is loaded, never the module itself).

    Raises:
        ValueError: a malformed spec, a module or file that cannot be imported, or no
            such function (naming the closest one).
        TypeError: ``source`` is none of the above.

    Example:
        >>> make = model_factory("torchvision.models:resnet18")
        >>> type(make()).__name__
        'ResNet'
    """
    from torch import nn

    if isinstance(source, nn.Module):
        template = copy.deepcopy(source)
        return lambda: template
    if callable(source):
        return _checked(source, getattr(source, "__name__", repr(source)))
    if not isinstance(source, str):
        raise TypeError(
            "model must be 'MODULE:FUNCTION', 'path/to/file.py:FUNCTION', a function or "
            f"an nn.Module, got {type(source).__name__}"
        )
    m = _SPEC.fullmatch(source.strip())
    if m is None:
        raise ValueError(
            f"model {source!r} must be 'MODULE:FUNCTION' or 'path/to/file.py:FUNCTION', "
            "optionally with literal arguments ('file.py:create_model(num_classes=6)'): "
            "a function that returns the nn.Module the checkpoints load into"
        )
    where, name = m["where"], m["name"]
    args, kwargs = call_arguments(m["call"] or "()", source)
    module = _import_source(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ValueError(f"{where!r} has no function {name!r}{did_you_mean(name, names)}")
    return _checked(functools.partial(fn, *args, **kwargs) if m["call"] else fn, source)


_SPEC = re.compile(r"(?P<where>.+):(?P<name>[A-Za-z_]\w*)\s*(?P<call>\(.*\))?", re.S)


def call_arguments(call: str, source: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of ``(1, num_classes=6)``: Python literals only, read with
    ``ast.literal_eval``; nothing in them is ever evaluated.

    Example:
        >>> call_arguments("(3, num_classes=6, names=['a', 'b'])", "f.py:make(...)")
        ((3,), {'num_classes': 6, 'names': ['a', 'b']})
        >>> call_arguments("(x=__import__('os').system('true'))", "f.py:make(...)")
        Traceback (most recent call last):
        ...
        ValueError: model 'f.py:make(...)': argument x=__import__('os').system('true') is not a Python literal (numbers, strings, True/False/None, tuples, lists, dicts, sets)
    """  # noqa: E501
    try:
        node = ast.parse(f"f{call}", mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"model {source!r}: arguments {call!r} do not parse: {e.msg}") from None
    if not isinstance(node, ast.Call) or any(isinstance(a, ast.Starred) for a in node.args) \
            or any(k.arg is None for k in node.keywords):  # fmt: skip
        raise ValueError(f"model {source!r}: give arguments as (value, name=value, ...)")

    def literal(what: str, value: ast.expr) -> Any:
        try:
            return ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(
                f"model {source!r}: argument {what}{ast.unparse(value)} is not a Python literal "
                "(numbers, strings, True/False/None, tuples, lists, dicts, sets)"
            ) from None

    args = tuple(literal("", a) for a in node.args)
    return args, {k.arg: literal(f"{k.arg}=", k.value) for k in node.keywords}


def _import_source(where: str) -> Any:
    """The module of ``MODULE`` or ``path/to/file.py``."""
    if not where.endswith(".py"):
        added = os.getcwd() not in sys.path
        if added:  # as `python -m` would: modules of the working directory
            sys.path.insert(0, os.getcwd())
        try:
            return importlib.import_module(where)
        except Exception as e:
            raise ValueError(f"cannot import module {where!r}: {type(e).__name__}: {e}") from e
        finally:
            if added:
                with contextlib.suppress(ValueError):
                    sys.path.remove(os.getcwd())
    path = Path(where)
    if not path.is_file():
        raise ValueError(f"model file not found: {where!r}")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # its own imports of files beside it work
    name = "tbfeat_model_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ValueError(f"cannot import {where!r}: {type(e).__name__}: {e}") from None
    return module


def _checked(fn: Callable[[], Any], name: str) -> Callable[[], Any]:
    def make() -> Any:
        from torch import nn

        try:
            model = fn()
        except Exception as e:
            raise ValueError(f"model {name} raised {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} returned {type(model).__name__}, not an nn.Module")
        return model

    return make


def check_model_args(path: Path, kind: str, arch: str | None, model: Any) -> None:
    """Whether a checkpoint of ``kind`` loads with the ``arch`` / ``model`` given: an
    Ultralytics checkpoint carries its own model, a state dict needs one of them, a
    Hugging Face folder takes ``model`` or builds the model its ``config.json`` names.

    Raises:
        CheckpointError: naming the file and the flag to add or leave out.
    """
    if kind == "ultralytics" and (arch is not None or model is not None):
        flag = "--arch / arch=" if arch is not None else "--model / model="
        raise CheckpointError(
            f"{str(path)!r} is an Ultralytics checkpoint, which carries its own model: "
            f"{flag} does not apply to it; leave it out"
        )
    if kind == hf.KIND:
        if arch is not None:
            raise CheckpointError(
                f"{str(path)!r} is a Hugging Face checkpoint folder: --arch / arch= names "
                "torchvision builders and does not apply to it; leave it out (its "
                "config.json names its model) or pass --model / model="
            )
        if model is None:
            hf.check_buildable(path)
    if kind == "state_dict" and not arch and model is None:
        raise CheckpointError(
            f"{str(path)!r} is a state-dict checkpoint: name the model it loads into with "
            "--arch (a torchvision builder such as fasterrcnn_resnet50_fpn) or --model "
            "MODULE:FUNCTION / path/to/file.py:FUNCTION (your own)"
        )


def load_state_dict_checkpoint(
    path: Path,
    arch: str | None,
    *,
    trust: bool = False,
    model: Callable[[], Any] | None = None,
    **kwargs: Any,
) -> LoadedCheckpoint:
    """A state-dict checkpoint loaded into the torchvision builder ``arch``, or into what
    ``model`` (see :func:`model_factory`) returns."""
    check_model_args(path, "state_dict", arch, model)
    from .integrations import torchvision as integration

    try:
        if model is not None:
            return integration.load_checkpoint(path, model(), trust=trust)
        return integration.load_checkpoint(path, arch, trust=trust, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(str(e)) from None


def detector_size(arch: str | None, imgsz: int | None) -> dict[str, int]:
    """``min_size``/``max_size`` for torchvision detection builders when ``imgsz`` is set."""
    if not arch or not imgsz:
        return {}
    import inspect

    import torchvision

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        return {}
    module = inspect.getmodule(builder)
    if module is not None and module.__name__.startswith("torchvision.models.detection"):
        return {"min_size": imgsz, "max_size": imgsz}
    return {}


def takes_input_size(model: Any) -> bool:
    """Whether ``model.transform`` takes ``min_size`` and ``max_size``."""
    transform = getattr(model, "transform", None)
    return all(hasattr(transform, a) for a in ("min_size", "max_size"))


def set_input_size(model: Any, imgsz: int | None) -> bool:
    """Give your own detector the input size ``imgsz`` where its transform takes one
    (``min_size``/``max_size``, as torchvision's ``GeneralizedRCNNTransform`` and the
    transforms written after it hold); True when it was set. Any other transform decides
    the size itself.

    Example:
        >>> import torchvision
        >>> m = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        ...     weights=None, weights_backbone=None)
        >>> set_input_size(m, 256), m.transform.min_size, m.transform.max_size
        (True, (256,), 256)
    """
    if not imgsz or not takes_input_size(model):
        return False
    transform = model.transform
    low = transform.min_size
    transform.min_size = type(low)([imgsz]) if isinstance(low, (tuple, list)) else imgsz
    transform.max_size = imgsz
    return True


def load_checkpoint(
    path: Path,
    kind: str,
    arch: str | None,
    imgsz: int | None,
    *,
    trust: bool = False,
    model: Callable[[], Any] | None = None,
) -> LoadedCheckpoint:
    """A checkpoint file of ``kind`` loaded: Ultralytics' own model, or ``arch`` /
    ``model`` with the state dict.

    Without ``trust`` the file is checked against the allow-list before anything else.
    A Hugging Face checkpoint folder loads with :func:`tbfeat.hf_checkpoints.load_folder`.
    """
    if path.is_dir():
        check_model_args(path, hf.KIND, arch, model)
        loaded = hf.load_folder(path, model, trust=trust)
        set_input_size(loaded.model, imgsz)
        return loaded
    if not trust:
        kind = check_checkpoint(path).kind
    check_model_args(path, kind, arch, model)
    if kind == "ultralytics":
        return load_ultralytics_checkpoint(path, trust=trust)
    size = detector_size(arch, imgsz) if model is None else {}
    loaded = load_state_dict_checkpoint(path, arch, trust=trust, model=model, **size)
    if model is not None:
        set_input_size(loaded.model, imgsz)
    return loaded


def load_model(
    path_or_name: str | None,
    arch: str | None = None,
    imgsz: int | None = None,
    *,
    trust: bool = False,
    model: ModelSource | None = None,
) -> Any:
    """A model from a checkpoint file, an Ultralytics yaml, a torchvision builder name, or
    your own model (``model=``, see :func:`model_factory`) with a checkpoint's weights.

    Args:
        path_or_name: A checkpoint (``.pt``, ``.pth``, ``.ckpt``, a Hugging Face
            checkpoint folder), an Ultralytics yaml or a torchvision builder name;
            ``None`` with ``model`` for that model as built.
        arch: The torchvision builder of a state-dict checkpoint.
        imgsz: ``min_size``/``max_size`` of torchvision detectors (and of your own, where
            its transform takes them: :func:`set_input_size`).
        trust: Load checkpoints that need globals off the allow-list (full unpickling).
        model: Your own model for a state-dict checkpoint.

    Raises:
        CheckpointError: a missing file (naming the closest one), a file that is not a
            checkpoint, or one that does not load.
        ValueError: a bad ``arch`` or ``model``.
    """
    if arch is not None and model is not None:
        raise ValueError("pass either arch (a torchvision builder) or model (your own), not both")
    factory = model_factory(model) if model is not None else None
    if path_or_name is None:
        if factory is None:
            raise ValueError("give a checkpoint, a model name, or model=")
        built = factory()
        set_input_size(built, imgsz)
        return built
    path = Path(path_or_name)
    if (path.is_file() and path.suffix in SUFFIXES) or hf.is_checkpoint_folder(path):
        kind = kind_of(path, trust=trust)
        return load_checkpoint(path, kind, arch, imgsz, trust=trust, model=factory).model
    if factory is not None:
        raise CheckpointError(f"{_not_a_checkpoint(path)}; --model / model= takes a checkpoint")
    if arch is not None and (path.is_file() or path_or_name.endswith((".yaml", ".yml"))):
        raise CheckpointError(
            f"--arch / arch= names the model of a state-dict checkpoint; {path_or_name!r} "
            "is none: leave it out"
        )
    return _named_model(path_or_name, imgsz)


def _named_model(name: str, imgsz: int | None) -> Any:
    """An Ultralytics yaml or a torchvision builder name, built without weights."""
    if name.endswith((".yaml", ".yml")):
        return _ultralytics_yaml(name)
    import torchvision

    if name in torchvision.models.list_models():
        from .integrations.torchvision import build

        return build(name, weights_backbone=None, **detector_size(name, imgsz))
    if Path(name).suffix or os.sep in name:
        raise CheckpointError(_not_a_checkpoint(Path(name)))
    hint = did_you_mean(name, torchvision.models.list_models())
    raise CheckpointError(
        f"unknown model {name!r}{hint}: give a checkpoint file, an Ultralytics yaml "
        "(yolov8n.yaml) or a torchvision builder name (fasterrcnn_resnet50_fpn)"
    )


def _not_a_checkpoint(path: Path) -> str:
    """Why ``path`` is no checkpoint: missing (naming the closest file), or its type."""
    if path.is_dir():
        return (
            f"{str(path)!r} is a folder, not a checkpoint file nor a Hugging Face checkpoint "
            f"folder (one holding {' or '.join(hf.WEIGHTS[::2])})"
        )
    if path.is_file():
        what = {".yaml": "a YAML file", ".yml": "a YAML file", ".json": "a JSON file"}.get(
            path.suffix.lower(), f"a {path.suffix or 'suffix-less'} file"
        )
        return (
            f"{str(path)!r} is {what}, not a checkpoint ({', '.join(SUFFIXES)}: a state "
            "dict or an Ultralytics .pt)"
        )
    return f"file not found: {str(path)!r}{_closest_file(path)}"


def _closest_file(path: Path, extra: tuple[str, ...] = ()) -> str:
    folder = path.parent if str(path.parent) else Path(".")
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    close = difflib.get_close_matches(path.name, names + list(extra), n=1, cutoff=0.7)
    if not close:
        return ""
    return f" (did you mean {str(folder / close[0]) if close[0] in names else close[0]!r}?)"


def _ultralytics_yaml(name: str) -> Any:
    """``YOLO(name)`` (``RTDETR`` for RT-DETR); a name that is neither a file nor one of
    Ultralytics' own configurations fails naming the closest."""
    try:
        from ultralytics import RTDETR, YOLO
    except ImportError:
        raise CheckpointError(
            f"{name!r} needs Ultralytics: pip install 'tbfeat[ultralytics]'"
        ) from None
    path = Path(name)
    if not path.is_file() and name not in (known := _ultralytics_configs()):
        hint = _closest_file(path, tuple(known))
        raise CheckpointError(f"no such file or Ultralytics configuration: {name!r}{hint}")
    try:
        return (RTDETR if "rtdetr" in path.name else YOLO)(name)
    except Exception as e:
        raise CheckpointError(f"cannot build {name!r}: {e}") from None


def _ultralytics_configs() -> set[str]:
    """Names Ultralytics builds from its own yaml files, with each model scale
    (``yolov8.yaml`` gives ``yolov8n.yaml`` ... ``yolov8x.yaml``)."""
    import ultralytics

    names: set[str] = set()
    for p in (Path(ultralytics.__file__).parent / "cfg" / "models").rglob("*.yaml"):
        names.add(p.name)
        names.update(f"{p.stem[:m.end()]}{s}{p.stem[m.end():]}.yaml"
                     for m in [re.search(r"\d+", p.stem)] if m for s in "nsmlx")  # fmt: skip
    return names
