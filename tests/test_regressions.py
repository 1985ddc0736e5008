"""Regression tests for problems a review found: each failed before its fix."""

import threading

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from tbfeat import FeatureLogger, feature_grid
from tbfeat.integrations.torchvision import build, load_checkpoint
from tbfeat.render import select_channels
from tbfeat.stats import RunningStats

from .helpers import read_events

ultralytics = pytest.importorskip("ultralytics")
from ultralytics import YOLO  # noqa: E402
from ultralytics.utils import ASSETS  # noqa: E402

from tbfeat.synthetic import make_shapes_dataset  # noqa: E402

BUS = str(ASSETS / "bus.jpg")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("reg"), n_train=4, n_val=2, imgsz=64)


def train_args(tmp_path, data, **kw):
    return dict(
        data=str(data),
        epochs=1,
        imgsz=64,
        batch=2,
        workers=0,
        device="cpu",
        plots=False,
        project=str(tmp_path),
        name="t",
        amp=False,
        verbose=False,
        **kw,
    )


def test_a_stream_predict_cut_short_does_not_stop_training_from_logging(tmp_path, shapes):
    yolo = YOLO("yolov8n.yaml")
    with FeatureLogger(yolo, logdir=tmp_path / "ev", stages=[9]):
        for _ in yolo.predict([BUS, BUS], imgsz=64, stream=True, verbose=False):
            break
        yolo.train(**train_args(tmp_path, shapes))
    steps = [e.step for e in read_events(tmp_path / "ev").Scalars("stats/09_SPPF/mean")]
    assert steps == [0, 1]  # the half predict at step 0, then epoch 1
    assert all(not m._forward_hooks for m in yolo.model.modules())


def test_val_still_logs_after_a_failed_train(tmp_path, shapes):
    yolo = YOLO("yolov8n.yaml")
    with FeatureLogger(yolo, logdir=tmp_path / "ev", stages=[9]):
        with pytest.raises(Exception):  # noqa: B017 - Ultralytics' own error type
            yolo.train(**train_args(tmp_path, tmp_path / "missing.yaml"))
        yolo.val(
            data=str(shapes),
            imgsz=64,
            batch=2,
            device="cpu",
            plots=False,
            verbose=False,
            project=str(tmp_path),
            name="v",
        )
    assert len(read_events(tmp_path / "ev").Tags()["images"]) == 2


def test_log_after_train_uses_the_trained_model(tmp_path, shapes):
    yolo = YOLO("yolov8n.yaml")
    logger = FeatureLogger(yolo, logdir=tmp_path / "a", stages=[9], imgsz=64)
    with logger:
        yolo.train(**train_args(tmp_path, shapes))
    logger.log(BUS, step=7)
    logger.close()
    fresh = FeatureLogger(yolo, logdir=tmp_path / "c", stages=[9], imgsz=64)
    fresh.log(BUS, step=7)
    fresh.close()
    means = read_events(tmp_path / "a").Scalars("stats/09_SPPF/mean")
    assert [e.step for e in means] == [1, 7]  # the epoch's probe, then log()
    a = means[-1].value
    b = read_events(tmp_path / "c").Scalars("stats/09_SPPF/mean")[0].value
    assert a == pytest.approx(b, rel=1e-6)


def test_duplicate_probe_names_are_made_unique(tmp_path):
    yolo = YOLO("yolov8n.yaml")
    logger = FeatureLogger(yolo, logdir=tmp_path, stages=[0], imgsz=64)
    logger.log([BUS, BUS], step=1)
    logger.close()
    assert sorted(read_events(tmp_path).Tags()["images"]) == [
        "cam/00_Conv/bus",
        "cam/00_Conv/bus_1",
        "features/00_Conv/bus",
        "features/00_Conv/bus_1",
        "input/bus",
        "input/bus_1",
    ]


def test_bad_probe_images_for_yolo_fail_clearly_and_early(tmp_path):
    yolo = YOLO("yolov8n.yaml")
    with pytest.raises(FileNotFoundError, match="does/not/exist.jpg"):
        FeatureLogger(yolo, images=["does/not/exist.jpg"])
    logger = FeatureLogger(yolo, logdir=tmp_path, imgsz=64)  # not runs/ of the checkout
    with pytest.raises(ValueError, match=r"RGB \(3, H, W\)"):
        logger.log(torch.rand(1, 64, 64))
    with pytest.raises(ValueError, match="C in 1, 3, 4"):
        logger.log(np.zeros((2, 64, 64, 3), np.uint8))
    # a (3, H, W) tensor of any size is letterboxed like a file
    logger.log(torch.rand(3, 100, 70), step=0)
    logger.close()


