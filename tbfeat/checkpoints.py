"""Checkpoints and models: find them, tell Ultralytics from state dicts, load them, read
their epoch; build a model from a checkpoint, an Ultralytics yaml or a builder name.

Nothing a checkpoint names runs without the user's consent. Before any load, the pickle
inside the file is inspected without executing it (:mod:`tbfeat.safeload`): the globals
it references decide its kind (an ``ultralytics.`` class makes it an Ultralytics
checkpoint, anything else is a state dict), and every one of them must be on tbfeat's
allow-list. Files that pass load with ``torch.load(weights_only=True)`` (or Ultralytics'
own restricted loader); any other file raises :class:`UnsafeCheckpointError` unless
``trust=True`` (``--trust-checkpoints``), which loads it with full unpickling.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .safeload import (
    TRUST_HINT,
    CheckpointError,
    Inspection,
    UnsafeCheckpointError,
    allowed_global,
    check_checkpoint,
    inspect_checkpoint,
    kind_of,
    torch_load,
)

__all__ = [
    "TRUST_HINT",
    "CheckpointError",
    "Checkpoint",
    "Inspection",
    "UnsafeCheckpointError",
    "allowed_global",
    "check_checkpoint",
    "detector_size",
    "find_checkpoints",
    "inspect_checkpoint",
    "kind_of",
    "load_checkpoint_model",
    "load_model",
    "load_state_dict_model",
    "load_ultralytics",
    "read_epoch_step",
    "step_from_name",
    "torch_load",
]

SUFFIXES = (".pt", ".pth", ".ckpt")
_EPOCH_NAME = re.compile(r"^(?:epoch|model_)(\d+)$")  # Ultralytics epochN, torchvision model_N
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass
class Checkpoint:
    """A checkpoint file and the step it is logged at."""

    path: Path
    step: int | None = None
    kind: str = ""  # "ultralytics" or "state_dict"


# ------------------------------------------------------------------ files and steps
def find_checkpoints(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given; folders expand to their epoch checkpoints (``epoch*.pt``,
    ``model_<N>.pth``), or to every checkpoint file when none is numbered like that."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
            numbered = [p for p in files if _EPOCH_NAME.match(p.stem)]
            chosen = numbered or files
            if not chosen:
                raise CheckpointError(
                    f"no checkpoint files ({', '.join(SUFFIXES)}) in folder {str(path)!r}"
                )
            found += chosen
        elif path.is_file():
            found.append(path)
        else:
            raise CheckpointError(f"checkpoint not found: {str(path)!r}")
    return found


def step_from_name(path: Path) -> int | None:
    """The step a file name implies: ``epoch3.pt``/``model_3.pth`` (0-based) give 4; any
    other last number in the name is taken as is; ``None`` without a number."""
    m = _EPOCH_NAME.match(path.stem)
    if m:
        return int(m.group(1)) + 1
    m = _LAST_NUMBER.search(path.stem)
    return int(m.group(1)) if m else None


def _step(epoch: Any) -> int | None:
    """The 1-based step of a stored epoch (0-based; -1 once stripped)."""
    return int(epoch) + 1 if isinstance(epoch, int) and epoch >= 0 else None


def read_epoch_step(path: Path, *, trust: bool = False) -> int | None:
    """The 1-based epoch a checkpoint stores (Ultralytics and torchvision store 0-based,
    -1 once stripped), read with a memory-mapped :func:`torch_load`.

    Raises:
        UnsafeCheckpointError: without ``trust``, a global off the allow-list.
        CheckpointError: a damaged file.
    """
    try:
        ckpt = torch_load(path, trust=trust)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} (corrupt or truncated?): "
            f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        ) from None
    return _step(ckpt.get("epoch")) if isinstance(ckpt, dict) else None


def load_ultralytics(path: Path, *, trust: bool = False) -> tuple[Any, int | None]:
    """An Ultralytics model and the checkpoint's 1-based epoch.

    Without ``trust`` the checkpoint loads within the allow-list (Ultralytics' restricted
    loader where it has one, else ``torch.load(weights_only=True)``) and the model is the
    bare ``DetectionModel`` (or other task model); with ``trust`` it is ``YOLO(path)``
    (``RTDETR``), fully unpickled as Ultralytics loads it.

    Raises:
        UnsafeCheckpointError: without ``trust``, a global off the allow-list.
        CheckpointError: Ultralytics is not installed, or the file does not load.
    """
    try:
        from .integrations.ultralytics import load_checkpoint
    except ImportError:
        raise CheckpointError(
            f"{str(path)!r} is an Ultralytics checkpoint; install the extra: "
            "pip install 'tbfeat[ultralytics]'"
        ) from None
    try:
        model, epoch = load_checkpoint(path, trust=trust)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"cannot load Ultralytics checkpoint {str(path)!r}: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}"
        ) from None
    return model, _step(epoch)


# ------------------------------------------------------------------ models
def load_state_dict_model(
    path: Path, arch: str | None, *, trust: bool = False, **kwargs: Any
) -> tuple[Any, int | None]:
    """A torchvision model from a state-dict checkpoint and its 1-based epoch, if stored."""
    if not arch:
        raise CheckpointError(
            f"{str(path)!r} is a state-dict checkpoint: name its architecture with --arch "
            "(a torchvision builder such as fasterrcnn_resnet50_fpn)"
        )
    from .integrations.torchvision import load_checkpoint

    try:
        model, meta = load_checkpoint(path, arch, trust=trust, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(str(e)) from None
    return model, _step(meta.get("epoch"))


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


def load_checkpoint_model(
    path: Path, kind: str, arch: str | None, imgsz: int | None, *, trust: bool = False
) -> Any:
    """The model a checkpoint file holds: Ultralytics' own, or ``arch`` with the state dict.

    Without ``trust`` the file is checked against the allow-list before anything else.
    """
    if not trust:
        kind = check_checkpoint(path).kind
    if kind == "ultralytics":
        return load_ultralytics(path, trust=trust)[0]
    return load_state_dict_model(path, arch, trust=trust, **detector_size(arch, imgsz))[0]


def load_model(
    path_or_name: str, arch: str | None = None, imgsz: int | None = None, *, trust: bool = False
) -> Any:
    """A model from a checkpoint file, an Ultralytics yaml or a torchvision builder name.

    Args:
        path_or_name: A checkpoint (``.pt``, ``.pth``, ``.ckpt``), an Ultralytics yaml or
            a torchvision builder name.
        arch: The torchvision builder of a state-dict checkpoint.
        imgsz: ``min_size``/``max_size`` of torchvision detectors.
        trust: Load checkpoints that need globals off the allow-list (full unpickling).
    """
    path = Path(path_or_name)
    if path.is_file() and path.suffix in SUFFIXES:
        kind = kind_of(path, trust=trust)
        return load_checkpoint_model(path, kind, arch, imgsz, trust=trust)
    if path_or_name.endswith((".yaml", ".yml")):
        from ultralytics import RTDETR, YOLO

        try:
            cls = RTDETR if "rtdetr" in path.name else YOLO
            return cls(path_or_name)
        except Exception as e:
            raise CheckpointError(f"cannot build {path_or_name!r}: {e}") from None
    import torchvision

    if path_or_name in torchvision.models.list_models():
        from .integrations.torchvision import build

        kwargs = {"weights_backbone": None, **detector_size(path_or_name, imgsz)}
        return build(path_or_name, **kwargs)
    if not path.exists() and path.suffix:
        raise CheckpointError(f"checkpoint not found: {path_or_name!r}")
    raise CheckpointError(
        f"unknown model {path_or_name!r}: give a checkpoint file, an Ultralytics yaml "
        "(yolov8n.yaml) or a torchvision builder name (fasterrcnn_resnet50_fpn)"
    )
