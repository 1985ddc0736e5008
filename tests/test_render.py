"""Channel grids: pixels compared with values computed independently with numpy/matplotlib."""

import io

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from tbfeat import colorize, feature_grid
from tbfeat.pictures import (
    LEVELS,
    NONFINITE_INDEX,
    NONFINITE_RGB,
    SEPARATOR_INDEX,
    SEPARATOR_RGB,
    encode_png,
)
from tbfeat.render import select_channels


def expected_rgb(values: np.ndarray, lo: float, hi: float, cmap: str = "viridis") -> np.ndarray:
    """Colormap of values normalized to [0, 1], quantized to the documented LEVELS steps."""
    q = np.round((values - lo) / (hi - lo) * (LEVELS - 1))
    rgba = matplotlib.colormaps[cmap](q / (LEVELS - 1))
    return np.round(rgba[..., :3] * 255).astype(np.uint8)


def tile(rgb: np.ndarray, row: int, col: int, h: int, w: int) -> np.ndarray:
    return rgb[row * (h + 1) : row * (h + 1) + h, col * (w + 1) : col * (w + 1) + w]


def test_tile_pixels_are_the_colormap_of_per_channel_normalized_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 6, 7)).astype(np.float32)
    grid = feature_grid(torch.from_numpy(x), ncols=8)
    assert grid.shape == (1, 6, 3 * 8 - 1) and grid.dtype == torch.uint8
    rgb = colorize(grid[0])
    for c in range(3):
        ch = x[0, c]
        np.testing.assert_array_equal(tile(rgb, 0, c, 6, 7), expected_rgb(ch, ch.min(), ch.max()))
    # separators between tiles
    assert (rgb[:, 7] == SEPARATOR_RGB).all() and (rgb[:, 15] == SEPARATOR_RGB).all()


def test_png_decodes_to_the_same_pixels_with_another_cmap():
    x = torch.linspace(-3, 5, 2 * 5 * 5).reshape(1, 2, 5, 5)
    grid = feature_grid(x)[0].numpy()
    png = encode_png(grid, "magma")
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "P"
        decoded = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(decoded, colorize(grid, "magma"))
    ch = x[0, 1].numpy()
    np.testing.assert_array_equal(
        tile(decoded, 0, 1, 5, 5), expected_rgb(ch, ch.min(), ch.max(), "magma")
    )


def test_grid_layout_rows_separators_and_empty_cells():
    x = torch.rand(2, 10, 3, 4)
    grid = feature_grid(x, ncols=8)
    assert grid.shape == (2, 2 * 4 - 1, 8 * 5 - 1)
    # row 1 holds channels 8, 9; the rest of that row is separator colour
    assert (grid[:, 4:, 2 * 5 :] == SEPARATOR_INDEX).all()
    assert (grid[:, 3, :] == SEPARATOR_INDEX).all()
    # each real tile spans the full colour range (per-channel normalization)
    for n in range(2):
        for c in range(10):
            r, k = divmod(c, 8)
            t = grid[n, r * 4 : r * 4 + 3, k * 5 : k * 5 + 4]
            assert int(t.min()) == 0 and int(t.max()) == LEVELS - 1


def test_large_maps_are_area_pooled_to_the_tile_size():
    rng = np.random.default_rng(1)
    x = rng.random((1, 1, 256, 192)).astype(np.float32)
    grid = feature_grid(torch.from_numpy(x), tile=128)
    assert grid.shape == (1, 128, 96)
    pooled = x[0, 0].reshape(128, 2, 96, 2).mean(axis=(1, 3))
    q = np.round((pooled - pooled.min()) / (pooled.max() - pooled.min()) * (LEVELS - 1))
    diff = np.abs(grid[0].numpy().astype(int) - q.astype(int))
    assert diff.max() <= 1  # float32 summation order may flip a rounding
    assert (diff == 0).mean() > 0.99


def test_stage_normalization_uses_one_scale_for_all_tiles():
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    x[0, 1] = torch.tensor([[0.0, 2.0], [1.0, 0.5]])
    per_stage = feature_grid(x, normalize="stage")[0]
    per_channel = feature_grid(x, normalize="channel")[0]
    values = x[0].numpy()
    expect = np.round(values / 2.0 * (LEVELS - 1))
    np.testing.assert_array_equal(per_stage[:, :2].numpy(), expect[0])
    np.testing.assert_array_equal(per_stage[:, 3:].numpy(), expect[1])
    assert int(per_channel[:, :2].max()) == LEVELS - 1


def test_nonfinite_pixels_get_the_marker_and_do_not_spoil_the_scale():
    x = torch.tensor([[[[0.0, 1.0], [float("nan"), float("inf")]]]])
    grid = feature_grid(x)[0]
    assert grid.tolist() == [[0, LEVELS - 1], [NONFINITE_INDEX, NONFINITE_INDEX]]
    assert tuple(colorize(grid)[1, 0]) == NONFINITE_RGB


