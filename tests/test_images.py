"""The one image reader: the tensor a plain module or a YOLO model receives, exactly."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tbfeat import FeatureLogger
from tbfeat.images import load_image

RNG = np.random.default_rng(0)


class Recorder(nn.Module):
    """A plain module that keeps the inputs it is given."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.conv(x)


def plain_input(tmp_path, image):
    model = Recorder()
    logger = FeatureLogger(model, logdir=tmp_path, stages=["conv"], cam=None)
    logger.log(image, step=0)
    logger.close()
    (x,) = model.seen
    return x[0].numpy()


def yolo_input(tmp_path, image, imgsz=64):
    YOLO = pytest.importorskip("ultralytics").YOLO
    yolo = YOLO("yolov8n.yaml")
    seen = []
    yolo.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    logger = FeatureLogger(yolo, logdir=tmp_path, stages=[0], imgsz=imgsz, cam=None)
    logger.log(image, step=0)
    logger.close()
    assert seen and all(torch.equal(s, seen[0]) for s in seen)
    return seen[0][0].numpy()


def numpy_letterbox(rgb: np.ndarray, imgsz: int) -> np.ndarray:
    """A letterbox that needs no resize: the image centred on gray 114, as (3, H, W)."""
    h, w, _ = rgb.shape
    top, left = (imgsz - h) // 2, (imgsz - w) // 2
    out = np.full((imgsz, imgsz, 3), 114, np.float64)
    out[top : top + h, left : left + w] = rgb
    return out.transpose(2, 0, 1)


def test_an_rgb_array_reaches_a_plain_module_as_rgb_over_255(tmp_path):
    arr = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    x = plain_input(tmp_path, arr)
    np.testing.assert_allclose(x, arr.transpose(2, 0, 1) / 255, rtol=0, atol=1e-7)


def test_a_uint16_array_reaches_a_plain_module_over_65535(tmp_path):
    arr = RNG.integers(0, 65536, (4, 7, 3), dtype=np.uint16)
    x = plain_input(tmp_path, arr)
    np.testing.assert_allclose(x, arr.transpose(2, 0, 1) / 65535, rtol=0, atol=1e-7)


def test_pil_images_reach_a_plain_module_as_rgb(tmp_path):
    arr = RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    x = plain_input(tmp_path / "rgb", Image.fromarray(arr))
    np.testing.assert_allclose(x, arr.transpose(2, 0, 1) / 255, rtol=0, atol=1e-7)
    deep = RNG.integers(0, 65536, (5, 6), dtype=np.uint16)
    x = plain_input(tmp_path / "deep", Image.fromarray(deep))  # mode I;16: gray
    np.testing.assert_allclose(x, np.stack([deep / 65535] * 3), rtol=0, atol=1e-7)


def test_a_bgr_array_reaches_a_yolo_model_reversed_and_letterboxed(tmp_path):
    arr = RNG.integers(0, 256, (32, 64, 3), dtype=np.uint8)  # BGR, as YOLO.predict takes it
    x = yolo_input(tmp_path, arr)
    expect = numpy_letterbox(arr[:, :, ::-1], 64) / 255
    np.testing.assert_allclose(x, expect, rtol=0, atol=1e-7)
    assert (x[:, :16] == np.float32(114 / 255)).all() and (x[:, 48:] == x[0, 0, 0]).all()


def test_a_uint16_array_reaches_a_yolo_model_at_8_bits(tmp_path):
    arr = RNG.integers(0, 65536, (48, 64, 3), dtype=np.uint16)
    x = yolo_input(tmp_path, arr)
    eight_bit = np.round(arr[:, :, ::-1] / 65535 * 255)  # Ultralytics letterboxes at 8 bits
    np.testing.assert_allclose(x, numpy_letterbox(eight_bit, 64) / 255, rtol=0, atol=1e-7)


def test_pil_images_reach_a_yolo_model_as_rgb(tmp_path):
    arr = RNG.integers(0, 256, (64, 32, 3), dtype=np.uint8)
    x = yolo_input(tmp_path / "rgb", Image.fromarray(arr))
    np.testing.assert_allclose(x, numpy_letterbox(arr, 64) / 255, rtol=0, atol=1e-7)
    deep = (RNG.integers(0, 256, (64, 64)) * 257).astype(np.uint16)  # 8-bit values, 16-bit
    x = yolo_input(tmp_path / "deep", Image.fromarray(deep))
    np.testing.assert_allclose(x, np.stack([deep / 65535] * 3), rtol=0, atol=1e-7)


def test_files_are_upright_for_yolo_as_ultralytics_reads_them(tmp_path):
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.new("RGB", (64, 32), (200, 10, 10)).save(path, exif=exif, quality=100)
    assert tuple(load_image(path).shape) == (3, 32, 64)
    upright = load_image(path, exif_orientation=True)
    assert tuple(upright.shape) == (3, 64, 32) and upright[0].mean() > 0.7
    x = yolo_input(tmp_path, path)  # upright: padded left and right, not top and bottom
    assert (x[:, :, :16] == np.float32(114 / 255)).all() and x[0, :, 16:48].mean() > 0.7


def test_channel_order_must_be_rgb_or_bgr():
    with pytest.raises(ValueError, match="channel_order must be 'RGB' or 'BGR', got 'BRG'"):
        load_image(np.zeros((2, 2, 3), np.uint8), channel_order="BRG")
