"""Hugging Face ``Trainer`` checkpoints: ``checkpoint-<N>/`` folders, read safely.

A ``Trainer`` saves each checkpoint as a folder: the weights (``model.safetensors``, or
``pytorch_model.bin``, each possibly sharded behind a ``*.index.json``), the model's
``config.json``, ``trainer_state.json`` (whose ``global_step`` is the step a ``Trainer``
callback logs at) and the optimizer's files. A folder that holds such weights is one
checkpoint; its step is ``global_step``, else the ``<N>`` of its name.

``model.safetensors`` holds tensors only and loads with ``safetensors.torch.load_file``;
``pytorch_model.bin`` loads with tbfeat's allow-listed ``torch.load(weights_only=True)``
(:func:`tbfeat.safeload.torch_load`). The weights go into the model given (``--model``),
or, without one, into the class ``config.json`` names, built by ``transformers`` from
that local file (nothing is downloaded, no code of the checkpoint's is run), with the
same checks as any state dict (:mod:`tbfeat.integrations.torchvision`): keys are mapped
to the model's own names as ``transformers`` maps them (:func:`converted`), in the dtype
of the model's parameters.

A folder may also hold the image processor the ``Trainer`` saved
(``preprocessor_config.json``); a sweep prepares its probe images with it
(:func:`image_processor`). A PEFT (LoRA) ``Trainer`` saves only its adapter
(``adapter_model.safetensors``): such a folder is refused, saying how to merge it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .safeload import (
    CheckpointError,
    LoadedCheckpoint,
    check_checkpoint,
    error_text,
    torch_load,
)

KIND = "hf"
"""The kind of a Hugging Face checkpoint folder, beside ``"ultralytics"`` and
``"state_dict"`` (see :func:`tbfeat.checkpoints.kind_of`)."""
WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The weights files a checkpoint folder may hold, in the order they are preferred."""
ADAPTER = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json")
"""The files of a PEFT (LoRA) adapter, which a ``Trainer`` of a PEFT model saves in place
of the model's weights: not a checkpoint tbfeat loads (:func:`weights_file` says so)."""
PROCESSOR = "preprocessor_config.json"
"""The image processor a ``Trainer`` saves (its ``processing_class``) in each checkpoint
folder: a sweep prepares its probe images with it (:func:`image_processor`)."""
FOLDER = re.compile(r"^checkpoint-(\d+)$")
"""The name a ``Trainer`` gives each checkpoint folder."""
_JSON_MAX_BYTES = 256 * 2**20  # a trainer_state.json with a long log history stays far below


def is_checkpoint_folder(path: Path) -> bool:
    """Whether ``path`` is a folder named ``checkpoint-<N>`` or holding a weights file (or
    a PEFT adapter's, which :func:`weights_file` refuses with its reason)."""
    return path.is_dir() and (
        bool(FOLDER.match(path.name))
        or any((path / name).is_file() for name in (*WEIGHTS, *ADAPTER))
    )


def trainer_folders(folder: Path) -> list[Path]:
    """The ``checkpoint-<N>`` folders in ``folder`` (a ``Trainer``'s ``output_dir``),
    in step order."""
    found = [p for p in folder.iterdir() if FOLDER.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(FOLDER.match(p.name)[1]))


def weights_file(folder: Path) -> Path:
    """The weights file of a checkpoint folder (see :data:`WEIGHTS`).

    Raises:
        CheckpointError: none there, naming the folder and the files allowed; or only a
            PEFT adapter's, saying how to merge it into full weights.
    """
    for name in WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    adapter = [name for name in ADAPTER if (folder / name).is_file()]
    if adapter:
        raise CheckpointError(
            f"{str(folder)!r} holds a PEFT (LoRA) adapter ({', '.join(adapter)}) and no full "
            "weights: adapter-only checkpoints are not supported. Merge the adapter into its "
            "base model and save that: PeftModel.from_pretrained(base, folder)"
            ".merge_and_unload().save_pretrained(out), then sweep out"
        )
    raise CheckpointError(
        f"{str(folder)!r} is not a checkpoint: a Hugging Face checkpoint folder holds "
        f"{' or '.join(WEIGHTS)}, and this one holds none"
    )


