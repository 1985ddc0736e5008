"""How the core sees a model: which module to hook, its stages, and how to run probes.

The core knows nothing about frameworks. :func:`adapt` hands framework objects to the
integration module that understands them (imported only then), and wraps any other
``nn.Module`` in the generic :class:`ModelAdapter`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .images import ImageLike, to_tensors
from .stages import Stage, generic_stages

if TYPE_CHECKING:
    from .logger import FeatureLogger

# (top-level package of the model's class, integration module). The integration module's
# ``adapt(obj)`` returns a ModelAdapter, or None when the object is not one it handles.
INTEGRATIONS: list[tuple[str, str]] = [
    ("ultralytics", "tbfeat.integrations.ultralytics"),
    ("torchvision", "tbfeat.integrations.torchvision"),
]


class ModelAdapter:
    """Generic adapter: any ``nn.Module``, its direct children as stages.

    Integrations subclass it to name better stages, prepare inputs the way their models
    expect them, and attach framework callbacks while a logger is active.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.logger: FeatureLogger | None = None
        """The logger this adapter serves (set by :class:`~tbfeat.FeatureLogger`)."""

    def candidate_stages(self) -> list[Stage]:
        """Everything :func:`tbfeat.list_stages` shows; indices in ``stages=`` refer to it."""
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

    def prepare(
        self, inputs: ImageLike | Sequence[ImageLike], names: Sequence[str] | None
    ) -> tuple[Any, list[str]]:
        """Validate and convert probe inputs before any hook exists.

        Returns what :meth:`forward` takes and one name per image, in the order the
        images reach the hooks.
        """
        tensors, names = to_tensors(inputs, names)
        device, dtype = self.device(), self.dtype()
        return [t.to(device=device, dtype=dtype) for t in tensors], names

    def forward(self, prepared: Any, module: nn.Module | None = None) -> Any:
        """Run ``module`` (default the adapter's) on :meth:`prepare`'s result.

        Eval mode and no_grad are already set. Images of one size run as one batch;
        images of different sizes run one by one (the result is then a list of outputs).
        """
        module = self.module if module is None else module
        if len({tuple(t.shape) for t in prepared}) == 1:
            return module(torch.stack(prepared))
        return [module(t.unsqueeze(0)) for t in prepared]

    def attach(self, logger: FeatureLogger) -> None:
        """Called when a logger's ``with`` block starts: hook the logger's stages.

        Integrations override it to add framework callbacks instead.
        """
        logger.install_hooks(logger.stages, root=self.module)

    def detach(self, logger: FeatureLogger) -> None:
        """Undo :meth:`attach`; called on exit, also after an exception. Safe to call twice."""
        logger.remove_hooks()


def adapt(model: object) -> ModelAdapter:
    """The adapter for ``model``: an integration's for framework objects, else generic."""
    if isinstance(model, ModelAdapter):
        return model
    model = unwrap(model)
    package = type(model).__module__.split(".", 1)[0]
    for owner, module_name in INTEGRATIONS:
        if package == owner:
            adapter = importlib.import_module(module_name).adapt(model)
            if adapter is not None:
                return adapter
    if isinstance(model, nn.Module):
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
