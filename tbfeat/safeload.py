"""Reading ``torch.save`` files without running what they name.

A checkpoint's pickle is inspected without executing it (:func:`inspect_checkpoint`):
``torch.serialization.get_unsafe_globals_in_checkpoint`` lists the globals it needs, and a
walk over its instructions (``pickletools``, following the ``weights_only`` unpickler's
stack) tells which of them it only allocates, calls, or passes around. Every one must be on
tbfeat's allow-list (:func:`allowed_global`), model classes only ever allocated: a call
would run their constructor with arguments from the file. The allow-list holds torch's and
Ultralytics' layers and the layers of the user's own modules (:func:`own_class`: files
under the working directory or a ``PYTHONPATH`` entry). Files that pass load with
``torch.load(weights_only=True)`` and exactly those globals (:func:`torch_load`); any other
raises :class:`UnsafeCheckpointError` unless the caller trusts the file.
"""

from __future__ import annotations

import ast
import importlib
import os
import pickle
import pickletools
import re
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.machinery import BuiltinImporter, FrozenImporter, ModuleSpec, PathFinder
from pathlib import Path
from typing import Any

TRUST_HINT = "if you trust the file, pass --trust-checkpoints (trust=True)"

# ------------------------------------------------------------------ allow-list
# Modules whose nn.Module classes a checkpoint may hold: torch's layers, Ultralytics' layers
# and models. Narrower than ``torch.nn.``/``ultralytics.nn.`` on purpose: importing
# ``ultralytics.nn.text_model`` installs packages, ``AutoBackend`` loads other files.
_MODULE_HOMES = re.compile(
    r"(?:torch\.nn\.modules|ultralytics\.nn\.modules)(?:\.[A-Za-z_]\w*)?|ultralytics\.nn\.tasks"
)
_CLASS_MODULES = ("ultralytics.utils.loss", "ultralytics.utils.tal")  # older Ultralytics
_DATA_GLOBALS = (
    "argparse.Namespace",  # torchvision reference scripts
    "ultralytics.utils.IterableSimpleNamespace",
    "numpy.dtype",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def error_text(error: BaseException, limit: int = 200) -> str:
    """``"<Type>: <first line of its message>"``, the line cut to ``limit`` characters:
    how a checkpoint error quotes the error under it.

    Example:
        >>> error_text(ValueError("bad magic number\\nmore lines"))
        'ValueError: bad magic number'
    """
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would run code outside tbfeat's allow-list when loaded."""


@dataclass(frozen=True)
class Inspection:
    """What a checkpoint's pickle references, read without executing it.

    Attributes:
        path: The file.
        names: The globals outside torch's own ``weights_only`` set (``module.name``).
        calls: Globals the pickle calls with arguments (``REDUCE``).
        values: Globals the pickle passes around as values (to a call, into a container).
    """

    path: Path
    names: frozenset[str]
    calls: frozenset[str]
    values: frozenset[str]

    @property
    def kind(self) -> str:
        """``"ultralytics"`` when an ``ultralytics.`` global is referenced, else
        ``"state_dict"``, whatever the file's strings say."""
        return (
            "ultralytics" if any(n.startswith("ultralytics.") for n in self.names) else "state_dict"
        )


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What loading a checkpoint file gives, whichever loader and kind.

    Every checkpoint loader returns it (:mod:`tbfeat.checkpoints`, which exports it, and
    the integrations' ``load_checkpoint``); it lives here, below the integrations.

    Example:
        >>> import torch
        >>> loaded = LoadedCheckpoint.of(torch.nn.ReLU(), {"epoch": 2, "lr": 0.1})
        >>> loaded.epoch, dict(loaded.extras)
        (2, {'epoch': 2, 'lr': 0.1})
    """

    model: Any
    """The model: Ultralytics' task model (``YOLO``/``RTDETR`` when loaded with
    ``trust``), or the torchvision or your own model with the weights, in eval mode."""
    epoch: int | None = None
    """The 0-based epoch the file stores (Ultralytics and torchvision's reference
    format); ``None`` when it stores none, or -1 (stripped at the end of a training)."""
    extras: Mapping[str, Any] = field(default_factory=dict)
    """The checkpoint's entries other than the weights (``epoch``, ``args``,
    ``optimizer``, Ultralytics' ``train_args``...); empty for a bare state dict."""

    @classmethod
    def of(cls, model: Any, extras: Mapping[str, Any]) -> LoadedCheckpoint:
        """``model`` with the checkpoint's other entries, its epoch read from them."""
        return cls(model, stored_epoch(extras.get("epoch")), dict(extras))


def stored_epoch(value: Any) -> int | None:
    """A checkpoint's ``epoch`` entry as a 0-based epoch: ``None`` when it is no epoch
    (missing, or -1 once stripped)."""
    return int(value) if isinstance(value, int) and value >= 0 else None


def _import_attr(module: str, attr: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attr, None)
    except Exception:  # an absent or broken module: not allowed
        return None


def _data_global(name: str) -> Any:
    if name == "argparse.Namespace":
        import argparse

        return argparse.Namespace
    if name == "ultralytics.utils.IterableSimpleNamespace":
        return _import_attr("ultralytics.utils", "IterableSimpleNamespace")
    import numpy as np

    return np.dtype if name == "numpy.dtype" else np.float64(0).__reduce__()[0]  # scalar


def allowed_global(name: str) -> tuple[Any, bool] | None:
    """The object an allow-listed global names, and whether a pickle may call it.

    Allowed: ``nn.Module`` subclasses defined in ``torch.nn.modules.*``,
    ``ultralytics.nn.modules.*`` or ``ultralytics.nn.tasks``, the classes of
    ``ultralytics.utils.loss``/``.tal``, and the layers of the user's own modules
    (:func:`own_class`); these only allocated, never called: a constructor would run with
    arguments from the file. Plus the data types real checkpoints carry:
    ``argparse.Namespace``, ``ultralytics.utils.IterableSimpleNamespace``, numpy dtypes and
    scalars. Only the modules named here and the user's own modules are imported.

    Args:
        name: A pickle global, ``module.name``.

    Returns:
        ``(object, callable)``, or ``None`` for a global off the allow-list.
    """
    found = framework_global(name)
    if found is not None or _is_framework(name.rpartition(".")[0]):
        return found
    obj = own_class(name)
    return None if obj is None else (obj, False)


def _is_framework(module: str) -> bool:
    return (
        module in _CLASS_MODULES
        or module == "numpy.dtypes"
        or _MODULE_HOMES.fullmatch(module) is not None
    )


def framework_global(name: str) -> tuple[Any, bool] | None:
    """:func:`allowed_global` without the user's own modules: torch's and Ultralytics'
    classes and the data types; nothing but those frameworks is imported."""
    module, _, attr = name.rpartition(".")
    if not attr.isidentifier():
        return None
    if name in _DATA_GLOBALS:
        obj = _data_global(name)
        return None if obj is None else (obj, True)
    if module == "numpy.dtypes":
        import numpy as np

        obj = _import_attr(module, attr)
        ok = isinstance(obj, type) and issubclass(obj, np.dtype)
        return (obj, True) if ok else None
    if not _is_framework(module):
        return None
    obj = _import_attr(module, attr)
    if not isinstance(obj, type) or obj.__new__ is not object.__new__:
        return None
    if module in _CLASS_MODULES:
        return (obj, False) if obj.__module__ == module else None
    from torch import nn

    ok = issubclass(obj, nn.Module) and _MODULE_HOMES.fullmatch(obj.__module__)
    return (obj, False) if ok else None


# ------------------------------------------------------------------ the user's own layers
# Never the user's own code, wherever the file lies: torch, and the Ultralytics modules
# that act on import (text_model installs packages) or construction (AutoBackend).
_NOT_OWN = re.compile(r"(?:__main__|torch|ultralytics\.nn\.(?:text_model|autobackend))(?:\..*)?")
# What torch's weights_only unpickler, or a dict it fills, may call on a class or an
# instance it allocates: the user's classes must leave these to torch.nn.Module/object.
_RUN_ON_LOAD = (
    "__new__", "__setstate__", "__setattr__", "__getattribute__", "__hash__", "__eq__", "__del__"
)  # fmt: skip
_IMPORTED: list[tuple[str, str]] = []  # the user's modules imported for checkpoints, files


def own_roots() -> list[Path]:
    """Where the user's own modules lie: the working directory and the ``PYTHONPATH``
    entries."""
    entries = [os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return [Path(e).resolve() for e in entries if e]


def _own_file(path: str | None, roots: list[Path]) -> bool:
    """Whether ``path`` is a file of the user's: under a root, outside any installed
    package (``site-packages``/``dist-packages``) and the standard library."""
    if not path:
        return False
    file = Path(path).resolve()
    if {"site-packages", "dist-packages"} & set(file.parts):
        return False
    stdlib = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
    if any(file.is_relative_to(lib) for lib in stdlib):
        return False
    return any(file.is_relative_to(root) for root in roots)


def _own_specs(module: str, roots: list[Path]) -> list[ModuleSpec] | None:
    """The specs of ``module`` and its packages that are not imported yet, each a ``.py``
    file of the user's; ``None`` when one is not. Found as ``import`` finds them (on
    ``sys.path``, then under the roots), executing nothing: packages are searched through
    their specs' locations, not imported."""
    parts, specs, search = module.split("."), [], [*sys.path, *map(str, roots)]
    if BuiltinImporter.find_spec(parts[0]) or FrozenImporter.find_spec(parts[0]):
        return None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        loaded = sys.modules.get(name)
        spec = loaded.__spec__ if loaded is not None else PathFinder.find_spec(name, search)
        if spec is None:
            return None
        if loaded is None:
            if not (str(spec.origin).endswith(".py") and _own_file(spec.origin, roots)):
                return None
            specs.append(spec)
        search = list(spec.submodule_search_locations or [])
    return specs


def _defines_class(file: str, name: str) -> bool:
    """Whether the source of ``file`` defines the class ``name`` at its top level (parsed,
    not run)."""
    try:
        tree = ast.parse(Path(file).read_bytes(), file)
    except (OSError, SyntaxError, ValueError):
        return False
    return any(isinstance(n, ast.ClassDef) and n.name == name for n in tree.body)


def _import_own(module: str, attr: str, roots: list[Path]) -> Any:
    """``module`` imported when it is the user's own and defines ``attr`` as a class;
    else ``None``. Its top-level code runs, as when the user's training imports it."""
    loaded = sys.modules.get(module)
    if loaded is not None:
        return loaded if _own_file(getattr(loaded, "__file__", None), roots) else None
    specs = _own_specs(module, roots)
    if not specs or not _defines_class(str(specs[-1].origin), attr):
        return None
    root = None  # a top-level module found only under a root, as `python script.py` finds it
    if "." not in specs[0].name and PathFinder.find_spec(specs[0].name, sys.path) is None:
        origin = Path(str(specs[0].origin))
        root = str(origin.parents[1] if specs[0].submodule_search_locations else origin.parent)
        sys.path.append(root)
    try:
        imported = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a module that does not import is not allowed
        return None
    finally:
        if root is not None:
            sys.path.remove(root)
    if Path(getattr(imported, "__file__", "")).resolve() != Path(str(specs[-1].origin)).resolve():
        return None
    _IMPORTED.append((module, str(specs[-1].origin)))
    return imported


def own_class(name: str) -> Any:
    """The class ``name`` of the user's own code, or ``None``.

    The user's own: a module whose file lies under the working directory or a
    ``PYTHONPATH`` entry, outside ``site-packages``/``dist-packages`` and the standard
    library (found without running anything), whose source defines the class at its top
    level; not ``torch``, not ``__main__``. A module not yet imported is imported, which
    runs its top-level code as the user's own training does. The class must be an
    ``nn.Module`` subclass defined there, of plain ``type``, that leaves to
    ``torch.nn.Module`` and ``object`` everything loading may call on it (allocation,
    ``__setstate__``, ``__setattr__``, hashing, ``__del__``): allocated by torch's
    ``weights_only`` unpickler, it runs no code of its own.
    """
    from torch import nn

    module, _, attr = name.rpartition(".")
    if not module or not attr.isidentifier() or _NOT_OWN.fullmatch(module):
        return None
    loaded = _import_own(module, attr, own_roots())
    obj = getattr(loaded, attr, None)
    if not (type(obj) is type and issubclass(obj, nn.Module) and obj.__module__ == module):
        return None
    for klass in obj.__mro__:
        mod = klass.__module__
        if klass is object or mod.startswith("torch.") or _MODULE_HOMES.fullmatch(mod):
            continue
        if any(method in vars(klass) for method in _RUN_ON_LOAD):
            return None
    return obj


def _say_imported(path: Path, before: int, names: Iterable[str]) -> None:
    """One line naming the user's modules imported for the checkpoint ``path``; said by the
    main process only (a sweep's worker processes import them again)."""
    import multiprocessing

    new = _IMPORTED[before:]
    if not new or multiprocessing.parent_process() is not None:
        return
    from tqdm import tqdm

    modules = ", ".join(f"{m} ({file})" for m, file in new)
    classes = [n for n in sorted(names) if n.rpartition(".")[0] in dict(new)]
    tqdm.write(
        f"tbfeat: imported your own module{'s' if len(new) > 1 else ''} {modules} for "
        f"{str(path)!r}, which allocates {', '.join(classes)} without calling "
        f"{'it' if len(classes) == 1 else 'them'}",
        file=sys.stderr,
    )


# ------------------------------------------------------------------ inspection
_PUSHES = frozenset(
    ("NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET")
    + ("BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "LONG1")
)
# instruction: (items it takes off the stack, whether it pushes a result)
_TAKES = {
    "APPEND": (1, False), "SETITEM": (2, False), "BUILD": (1, False), "TUPLE1": (1, True),
    "TUPLE2": (2, True), "TUPLE3": (3, True), "BINPERSID": (1, True), "STOP": (1, False),
}  # fmt: skip


class _PickleStack:
    """The stack of a ``weights_only`` unpickler, with globals' names for their objects
    and ``None`` for everything else; nothing is built or called."""

    def __init__(self) -> None:
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.names: set[str] = set()
        self.calls: set[str] = set()
        self.values: set[str] = set()

    def take(self, n: int) -> list[Any]:
        if len(self.stack) < n:
            raise pickle.UnpicklingError("stack underflow")
        taken = self.stack[len(self.stack) - n :]
        del self.stack[len(self.stack) - n :]
        return taken

    def consume(self, items: Iterable[Any]) -> None:
        self.values.update(i for i in items if isinstance(i, str))

    def pop_mark(self) -> None:
        if not self.marks:
            raise pickle.UnpicklingError("no MARK")
        self.consume(self.stack)
        self.stack = self.marks.pop()

    def step(self, kind: str, arg: Any) -> None:
        """Apply one instruction; raise for one ``weights_only`` loading rejects."""
        if kind == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            self.names.add(f"{module}.{attr}")
            self.stack.append(f"{module}.{attr}")
        elif kind in _PUSHES:
            self.stack.append(None)
        elif kind == "MARK":
            self.marks.append(self.stack)
            self.stack = []
        elif kind in ("TUPLE", "APPENDS", "SETITEMS"):
            self.pop_mark()
            if kind == "TUPLE":
                self.stack.append(None)
        elif kind in _TAKES:
            n, pushes = _TAKES[kind]
            self.consume(self.take(n))
            if pushes:
                self.stack.append(None)
        elif kind in ("BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise pickle.UnpicklingError(f"memo {arg} not set")
            self.stack.append(self.memo[arg])
        elif kind in ("BINPUT", "LONG_BINPUT"):
            self.memo[arg] = self.take(1)[0]
            self.stack.append(self.memo[arg])
        elif kind in ("NEWOBJ", "REDUCE"):  # NEWOBJ allocates its class: not a use as value
            target, args = self.take(2)
            self.consume([args])
            if kind == "REDUCE" and isinstance(target, str):
                self.calls.add(target)
            self.stack.append(None)
        elif kind != "PROTO":
            raise pickle.UnpicklingError(f"unsupported pickle instruction {kind}")


def scan_pickle(data: bytes) -> tuple[set[str], set[str], set[str]]:
    """The globals a pickle references, those it calls, and those it uses as values.

    Follows the stack through the instructions ``torch.load(weights_only=True)`` accepts
    (``pickletools`` parses, nothing is executed). A global is *called* when it is the
    function of a ``REDUCE``, *a value* when anything but ``NEWOBJ`` (which allocates a
    class without running its constructor) or ``REDUCE`` consumes it.

    Raises:
        pickle.UnpicklingError: an instruction ``weights_only`` loading does not support,
            or a malformed stack.
    """
    state = _PickleStack()
    for op, arg, _ in pickletools.genops(data):
        state.step(op.name, arg)
        if op.name == "STOP":
            break
    return state.names, state.calls, state.values


def _registered_names() -> set[str]:
    """Globals registered process-wide with ``add_safe_globals`` (Ultralytics' restricted
    loader registers the classes of every checkpoint it loads), torch's own left out:
    ``get_unsafe_globals_in_checkpoint`` no longer lists them."""
    import torch

    names = set()
    for entry in torch.serialization.get_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, None)
        name = name or f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        if not name.startswith("torch.") or name.startswith("torch.nn."):
            names.add(name)
    return names


def inspect_checkpoint(path: Path) -> Inspection:
    """Read the globals a ``torch.save`` file references, executing nothing.

    Raises:
        CheckpointError: not a readable ``torch.save`` zip archive (corrupt, truncated,
            TorchScript, the legacy format).
        UnsafeCheckpointError: a pickle that cannot be inspected (instructions the
            ``weights_only`` loader does not support).
    """
    import torch

    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:
        raise UnsafeCheckpointError(
            f"cannot read checkpoint {str(path)!r} without running code: torch "
            f"{torch.__version__} cannot inspect checkpoints (torch>=2.5 can); {TRUST_HINT}"
        )
    try:
        unsafe = set(scan(path))
        # the record torch.load reads, through torch's own zip reader
        data = torch._C.PyTorchFileReader(str(path)).get_record("data.pkl")
        names, calls, values = scan_pickle(data)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"cannot read checkpoint {str(path)!r} without running code: its pickle cannot "
            f"be inspected ({e}); {TRUST_HINT}"
        ) from None
    except (ValueError, OSError, RuntimeError, EOFError) as e:
        if "torchscript" in str(e).lower():
            raise CheckpointError(
                f"{str(path)!r} is a TorchScript archive, not a torch.save checkpoint"
            ) from None
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint (corrupt or truncated?)"
        ) from None
    unsafe |= names & _registered_names()
    return Inspection(Path(path), frozenset(unsafe), frozenset(calls), frozenset(values))


def allowed_globals(inspection: Inspection) -> list[Any]:
    """The ``safe_globals`` entries a checkpoint needs, all of them on the allow-list.

    The user's modules imported for the file's classes (:func:`own_class`) are named in
    one line on stderr.

    Raises:
        UnsafeCheckpointError: a global off the allow-list, or a model class the pickle
            calls or passes as a value; the message names them and the opt-in.
    """
    bad, entries, imported = [], [], len(_IMPORTED)
    for name in sorted(inspection.names):
        used = name in inspection.values or name in inspection.calls
        # the user's own classes are only ever allocated: one the file uses is not imported
        found = framework_global(name) if used else allowed_global(name)
        if found is None:
            bad.append(name)
            continue
        obj, callable_ = found
        if name in inspection.values or (name in inspection.calls and not callable_):
            bad.append(f"{name} [as a value]" if name in inspection.values else f"{name} [called]")
            continue
        own = f"{obj.__module__}.{obj.__qualname__}" == name
        entries.append(obj if own else (obj, name))
    _say_imported(inspection.path, imported, inspection.names)
    if bad:
        raise UnsafeCheckpointError(
            f"cannot read checkpoint {str(inspection.path)!r} without running code: it needs "
            f"globals outside tbfeat's allow-list ({', '.join(bad)}); {TRUST_HINT}"
        )
    if "numpy.dtype" in inspection.names:  # a dtype's class comes off the stack, unnamed
        import numpy as np

        dtypes = getattr(np, "dtypes", None)
        entries += (
            [c for c in vars(dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)]
            if dtypes is not None
            else [type(np.dtype(np.float64))]
        )
    return entries


def check_checkpoint(path: Path) -> Inspection:
    """Inspect ``path`` and raise :class:`UnsafeCheckpointError` unless it loads within
    the allow-list."""
    inspection = inspect_checkpoint(path)
    allowed_globals(inspection)
    return inspection


def kind_of(path: Path, *, trust: bool = False) -> str:
    """``"ultralytics"`` if the pickle references an Ultralytics class, else
    ``"state_dict"``; nothing is unpickled. A file that cannot be inspected is a state
    dict with ``trust`` and raises without."""
    try:
        return inspect_checkpoint(path).kind
    except UnsafeCheckpointError:
        if trust:
            return "state_dict"
        raise


def torch_load(path: Path, *, trust: bool = False, mmap: bool = True) -> Any:
    """``torch.load`` a checkpoint on the CPU: with ``trust`` fully unpickled, else with
    ``weights_only=True`` and the allow-listed globals it needs.

    Raises:
        UnsafeCheckpointError: without ``trust``, a global off the allow-list.
        Exception: whatever ``torch.load`` raises for a damaged file.
    """
    import argparse

    import torch

    if trust:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
    try:
        entries = allowed_globals(inspect_checkpoint(path))
    except UnsafeCheckpointError:
        raise
    except CheckpointError:  # legacy format or damaged: weights_only refuses any other
        # global all the same, and torch.load reports the damage
        entries, mmap = [argparse.Namespace], False
    with torch.serialization.safe_globals(entries):
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