def global_step(folder: Path) -> int | None:
    """``global_step`` of the folder's ``trainer_state.json``; ``None`` without one.

    Raises:
        CheckpointError: a ``trainer_state.json`` that does not read as one.
    """
    path = folder / "trainer_state.json"
    if not path.is_file():
        return None
    state = _read_json(path)
    step = state.get("global_step") if isinstance(state, dict) else None
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{str(path)!r}: global_step {step!r} is not an int >= 0")
    return step


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read(_JSON_MAX_BYTES + 1)
        if len(data) > _JSON_MAX_BYTES:
            raise ValueError(f"larger than {_JSON_MAX_BYTES} bytes")
        return json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {type(e).__name__}: {e}") from None


def shards(folder: Path) -> list[Path]:
    """The files that hold the folder's weights: the weights file, or the shards its
    ``*.index.json`` maps the keys to (each a file in the folder).

    Raises:
        CheckpointError: no weights file, or an index that names no shard or one outside
            the folder or missing.
    """
    first = weights_file(folder)
    if not first.name.endswith(".index.json"):
        return [first]
    index = _read_json(first)
    mapping = index.get("weight_map") if isinstance(index, dict) else None
    names = sorted(set(mapping.values())) if isinstance(mapping, dict) else []
    if not names or not all(isinstance(n, str) and Path(n).name == n for n in names):
        raise CheckpointError(
            f"{str(first)!r} is not a shard index: expected a weight_map of tensor names "
            "to file names in its folder"
        )
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{str(first)!r} names shards that are missing: {', '.join(missing)}")
    return [folder / n for n in names]


def check_folder(folder: Path) -> None:
    """Check the folder's ``pytorch_model*.bin`` files against tbfeat's allow-list
    (inspection only); safetensors files hold tensors only.

    Raises:
        UnsafeCheckpointError: a file that needs globals off the allow-list.
        CheckpointError: no weights file, or a damaged one.
    """
    for path in shards(folder):
        if path.suffix == ".bin":
            check_checkpoint(path)


def read_weights(folder: Path, *, trust: bool = False) -> tuple[dict[str, Any], Path]:
    """The folder's state dict (its shards merged) and the file that names it in errors
    (the weights file, or the shard index)."""
    state: dict[str, Any] = {}
    for path in shards(folder):
        state.update(_read_file(path, trust))
    return state, weights_file(folder)


def _read_file(path: Path, trust: bool) -> dict[str, Any]:
    """One weights file: safetensors through ``load_file``, a ``.bin`` through
    :func:`~tbfeat.safeload.torch_load` (allow-listed, ``weights_only=True``)."""
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise CheckpointError(
                    f"{str(path)!r} needs the safetensors package: pip install safetensors"
                ) from None
            state = load_file(str(path), device="cpu")
        else:
            state = torch_load(path, trust=trust, mmap=False)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"cannot read {str(path)!r} (corrupt or truncated?): {error_text(e)}"
        ) from None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"{str(path)!r} holds no state dict (a dict of tensors)")
    return state


# ------------------------------------------------------------------ the model
def check_buildable(folder: Path) -> None:
    """Whether the model of ``folder`` can be built without ``--model``: its
    ``config.json`` names an architecture and ``transformers`` is installed.

    Raises:
        CheckpointError: naming what is missing and ``--model``.
    """
    config = folder / "config.json"
    hint = "pass the model its weights load into with --model / model="
    if not config.is_file():
        raise CheckpointError(f"{str(folder)!r} holds no config.json to build the model: {hint}")
    data = _read_json(config)
    names = data.get("architectures") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise CheckpointError(f"{str(config)!r} names no architecture: {hint}")
    if importlib.util.find_spec("transformers") is None:
        raise CheckpointError(
            f"{str(config)!r} names {names[0]}, a model of transformers, which is not "
            f"installed: pip install 'tbfeat[transformers]', or {hint}"
        )


def build_from_config(folder: Path) -> Any:
    """The model class that ``config.json`` names (``architectures[0]``, a class of
    ``transformers``), built from the local config with fresh weights: nothing is
    downloaded and no code of the checkpoint's runs (``trust_remote_code`` stays off).

    Raises:
        CheckpointError: :func:`check_buildable`'s reasons, a class ``transformers`` does
            not have, or a config it does not read.
    """
    check_buildable(folder)
    import transformers

    hint = "pass the model its weights load into with --model / model="
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {str(folder / 'config.json')!r} with transformers "
            f"{transformers.__version__} ({type(e).__name__}: {str(e)[:200]}): {hint}"
        ) from None
    name = config.architectures[0]
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not isinstance(cls, type):
        raise CheckpointError(
            f"{str(folder / 'config.json')!r} names {name}, which transformers "
            f"{transformers.__version__} does not have: {hint}"
        )
    try:
        return cls(config)
    except Exception as e:
        raise CheckpointError(f"cannot build {name} from {str(folder)!r}: {e}; {hint}") from None


