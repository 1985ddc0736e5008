"""Checkpoints: find them, tell Ultralytics from state dicts, load them, read their epoch.

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
