"""Suite-wide fixtures."""

import ctypes
import ctypes.util
import gc

import pytest

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """After each test, hand the memory its models freed back to the system.

    Big models (YOLOv3, VGG, ViT) come and go from test to test; without this, glibc keeps
    their freed heap and the suite's resident peak stacks up past 3 GB.
    """
    yield
    gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