def test_loggers_dropped_without_close_do_not_pile_up_threads(tmp_path):
    import gc

    model = nn.Sequential(nn.Conv2d(3, 2, 1))
    FeatureLogger(model, logdir=tmp_path / "warm").log(torch.rand(1, 3, 4, 4))  # imports
    gc.collect()
    before = threading.active_count()
    for epoch in range(5):
        with FeatureLogger(model, logdir=tmp_path / "run", step=epoch):
            model(torch.rand(1, 3, 4, 4))
    gc.collect()
    assert threading.active_count() <= before
    acc = read_events(tmp_path / "run")  # one event file per logger, read in name order
    assert sorted(e.step for e in acc.Images("features/00_Conv2d/0")) == list(range(5))


def test_close_inside_a_block_removes_the_callbacks(tmp_path):
    yolo = YOLO("yolov8n.yaml")

    def ours(logger):
        return sum(
            getattr(getattr(f, "__self__", None), "logger", None) is logger
            for fns in yolo.callbacks.values()
            for f in fns
        )

    with FeatureLogger(yolo, logdir=tmp_path) as logger:
        assert ours(logger) == 13 and {"predict", "train"} <= set(vars(yolo))
        logger.close()
        assert ours(logger) == 0 and not {"predict", "train"} & set(vars(yolo))


def test_deep_stages_number_under_their_nearest_listed_ancestor():
    model = build("fasterrcnn_resnet50_fpn", weights_backbone=None)
    keys = [
        s.key
        for s in FeatureLogger(
            model, stages=["fpn_0", "backbone.body.layer1.0.conv1", "stem"]
        ).stages
    ]
    assert keys == ["00_stem", "01.00_backbone.body.layer1.0.conv1", "05_fpn_0"]


def test_lightning_callback_checks_options_at_construction():
    pytest.importorskip("lightning")
    from tbfeat.lightning import FeatureLoggerCallback

    with pytest.raises(TypeError, match="unknown option 'max_chanels'"):
        FeatureLoggerCallback(images=torch.rand(1, 3, 8, 8), max_chanels=4)
    with pytest.raises(ValueError, match="every must be >= 1"):
        FeatureLoggerCallback(images=torch.rand(1, 3, 8, 8), every=0)


@pytest.mark.parametrize("arch", ["ssd300_vgg16", "densenet121", "vit_b_16", "squeezenet1_0"])
def test_num_classes_is_inferred_from_more_heads(arch, tmp_path):
    kwargs = {"weights_backbone": None} if arch.startswith("ssd") else {}
    model = build(arch, num_classes=5, **kwargs)
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    loaded = load_checkpoint(path, arch).model
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_a_head_only_mismatch_suggests_num_classes(tmp_path):
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="pass num_classes="):
        load_checkpoint(path, "resnet18", num_classes=7)


def test_large_integers_and_float64_extremes_keep_their_statistics():
    rs = RunningStats()
    rs.update(torch.tensor([2**40 + 1, 2**40 + 3]))
    s = rs.summary()
    assert s.mean == 2**40 + 2 and s.std == 1.0
    rs = RunningStats(bins=4)
    rs.update(torch.tensor([1e300, -1e300, 0.0], dtype=torch.float64))
    s = rs.summary()
    assert s.max == 1e300 and int(s.hist_counts.sum()) == 3


def test_grids_near_the_float32_limit_and_channel_checks():
    grid = feature_grid(torch.tensor([[[[-3e38, 0.0, 3e38]]]]))
    assert grid[0, 0].tolist() == [0, 126, 253]
    with pytest.raises(ValueError, match=r"indices in 0\.\.2"):
        feature_grid(torch.rand(1, 3, 2, 2), [5])
    x = torch.zeros(1, 3, 1, 1)
    x[0, :, 0, 0] = torch.tensor([1.0, 3.0, 2.0])
    assert select_channels(x, 3, "strongest").tolist() == [1, 2, 0]


def test_compiled_models_show_their_real_stages():
    model = torch.compile(torchvision.models.resnet18(weights=None))
    assert FeatureLogger(model).stages[4].key == "04_layer1"
