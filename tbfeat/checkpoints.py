"""Checkpoints and models: find them, tell Ultralytics from state dicts, load them, read
their epoch; build a model from a checkpoint, an Ultralytics yaml or a builder name.

Ultralytics checkpoints pickle whole modules and load only with full unpickling (as
Ultralytics itself loads them): such a file runs code when loaded and must come from a
trusted source. State-dict checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".pt", ".pth", ".ckpt")
_EPOCH_NAME = re.compile(r"^(?:epoch|model_)(\d+)$")  # Ultralytics epochN, torchvision model_N
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


@dataclass
class Checkpoint:
    """A checkpoint file and the step it is logged at."""

    path: Path
    step: int | None = None
    kind: str = ""  # "ultralytics" or "state_dict"


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


def kind_of(path: Path) -> str:
    """``"ultralytics"`` if the pickle references Ultralytics classes, else ``"state_dict"``.

    Reads the zip archive's pickle as bytes; nothing is unpickled.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                raise CheckpointError(f"{str(path)!r} is not a PyTorch checkpoint (no data.pkl)")
            pickle_bytes = archive.read(names[0])
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint (corrupt or truncated?)"
        ) from None
    return "ultralytics" if b"ultralytics." in pickle_bytes else "state_dict"


def step_from_name(path: Path) -> int | None:
    """The step a file name implies: ``epoch3.pt``/``model_3.pth`` (0-based) give 4; any
    other last number in the name is taken as is; ``None`` without a number."""
    m = _EPOCH_NAME.match(path.stem)
    if m:
        return int(m.group(1)) + 1
    m = _LAST_NUMBER.search(path.stem)
    return int(m.group(1)) if m else None


def load_ultralytics(path: Path) -> tuple[Any, int | None]:
    """An Ultralytics ``YOLO``/``RTDETR`` object and the checkpoint's 1-based epoch."""
    try:
        from ultralytics import RTDETR, YOLO
    except ImportError:
        raise CheckpointError(
            f"{str(path)!r} is an Ultralytics checkpoint; install the extra: "
            "pip install 'tbfeat[ultralytics]'"
        ) from None
    try:
        model = YOLO(str(path))
        if type(model.model).__name__.startswith("RTDETR"):
            model = RTDETR(str(path))
    except Exception as e:
        raise CheckpointError(
            f"cannot load Ultralytics checkpoint {str(path)!r}: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}"
        ) from None
    epoch = (getattr(model, "ckpt", None) or {}).get("epoch")
    step = int(epoch) + 1 if isinstance(epoch, int) and epoch >= 0 else None
    return model, step


def load_state_dict_model(path: Path, arch: str | None, **kwargs: Any) -> tuple[Any, int | None]:
    """A torchvision model from a state-dict checkpoint and its 1-based epoch, if stored."""
    if not arch:
        raise CheckpointError(
            f"{str(path)!r} is a state-dict checkpoint: name its architecture with --arch "
            "(a torchvision builder such as fasterrcnn_resnet50_fpn)"
        )
    from .integrations.torchvision import load_checkpoint

    try:
        model, meta = load_checkpoint(path, arch, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None
    epoch = meta.get("epoch")
    step = int(epoch) + 1 if isinstance(epoch, int) and epoch >= 0 else None
    return model, step


def read_epoch_step(path: Path, kind: str) -> int | None:
    """The 1-based epoch a checkpoint stores (Ultralytics and torchvision store 0-based,
    -1 once stripped), read with a memory-mapped load."""
    import argparse

    import torch

    try:
        if kind == "state_dict":
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        else:
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} (corrupt or truncated?): "
            f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        ) from None
    epoch = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    return int(epoch) + 1 if isinstance(epoch, int) and epoch >= 0 else None


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


def load_checkpoint_model(path: Path, kind: str, arch: str | None, imgsz: int | None) -> Any:
    """The model a checkpoint file holds: Ultralytics' own, or ``arch`` with the state dict."""
    if kind == "ultralytics":
        return load_ultralytics(path)[0]
    return load_state_dict_model(path, arch, **detector_size(arch, imgsz))[0]


def load_model(path_or_name: str, arch: str | None = None, imgsz: int | None = None) -> Any:
    """A model from a checkpoint file, an Ultralytics yaml or a torchvision builder name."""
    path = Path(path_or_name)
    if path.is_file() and path.suffix in SUFFIXES:
        return load_checkpoint_model(path, kind_of(path), arch, imgsz)
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
