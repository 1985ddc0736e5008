"""Suite-wide fixtures."""

import ctypes
import ctypes.util
import gc
import os
from pathlib import Path

import pytest

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


COLLECT_ABOVE = 1536 * 2**20
"""Resident bytes above which a test's end also collects cyclic garbage (a full
``gc.collect()`` costs about 0.2 s once torch, Ultralytics and Lightning are imported)."""


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """After each test, hand the memory its models freed back to the system.

    Big models (YOLOv3, VGG, ViT) come and go from test to test; without this, glibc keeps
    their freed heap and the suite's resident peak stacks up past 3 GB. Models that sit in
    reference cycles (a trainer and its callbacks) are collected once the process holds
    more than :data:`COLLECT_ABOVE`.
    """
    yield
    if _resident_bytes() > COLLECT_ABOVE:
        gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


@pytest.fixture(scope="session")
def yolo_weights(tmp_path_factory):
    """epoch0.pt and epoch1.pt (and last.pt, best.pt) from a real 2-epoch Ultralytics
    training, shared by the tests that read them (none writes there)."""
    yolo_cls = pytest.importorskip("ultralytics").YOLO
    from tbfeat.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("yolo")
    data = make_shapes_dataset(root / "data", n_train=8, n_val=2, imgsz=64)
    yolo = yolo_cls("yolov8n.yaml")
    yolo.train(
        data=str(data), epochs=2, imgsz=64, batch=4, workers=0, device="cpu", plots=False,
        project=str(root), name="t", save_period=1, amp=False, verbose=False,
    )  # fmt: skip
    weights = Path(yolo.trainer.save_dir) / "weights"
    assert {p.name for p in weights.iterdir()} >= {"epoch0.pt", "epoch1.pt", "last.pt", "best.pt"}
    return weights


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's, scripts/install_browser.sh), one per test module:
    skipped where it is not installed, a failure under ``CI``."""
    from .helpers import screenshots

    shots = screenshots()
    reason = shots.browser_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"headless Chromium is required in CI: {reason}")
        pytest.skip(reason)
    with shots.Browser() as b:
        yield b
