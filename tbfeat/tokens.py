"""Token maps: a transformer stage's output as the ``(N, C, H, W)`` map every picture takes.

A ViT block returns tokens ``(N, prefix + H·W, C)``: the class token and any register
(or distillation) tokens first, then one token per patch in row-major order; where the
grid follows the input's size (a Swin stage, a detector's encoder), the layout gives the
stride and the hooks resolve it for each forward (:meth:`TokenLayout.at`). timm's Swin and
the other channels-last families return ``(N, H, W, C)``. Neither is guessed from a shape:
the integration that knows the model family marks each such stage with a
:class:`TokenLayout` (:attr:`tbfeat.stages.Stage.tokens`), and :func:`split` is the one
place its output becomes a map. Grids, histograms, statistics, drift, evolution and class
activation maps then take the map as they take a convolutional stage's, under the same
tags; the class token's statistics are logged apart (``<base>/cls``).

This module imports nothing else of tbfeat.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class TokenLayout:
    """How a stage's output holds its feature map.

    Attributes:
        channels_last: The output is ``(N, H, W, C)`` (Swin, and the families whose model
            says ``output_fmt = "NHWC"``); the other fields do not apply.
        prefix: Tokens before the patch tokens of a ``(N, prefix + H·W, C)`` output: the
            class token, then register or distillation tokens.
        cls: The first prefix token is a class token (its statistics are logged).
        grid: ``(rows, columns)`` of the patch grid, for a model of one input size.
        stride: ``(rows, columns)`` of input pixels per token where the grid follows the
            input's size (a model that takes any size): it is the input's size over
            ``stride``, rounded as ``rounding`` says. :meth:`at` gives the layout of one
            input; ``grid`` is then left out.
        rounding: How a model with a ``stride`` treats a size that the stride does not
            divide: ``"up"``, it pads its input to whole patches and rounds odd sizes up
            when it merges them (Hugging Face Swin, timm's ``dynamic_img_pad``, a
            "same"-padded convolutional backbone); ``"down"``, its patch embedding (a
            strided convolution) leaves the remainder out (ViT, DINOv2).
    """

    channels_last: bool = False
    prefix: int = 0
    cls: bool = False
    grid: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    rounding: str = "up"

    def __post_init__(self) -> None:
        if isinstance(self.prefix, bool) or not isinstance(self.prefix, int) or self.prefix < 0:
            raise ValueError(f"prefix must be an int >= 0 (tokens before the patches), "
                             f"got {self.prefix!r}")  # fmt: skip
        if self.cls and self.prefix < 1:
            raise ValueError("cls=True needs prefix >= 1: the class token is a prefix token")
        if self.grid is not None:
            grid = tuple(self.grid)
            if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
                raise ValueError(f"grid must be (rows, columns) of ints > 0, got {self.grid!r}")
            object.__setattr__(self, "grid", grid)
        if self.stride is not None:
            stride = tuple(self.stride)
            if len(stride) != 2 or not all(isinstance(s, int) and s > 0 for s in stride):
                raise ValueError(f"stride must be (rows, columns) of ints > 0, got {self.stride!r}")
            if self.grid is not None or self.channels_last:
                raise ValueError("stride gives the grid of each input: leave out grid "
                                 "and channels_last")  # fmt: skip
            object.__setattr__(self, "stride", stride)
        if self.rounding not in ("up", "down"):
            raise ValueError(f"rounding must be 'up' or 'down', got {self.rounding!r}")

    def at(self, size: tuple[int, int]) -> TokenLayout:
        """This layout for an input of ``size`` ``(rows, columns)``: the grid from
        :attr:`stride`, rounded as :attr:`rounding` says; the layout itself when it has no
        stride.

        Example:
            >>> TokenLayout(stride=(4, 4)).at((30, 64)).grid
            (8, 16)
            >>> TokenLayout(stride=(4, 4), rounding="down").at((30, 64)).grid
            (7, 16)
        """
        if self.stride is None:
            return self
        if self.rounding == "up":
            rows, cols = (-(-int(n) // s) for n, s in zip(size, self.stride, strict=True))
        else:
            rows, cols = (int(n) // s for n, s in zip(size, self.stride, strict=True))
        return replace(self, grid=(rows, cols), stride=None)


@dataclass(frozen=True)
class Split:
    """A token stage's output, split by :func:`split`."""

    map: torch.Tensor | None
    """``(N, C, H, W)``, a view of the output; ``None`` when it holds no grid."""
    cls: torch.Tensor | None = None
    """``(N, C)``: the class token, a view; ``None`` when the model has none."""
    problem: str = ""
    """Why there is no map (names the shape)."""


def split(t: torch.Tensor, layout: TokenLayout) -> Split:
    """The map and the class token of a stage output ``t`` laid out as ``layout`` says.

    Register and other prefix tokens are left out; patch tokens become a ``(N, C, H, W)``
    map, row-major as the model's patch embedding flattens them. No copy is made.

    Example:
        >>> import torch
        >>> tokens = torch.arange(2 * 7 * 3.0).reshape(2, 7, 3)  # class token + 2x3 patches
        >>> parts = split(tokens, TokenLayout(prefix=1, cls=True, grid=(2, 3)))
        >>> tuple(parts.map.shape), bool((parts.map[0, :, 1, 2] == tokens[0, 6]).all())
        ((2, 3, 2, 3), True)
    """
    shape = tuple(t.shape)
    if layout.channels_last:
        if t.dim() != 4:
            return Split(None, problem=f"its output of shape {shape} is not (N, H, W, C)")
        return Split(t.permute(0, 3, 1, 2))
    if t.dim() != 3 or t.shape[1] < layout.prefix:
        return Split(None, problem=f"its output of shape {shape} is not (N, tokens, C)")
    cls = t[:, 0] if layout.cls else None
    patches = t[:, layout.prefix :]
    grid = patch_grid(patches.shape[1], layout)
    if grid is None:
        return Split(None, cls, problem=(
            f"its output of shape {shape} has {patches.shape[1]} patch tokens after "
            f"{layout.prefix} class and register tokens, which make {_expected(layout)}"
        ))  # fmt: skip
    return Split(patches.unflatten(1, grid).permute(0, 3, 1, 2), cls)


def patch_grid(n: int, layout: TokenLayout) -> tuple[int, int] | None:
    """``(rows, columns)`` of ``n`` patch tokens: the layout's grid when they fill it;
    ``None`` when they do not (a shape is never guessed)."""
    if layout.grid is not None and layout.grid[0] * layout.grid[1] == n:
        return layout.grid
    return None


def _expected(layout: TokenLayout) -> str:
    if layout.stride is not None:
        return "no grid: the model's input size, which gives it, was not seen"
    return f"not the {layout.grid[0]}x{layout.grid[1]} patch grid" if layout.grid else "no grid"


def as_map(t: torch.Tensor, layout: TokenLayout | None) -> torch.Tensor | None:
    """``t`` as a ``(N, C, H, W)`` map: converted when ``layout`` is given (activations and
    their gradients alike), else as it is when 4-D; ``None`` when it holds none."""
    if layout is None:
        return t if t.dim() == 4 else None
    return split(t, layout).map
