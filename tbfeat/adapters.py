"""How the core sees a model: which module to hook, its stages, and how to run probes.

The core knows nothing about frameworks. :func:`adapt` hands framework objects to the
integration module that understands them (imported only then), and wraps any other
``nn.Module`` in the generic :class:`ModelAdapter`. Adapters describe models; they hold
no logger and no logging state.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .hooks import OutputCallback, StageHooks, probing
from .images import ImageLike, to_tensors
from .stages import Stage, generic_stages, numbered
from .targets import ScoreTap

# (top-level package of the model's class, integration module). The integration module's
# ``adapter_for(obj)`` returns a ModelAdapter, or None when the object is not one it handles.
INTEGRATIONS: list[tuple[str, str]] = [
    ("ultralytics", "tbfeat.integrations.ultralytics"),
    ("torchvision", "tbfeat.integrations.torchvision"),
    ("timm", "tbfeat.integrations.timm"),
    ("transformers", "tbfeat.integrations.transformers"),
]

# (children a model must have, integration module): integrations that also recognise
# models of any package by their structure, such as a user's own detector written like
# torchvision's. The module's ``adapter_for_structure(obj)`` returns a ModelAdapter or None.
STRUCTURAL: list[tuple[tuple[str, ...], str]] = [
    (("transform", "backbone"), "tbfeat.integrations.torchvision"),
]


@dataclass(frozen=True)
class Probes:
    """Probe inputs ready for :meth:`ModelAdapter.forward`, and one name per image."""

    inputs: tuple[Any, ...]
    names: tuple[str, ...]


class ModelAdapter:
    """Generic adapter: any ``nn.Module``, its direct children as stages.

    Integrations subclass it to name better stages, prepare inputs the way their models
    expect them, and attach framework callbacks while a logger's ``with`` block lasts.
    """

    model_prepares_input: str | None = None
    """How the model prepares its own input from the probe images (a detector's
    ``"its transform resizes and normalizes"``), or ``None`` when it takes them as
    :meth:`prepare` reads them, so that a ``preprocess=`` function may prepare them:
    plain modules and classifiers. :func:`check_preprocess` rejects a ``preprocess=``
    for the others with this phrase."""

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module

    def candidate_stages(self) -> list[Stage]:
        """Everything :func:`list_stages` shows; indices in ``stages=`` refer to it."""
        return generic_stages(self.module)

    def default_stages(self) -> list[Stage]:
        """The stages logged when ``stages=None``."""
        return self.candidate_stages()

    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def preprocessor(self, preprocess: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """``preprocess=`` as a function of one ``(3, H, W)`` image in [0, 1]: as given
        here; an integration turns its framework's own preprocessing objects into one."""
        return preprocess

    def prepare(
        self,
        inputs: ImageLike | Sequence[ImageLike],
        names: Sequence[str] | None = None,
        *,
        imgsz: int | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Probes:
        """Validate and convert probe inputs before any hook exists.

        Every adapter reads the images with tbfeat's one reader
        (:func:`tbfeat.images.to_tensors`: RGB, uint8 and uint16), then adds its model's
        own steps (a letterbox); this one applies ``preprocess``.

        Args:
            inputs: Images (see :func:`tbfeat.images.to_tensors`).
            names: One name per image; default file stems or positions.
            imgsz: The size integrations letterbox to; plain modules take images as given.
            preprocess: Called with each image as a ``(3, H, W)`` float tensor in [0, 1]
                (RGB); returns the ``(C, H, W)`` tensor the model takes. Only for
                adapters whose :attr:`model_prepares_input` is ``None``.
        """
        preprocess = check_preprocess(preprocess, self)
        tensors, names = to_tensors(inputs, names)
        if preprocess is not None:
            tensors = [_preprocessed(preprocess, t) for t in tensors]
        device, dtype = self.device(), self.dtype()
        return Probes(tuple(t.to(device=device, dtype=dtype) for t in tensors), tuple(names))

    def forward(
        self, inputs: Sequence[Any], module: nn.Module | None = None, stages: Sequence[Stage] = ()
    ) -> Any:
        """Run ``module`` (default the adapter's) on :meth:`prepare`'s inputs.

        Eval mode and no_grad are already set; ``stages`` are the stages hooked (a
        detector runs its heads only when one lies there). Images of one size run as one
        batch; images of different sizes run one by one (the result is then a list).
        """
        module = self.module if module is None else module
        if len(inputs) == 1:  # a view: no copy of a large image
            return module(inputs[0].unsqueeze(0))
        if len({tuple(t.shape) for t in inputs}) == 1:
            return module(torch.stack(list(inputs)))
        return [module(t.unsqueeze(0)) for t in inputs]

    def run_probe(
        self,
        probes: Probes,
        stages: Sequence[Stage],
        on_output: OutputCallback,
        *,
        module: nn.Module | None = None,
        **hook_kwargs: Any,
    ) -> Any:
        """The probe path: ``module`` (default the adapter's) in eval mode under
        ``torch.no_grad()`` with ``stages`` hooked, run on ``probes``; hooks removed and
        every module's mode restored afterwards, also when the forward raises.

        Probes of one model wait for each other (see :func:`tbfeat.hooks.probing`), and
        only this probe's hooks record its forward: hooks other loggers hold on the model
        (a ``with`` block) do not."""
        module = self.module if module is None else module
        hooks = StageHooks(stages, on_output, root=module, exclusive=True, **hook_kwargs)
        with probing(module, hooks), hooks:
            return self.forward(probes.inputs, module, stages)

    def cam_forward(self, inputs: Sequence[Any], module: nn.Module) -> tuple[Any, list[Any]]:
        """The whole model on one batch of :meth:`prepare`'s inputs (of one size), for
        class activation maps: the heads included. Returns the output and the tensors
        the gradient is taken towards (the inputs, which require it)."""
        return self.forward(inputs, module), list(inputs)

    def score_tap(self, module: nn.Module) -> ScoreTap:
        """Hooks that collect the class scores of ``module``'s predictions during
        :meth:`cam_forward` (see :mod:`tbfeat.targets`); the base reads a classifier's
        ``(N, classes)`` output."""
        return ScoreTap(module)

    def attach(self, logger: Any) -> Callable[[], None]:
        """Called when a logger's ``with`` block starts; returns what undoes it.

        The generic adapter captures every forward of its module for the block; a
        block in which the module never ran (or ran without its hooks: a
        ``torch.compile`` copy called instead) is said once per logger at its end.
        Integrations add framework callbacks instead.
        """
        session = logger.begin(self.module)
        if session is None:  # a rank other than 0
            return logger.end
        ran = [0]

        def count(module: nn.Module, args: Any) -> None:
            ran[0] += 1

        handle = self.module.register_forward_pre_hook(count)

        def detach() -> None:
            handle.remove()
            logger.end()
            if not ran[0]:
                session.say_once(
                    "with-nothing",
                    f"tbfeat: the with block captured nothing: {type(self.module).__name__} "
                    "did not run in it with its hooks (call the model itself inside the "
                    "block, not a torch.compile'd copy; or use logger.log(images))",
                )

        return detach


def _preprocessed(preprocess: Callable[[Any], Any], image: torch.Tensor) -> torch.Tensor:
    name = getattr(preprocess, "__name__", type(preprocess).__name__)
    with torch.no_grad():
        out = preprocess(image)
    if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[0] == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"preprocess {name} must return one (C, H, W) tensor per image, got {got}")
    return out