def test_constant_and_zero_channels_do_not_divide_by_zero():
    x = torch.zeros(1, 2, 3, 3)
    x[0, 1] = 7.0
    grid = feature_grid(x)
    assert (grid[0, :, :3] == 0).all() and (grid[0, :, 4:] == 0).all()


def test_caller_tensor_is_not_modified_and_grad_is_not_kept():
    x = torch.randn(1, 4, 300, 300, requires_grad=True)
    before = x.detach().clone()
    grid = feature_grid(x, tile=64)
    assert torch.equal(x.detach(), before)
    assert not grid.requires_grad and grid.grad_fn is None


def test_three_dim_input_and_explicit_channels():
    x = torch.arange(4 * 2 * 2, dtype=torch.float32).reshape(4, 2, 2)
    grid = feature_grid(x, channels=[3, 1])
    assert grid.shape == (2, 5)
    assert torch.equal(grid[:, :2], feature_grid(x[3:4])[:, :2])


def test_bad_input_raises_clear_errors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        feature_grid(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="3 .* or 4 .* dims"):
        feature_grid(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="normalize"):
        feature_grid(torch.zeros(1, 1, 2, 2), normalize="global")
    with pytest.raises(TypeError, match="uint8"):
        colorize(np.zeros((2, 2), dtype=np.float32))


def test_strongest_channels_are_ranked_by_mean():
    x = torch.zeros(2, 5, 2, 2)
    for c, v in enumerate([0.1, 3.0, -1.0, 2.0, 0.5]):
        x[:, c] = v
    assert select_channels(x, 3, "strongest").tolist() == [1, 3, 4]
    assert select_channels(x, 3, "first").tolist() == [0, 1, 2]


def test_png_from_isal_and_from_zlib_decode_to_the_same_pixels(monkeypatch):
    import zlib

    import tbfeat.pictures as render

    rng = np.random.default_rng(0)
    grid = rng.integers(0, 256, (37, 129), dtype=np.uint8)
    grid[:, 40:90] = 7  # runs, as in separators and flat tiles
    fast = encode_png(grid, "viridis")
    monkeypatch.setattr(render, "_deflate", lambda: zlib.compress)
    slow = encode_png(grid, "viridis")
    for png in (fast, slow):
        with Image.open(io.BytesIO(png)) as im:
            im.verify()  # chunk CRCs and structure
        with Image.open(io.BytesIO(png)) as im:
            assert im.mode == "P" and im.size == (129, 37)
            np.testing.assert_array_equal(np.asarray(im), grid)
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), colorize(grid))


def test_a_stage_sized_map_is_drawn_over_the_whole_image():
    from tbfeat.render import cam_overlay

    image, cam = torch.rand(3, 4, 6), torch.tensor([[0.0, 1.0, 0.5], [0.25, 0.75, 1.0]])
    out = cam_overlay(image, cam, alpha=1.0)
    lut = np.rint(matplotlib.colormaps["inferno"](np.rint(cam.numpy() * 255) / 255)[..., :3] * 255)
    # a 2x upsample keeps the corners' values; the rest lies between its neighbours
    for (y, x), (i, j) in (((0, 0), (0, 0)), ((0, 5), (0, 2)), ((3, 0), (1, 0)), ((3, 5), (1, 2))):
        assert np.abs(out[y, x].astype(int) - lut[i, j]).max() <= 1
    assert out.shape == (4, 6, 3)


def test_cam_overlay_blends_the_colour_mapped_map_over_the_image():
    from tbfeat.render import cam_overlay

    g = torch.Generator().manual_seed(0)
    image, cam = torch.rand(3, 6, 7, generator=g), torch.rand(6, 7, generator=g)
    image_before, cam_before = image.clone(), cam.clone()
    out = cam_overlay(image, cam, cmap="magma", alpha=0.4)
    # independently: matplotlib's colour at the map's 256-level value, then the blend
    levels = np.rint(cam.numpy() * 255) / 255
    colour = np.rint(matplotlib.colormaps["magma"](levels)[..., :3] * 255)
    expected = np.rint(0.6 * image.permute(1, 2, 0).numpy() * 255 + 0.4 * colour)
    assert out.dtype == np.uint8 and out.shape == (6, 7, 3)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    assert torch.equal(image, image_before) and torch.equal(cam, cam_before)
    assert np.array_equal(cam_overlay(image, cam, alpha=0.0), np.rint(image.permute(1, 2, 0)
                          .numpy() * 255).astype(np.uint8))  # fmt: skip
    with pytest.raises(ValueError, match=r"cam must be an \(h, w\) tensor, got \(6, 7, 1\)"):
        cam_overlay(image, cam[..., None])
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 2"):
        cam_overlay(image, cam, alpha=2)
    with pytest.raises(ValueError, match=r"cam must hold values in \[0, 1\]"):
        cam_overlay(image, cam * 3)