def load_folder(
    folder: Path, model: Callable[[], Any] | None = None, *, trust: bool = False
) -> LoadedCheckpoint:
    """A checkpoint folder's weights in what ``model`` returns, or in the model its
    ``config.json`` names; eval mode. Its extras hold ``global_step`` (``None`` without a
    ``trainer_state.json``).

    Raises:
        CheckpointError: no weights file, a damaged one, weights that do not fit the model
            (naming the file and a few keys), or a model that cannot be built.
        UnsafeCheckpointError: without ``trust``, a ``.bin`` that needs globals off the
            allow-list.
    """
    from .integrations.torchvision import load_state

    step = global_step(folder)
    state, named = read_weights(folder, trust=trust)
    built = model() if model is not None else build_from_config(folder)
    hf = sys.modules.get("transformers")  # a model of transformers has imported it
    if hf is not None and isinstance(built, hf.PreTrainedModel):
        state = converted(built, state, named)
    try:
        load_state(built, state, type(built).__name__, named)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return LoadedCheckpoint.of(built.eval(), {"global_step": step})


def converted(model: Any, state: dict[str, Any], path: Path) -> dict[str, Any]:
    """``state`` under ``model``'s own keys, as ``transformers`` loads it: its loader
    renames the keys ``save_pretrained`` writes in an older layout (and converts fused
    ones) into a fresh model of the same class and config, in the dtype of ``model``'s
    parameters (not the config's), and fills tied weights.

    Only what the fresh model loaded is taken from it; the checkpoint's keys it did not
    take (a head ``model`` replaced, a module it added: unexpected to the fresh model, or
    of other shapes) pass on as saved, and whether the whole fits ``model`` is decided
    by loading it there (:func:`tbfeat.integrations.torchvision.load_state`). A key the
    fresh model left missing is not taken, so ``model`` reports it missing.

    Raises:
        CheckpointError: ``transformers`` cannot read ``state`` at all, naming the file.
    """
    import transformers

    try:
        with _quiet(transformers):
            fresh, info = type(model).from_pretrained(
                None, config=model.config, state_dict=dict(state), output_loading_info=True,
                ignore_mismatched_sizes=True, **_dtype_argument(transformers, model),
            )  # fmt: skip
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: {error_text(e, 300)}"
        ) from None
    mismatched = [_key(k) for k in info["mismatched_keys"]]
    not_loaded = {_key(k) for k in info["missing_keys"]} | set(mismatched)
    mapped = {k: v for k, v in fresh.state_dict().items() if k not in not_loaded}
    for key in (*map(_key, info["unexpected_keys"]), *mismatched):
        if key in state:  # a key renamed before it was found unexpected stays missing
            mapped.setdefault(key, state[key])
    return mapped


def _key(entry: Any) -> str:
    """A key of ``transformers``' loading info (a mismatched key is ``(key, shapes...)``)."""
    return str(entry[0] if isinstance(entry, tuple) else entry)


def _dtype_argument(transformers: Any, model: Any) -> dict[str, Any]:
    """``from_pretrained``'s dtype argument for the widest floating dtype of ``model``'s
    parameters (``dtype=`` from transformers 5 on, ``torch_dtype=`` before); none for a
    model without any."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not dtypes:
        return {}
    import torch

    widest = max(dtypes, key=lambda d: (torch.finfo(d).bits, -torch.finfo(d).eps))
    major = int(str(transformers.__version__).split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": widest}


def image_processor(folder: Path) -> Any:
    """The image processor saved in ``folder`` (``preprocessor_config.json``, a
    ``Trainer``'s ``processing_class``), built locally by ``transformers``'
    ``AutoImageProcessor``: nothing is downloaded and no code of the folder's runs.
    ``None`` when the folder holds none.

    Raises:
        CheckpointError: ``transformers`` is not installed or cannot read the file.
    """
    path = folder / PROCESSOR
    if not path.is_file():
        return None
    if importlib.util.find_spec("transformers") is None:
        raise CheckpointError(
            f"{str(path)!r} is a transformers image processor, and transformers is not "
            "installed: pip install 'tbfeat[transformers]'"
        )
    import transformers

    try:
        with _quiet(transformers):
            return transformers.AutoImageProcessor.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False
            )
    except Exception as e:
        raise CheckpointError(
            f"cannot build the image processor of {str(path)!r} with transformers "
            f"{transformers.__version__}: {error_text(e)}"
        ) from None


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """``transformers``' loading report and progress bar left out, as they were after."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