def check_preprocess(preprocess: Any, adapter: ModelAdapter) -> Any:
    """``preprocess`` checked for ``adapter``'s model: a function, and only for models
    that do not prepare their input themselves (plain modules and classifiers; see
    :attr:`ModelAdapter.model_prepares_input`)."""
    if preprocess is None:
        return None
    if not callable(preprocess):
        raise TypeError(
            f"preprocess must be a function of one image tensor (such as "
            f"weights.transforms()), got {type(preprocess).__name__}"
        )
    if adapter.model_prepares_input is not None:
        raise ValueError(
            f"preprocess= is for plain modules and classifiers; "
            f"{type(adapter.module).__name__} prepares its input itself "
            f"({adapter.model_prepares_input}), so leave it out"
        )
    return adapter.preprocessor(preprocess)


def adapt(model: object) -> ModelAdapter:
    """The adapter for ``model``: an integration's for framework objects, else generic.

    Integrations may decline an object (their ``adapter_for`` returns ``None``); this
    never does.

    Raises:
        TypeError: ``model`` is no ``nn.Module`` that any adapter takes (naming its type),
            or a TorchScript module (scripted or traced: it runs no hooks).
    """
    if isinstance(model, ModelAdapter):
        return model
    model = unwrap(model)
    if isinstance(model, torch.jit.ScriptModule):  # scripted and traced alike
        raise TypeError(
            f"model is a TorchScript module ({type(model).__name__}, from torch.jit.script "
            "or torch.jit.trace): its compiled forward runs no module hooks, so no stage "
            "could be captured; pass the nn.Module it was made from"
        )
    package = type(model).__module__.split(".", 1)[0]
    for owner, module_name in INTEGRATIONS:
        if package == owner:
            adapter = importlib.import_module(module_name).adapter_for(model)
            if adapter is not None:
                return adapter
    if isinstance(model, nn.Module):
        children = dict(model.named_children())
        for names, module_name in STRUCTURAL:
            if all(name in children for name in names):
                adapter = importlib.import_module(module_name).adapter_for_structure(model)
                if adapter is not None:
                    return adapter
        return ModelAdapter(model)
    raise TypeError(
        f"model must be a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}"
    )


def unwrap(model: object) -> object:
    """The module inside ``torch.compile`` (``_orig_mod``) and DDP/DataParallel (``module``)
    wrappers, whose own children would hide the model's stages."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        break
    return model


def list_stages(model: object) -> list[Stage]:
    """The stages a model offers for ``stages=``, with their index, name, type and tag key.

    Integrations supply the list for Ultralytics, torchvision, timm and Hugging Face
    vision transformer models; any other ``nn.Module`` offers its direct children.
    Deeper modules can still be chosen by their qualified name (``"layer1.0.conv1"``).

    Example:
        >>> import torchvision
        >>> from tbfeat import list_stages
        >>> [s.name for s in list_stages(torchvision.models.resnet18(weights=None))][:5]
        ['conv1', 'bn1', 'relu', 'maxpool', 'layer1']
    """
    candidates = adapt(model).candidate_stages()
    return numbered(candidates, len(candidates))
