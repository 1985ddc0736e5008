"""Users' own models and checkpoints: a tutorial-style Faster R-CNN (its own classes, the
older key layout), loaded, swept and listed through the API and the CLI."""

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from tbfeat import FeatureLogger, list_stages, sweep
from tbfeat.checkpoints import find_checkpoints, model_factory
from tbfeat.integrations.torchvision import build, load_checkpoint

from . import tutorial_detector as tutorial
from .helpers import read_events
from .test_cli import BUS, assert_usage_error, tbfeat

MODEL = f"{Path(tutorial.__file__)}:resnet50_fpn"
FPN_KEYS = ["00_stem", "01_layer1", "02_layer2", "03_layer3", "04_layer4"] + [
    f"{5 + i:02d}_fpn_{k}" for i, k in enumerate(["0", "1", "2", "3", "pool"])
]


@pytest.fixture(scope="module")
def tutorial_checkpoints(tmp_path_factory):
    """``save_weights/resNetFpn-model-{epoch}.pth`` of two epochs, as the tutorial saves."""
    folder = tmp_path_factory.mktemp("save_weights")
    torch.manual_seed(0)
    model = tutorial.resnet50_fpn()
    tutorial.save_checkpoint(model, folder / "resNetFpn-model-0.pth", 0)
    with torch.no_grad():
        for p in model.backbone.fpn.parameters():
            p.mul_(1.5)
    tutorial.save_checkpoint(model, folder / "resNetFpn-model-1.pth", 1)
    return folder


@pytest.fixture(scope="module")
def square_image(tmp_path_factory):
    """320x320: both transforms (the tutorial's, torchvision's at imgsz 320) keep its size."""
    path = tmp_path_factory.mktemp("probe") / "square.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)).save(path)
    return path


def test_a_tutorial_detector_gets_the_stem_stages_and_each_fpn_level():
    assert [s.key for s in list_stages(tutorial.resnet50_fpn())] == FPN_KEYS
    torchvision_own = build("fasterrcnn_resnet50_fpn", weights_backbone=None)
    assert [s.key for s in list_stages(torchvision_own)] == FPN_KEYS
    # a backbone that returns one tensor: one stage per block
    mobile = [s.key for s in list_stages(tutorial.mobilenet_v2())]
    assert mobile[0] == "00_Conv2dNormActivation" and mobile[-1] == "18_Conv2dNormActivation"
    assert mobile[1:-1] == [f"{i:02d}_InvertedResidual" for i in range(1, 18)]


def test_an_fpn_that_adds_its_level_inline_logs_every_level(tmp_path):
    """As MMDetection's FPN does: ``F.max_pool2d(results[-1], 1, 2, 0)`` inside its
    ``forward``, no ``extra_blocks``. The levels are what the backbone returns."""
    import torch.nn.functional as F

    class InlineFPN(tutorial.FPN):
        def forward(self, x):
            results = self.pyramid(x)
            results.append(F.max_pool2d(results[-1], 1, 2, 0))  # no extra_blocks module
            return dict(zip([*x, "pool"], results, strict=True))

    model = tutorial.resnet50_fpn().eval()
    old = model.backbone.fpn
    model.backbone.fpn = InlineFPN([256, 512, 1024, 2048], 256)
    del model.backbone.fpn.extra_blocks  # none at all
    model.backbone.fpn.load_state_dict(old.state_dict())
    assert [s.key for s in list_stages(model)] == FPN_KEYS
    with FeatureLogger(model, logdir=tmp_path, max_channels=2, cam=None) as logger:
        logger.log([torch.rand(3, 64, 96)], step=1)
    (pool,) = read_events(tmp_path).Images("features/09_fpn_pool/0")
    (level3,) = read_events(tmp_path).Images("features/08_fpn_3/0")
    assert pool.height == (level3.height + 1) // 2  # every second row of level 3


def test_a_plain_module_with_a_transform_child_stays_a_plain_module(tmp_path):
    """``transform`` + ``backbone`` children alone make no detector: the transform must
    batch images into an ImageList, as a detector's does."""

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transform = T.Normalize([0.5] * 3, [0.5] * 3)
            self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.backbone(self.transform(x)).mean((2, 3)))

    model = Classifier()
    assert [s.key for s in list_stages(model)] == ["00_Normalize", "01_backbone", "02_Linear"]
    logger = FeatureLogger(model, logdir=tmp_path, preprocess=lambda t: t[:, :16, :16])
    out = logger.log(torch.rand(3, 32, 32), step=1)
    logger.close()
    assert out.shape == (1, 2)
    (grid,) = read_events(tmp_path).Images("features/01_backbone/0")
    assert grid.height == 14  # 8 channels of 14x14 (16 px, cropped, through a 3x3 conv)


def test_log_runs_the_transform_and_backbone_only(tmp_path):
    """The stages' probe runs the transform and backbone; the class activation maps
    then run the whole detector (the heads' scores are what they explain), and the
    tutorial's transform, which pads into views of its batch, gets them too."""
    model = tutorial.resnet50_fpn().eval()
    calls = []
    model.rpn.register_forward_hook(lambda *_: calls.append("rpn"))
    logger = FeatureLogger(model, logdir=tmp_path / "grids", max_channels=4, cam=None)
    out = logger.log([torch.rand(3, 96, 128)], step=1)
    logger.close()
    assert calls == [] and set(out) == {"0", "1", "2", "3", "pool"}  # the backbone's
    tags = read_events(tmp_path / "grids").Tags()["images"]
    assert sorted(tags) == sorted(f"features/{k}/0" for k in FPN_KEYS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "maps were not logged"
        with FeatureLogger(model, logdir=tmp_path / "maps", max_channels=4) as logger:
            logger.log([torch.rand(3, 96, 128)], step=1)
    assert calls == ["rpn"]
    maps = [t for t in read_events(tmp_path / "maps").Tags()["images"] if t.startswith("cam/")]
    assert sorted(maps) == sorted(f"cam/{k}/0" for k in FPN_KEYS)


def test_a_chosen_head_logs_activations_not_boxes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tbfeat")
    model = tutorial.resnet50_fpn().eval()
    image = [torch.rand(3, 96, 128)]
    with FeatureLogger(model, logdir=tmp_path / "a", stages=["roi_heads"]) as logger:
        logger.log(image, step=1)
    assert read_events(tmp_path / "a").Tags()["scalars"] == []  # only boxes, scores, labels
    assert "returns detections" in caplog.text and "predictions=True" in caplog.text
    with FeatureLogger(model, logdir=tmp_path / "b", stages=["roi_heads"], predictions=True):
        model(image)
    scalars = read_events(tmp_path / "b").Tags()["scalars"]
    assert "stats/10.00_roi_heads/0_0_boxes/mean" in scalars


def test_tutorial_checkpoints_load_into_torchvision_as_pytorch_loads_them(
    tutorial_checkpoints,
):
    path = tutorial_checkpoints / "resNetFpn-model-1.pth"
    saved = torch.load(path, weights_only=True)["model"]
    assert "backbone.fpn.inner_blocks.0.weight" in saved and "rpn.head.conv.weight" in saved
    loaded = load_checkpoint(path, tutorial.resnet50_fpn())
    ours, theirs = loaded.model, load_checkpoint(path, "fasterrcnn_resnet50_fpn").model
    assert loaded.epoch == 1 and set(loaded.extras) == {"optimizer", "lr_scheduler", "epoch"}
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        a, b = ours.backbone(x), theirs.backbone(x)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_that_does_not_fit_names_keys_and_shapes(tmp_path, tutorial_checkpoints):
    path = tutorial_checkpoints / "resNetFpn-model-0.pth"
    with pytest.raises(ValueError) as raised:
        load_checkpoint(path, "fasterrcnn_mobilenet_v3_large_fpn")
    for part in ("missing 322 keys, e.g. backbone.body.0.0.weight", "unexpected 283 keys",
                 "8 shapes differ", "Pass the model it was saved from"):  # fmt: skip
        assert part in str(raised.value)
    with pytest.raises(ValueError) as raised:  # 3 classes saved, 5 built
        load_checkpoint(path, "fasterrcnn_resnet50_fpn", num_classes=5)
    assert (
        "4 shapes differ, e.g. roi_heads.box_predictor.cls_score.weight: checkpoint (3, 1024), "
        "model (5, 1024)" in str(raised.value)
    )
    assert "pass num_classes=" in str(raised.value)
    with pytest.raises(ValueError) as raised:  # your own model: no builder to pass it to
        load_checkpoint(path, tutorial.resnet50_fpn(num_classes=5))
    assert "shapes differ" in str(raised.value) and "num_classes" not in str(raised.value)


def test_model_sources_name_what_is_wrong(tmp_path):
    assert type(model_factory(MODEL)()).__name__ == "FasterRCNN"
    assert type(model_factory("tests.tutorial_detector:mobilenet_v2")()).__name__ == "FasterRCNN"
    with pytest.raises(
        ValueError, match="has no function 'resnet50_fp' .*did you mean 'resnet50_fpn'"
    ):
        model_factory(MODEL[:-1])
    with pytest.raises(ValueError, match="model file not found"):
        model_factory("nowhere.py:build")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        model_factory("no_such_module:build")
    with pytest.raises(ValueError, match="must be 'MODULE:FUNCTION'"):
        model_factory("resnet50_fpn")
    with pytest.raises(TypeError, match="returned int, not an nn.Module"):
        model_factory(lambda: 3)()


def test_a_model_source_takes_literal_arguments_and_evaluates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = model_factory(f"{MODEL}(num_classes=5)")()
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    made = model_factory(f"{MODEL}( num_classes = 7 , )")()
    assert made.roi_heads.box_predictor.cls_score.out_features == 7
    attack = f"{MODEL}(num_classes=__import__('pathlib').Path('pwned').touch())"
    with pytest.raises(ValueError, match="num_classes=__import__.* is not a Python literal"):
        model_factory(attack)
    with pytest.raises(ValueError, match="give arguments as"):
        model_factory(f"{MODEL}(**{{'num_classes': 3}})")
    with pytest.raises(ValueError, match="do not parse"):
        model_factory(f"{MODEL}(num_classes=)")
    assert not (tmp_path / "pwned").exists()


def test_sweep_with_model_and_with_arch_log_the_same_maps(
    tmp_path, tutorial_checkpoints, square_image
):
    common = ["--images", square_image, "--imgsz", 320, "--stages", "stem", "fpn_0", "fpn_pool"]
    own = tbfeat("sweep", tutorial_checkpoints, "--model", MODEL, "--logdir", tmp_path / "own",
                 *common)  # fmt: skip
    assert own.returncode == 0, own.stderr[-2000:]
    assert "logged steps 1, 2 to" in own.stdout
    arch = tbfeat("sweep", tutorial_checkpoints, "--arch", "fasterrcnn_resnet50_fpn",
                  "--logdir", tmp_path / "arch", *common)  # fmt: skip
    assert arch.returncode == 0, arch.stderr[-2000:]
    a, b = read_events(tmp_path / "own"), read_events(tmp_path / "arch")
    assert a.Tags()["scalars"] == b.Tags()["scalars"]
    for tag in a.Tags()["scalars"]:
        assert [e.step for e in a.Scalars(tag)] == [e.step for e in b.Scalars(tag)] == [1, 2]
        values = [e.value for e in a.Scalars(tag)]
        assert values == pytest.approx([e.value for e in b.Scalars(tag)], rel=1e-4, abs=1e-6)
    # the FPN changed between the epochs, the stem did not
    fpn = [e.value for e in a.Scalars("stats/05_fpn_0/std")]
    stem = [e.value for e in a.Scalars("stats/00_stem/std")]
    assert fpn[1] > 1.5 * fpn[0] and stem[0] == stem[1]


def test_stages_lists_your_own_model_with_or_without_a_checkpoint(tutorial_checkpoints):
    built = tbfeat("stages", "--model", MODEL, "--imgsz", 128)
    assert built.returncode == 0, built.stderr[-2000:]
    for key in FPN_KEYS:
        assert key in built.stdout
    # --imgsz reaches the model's own transform (its min_size/max_size; 320 by default)
    assert "probe image 128x128, which the model sees as 1x3x128x128" in built.stdout
    assert "1x256x32x32" in built.stdout  # 05_fpn_0: a quarter of 128
    loaded = tbfeat(
        "stages", tutorial_checkpoints / "resNetFpn-model-1.pth", "--model", MODEL,
        "--imgsz", 128, "--stages", "backbone.body.layer1.2", "fpn_0",
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    rows = [line for line in loaded.stdout.splitlines() if "selected by" not in line]
    marked = [line.split()[2] for line in rows if line.startswith("*")]
    assert marked == ["05_fpn_0", "01.00_backbone.body.layer1.2"]
    assert "* selected by --stages" in loaded.stdout


def test_two_checkpoints_of_one_step_are_an_error_before_anything_is_logged(
    tmp_path, tutorial_checkpoints
):
    import shutil

    from tbfeat.sweep import SweepError

    folder = tmp_path / "save_weights"
    folder.mkdir()
    for name in ("resNetFpn-model-0.pth", "resNetFpn-model-1.pth"):
        shutil.copy(tutorial_checkpoints / name, folder / name)
    shutil.copy(tutorial_checkpoints / "resNetFpn-model-1.pth", folder / "mobile-model-1.pth")
    with pytest.raises(SweepError) as raised:  # both store epoch 1: step 2
        sweep([folder], model=MODEL, images=[BUS], logdir=tmp_path / "run")
    message = str(raised.value)
    assert "step 2: " in message and "mobile-model-1.pth" in message
    assert "resNetFpn-model-1.pth" in message and "step 1" not in message
    assert not (tmp_path / "run").exists()


def test_numbered_files_sort_naturally(tmp_path):
    for n in (10, 2, 1):
        (tmp_path / f"resNetFpn-model-{n}.pth").write_bytes(b"")
    assert [p.name for p in find_checkpoints([tmp_path])] == [
        "resNetFpn-model-1.pth", "resNetFpn-model-2.pth", "resNetFpn-model-10.pth",
    ]  # fmt: skip


def test_best_and_last_are_logged_at_their_epoch_or_skipped(tmp_path, yolo_weights):
    files = [yolo_weights / n for n in ("epoch0.pt", "epoch1.pt", "best.pt", "last.pt")]
    notes: list[str] = []
    result = sweep(files, images=[BUS], logdir=tmp_path / "all", imgsz=64, stages=[0],
                   warn=notes.append)  # fmt: skip
    assert result.logged == [1, 2]  # never an invented step 3 or 4
    assert notes == [
        f"{yolo_weights / 'best.pt'} stores no epoch (stripped at the end of training); skipped",
        f"{yolo_weights / 'last.pt'} stores no epoch (stripped at the end of training); skipped",
    ]
    alone = tbfeat("sweep", yolo_weights / "best.pt", "--images", BUS, "--logdir",
                   tmp_path / "best", "--imgsz", 64)  # fmt: skip
    assert "stores no epoch" in alone.stderr  # and nothing is left to log: an error
    assert_usage_error(alone, "no checkpoint to log", "save_period=1")
    assert not (tmp_path / "best").exists()


def test_a_folder_of_images_gives_its_first_max_images(tmp_path, tutorial_checkpoints):
    folder = tmp_path / "val"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (64, 48), (i * 20, 0, 0)).save(folder / f"img{i}.png")
    proc = tbfeat("sweep", tutorial_checkpoints / "resNetFpn-model-0.pth", "--model", MODEL,
                  "--images", folder, "--logdir", tmp_path / "run", "--stages", "stem",
                  "--imgsz", 64)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"using the first 8 of 12 images in {str(folder)!r}" in proc.stderr
    names = {t.rsplit("/", 1)[1] for t in read_events(tmp_path / "run").Tags()["images"]}
    assert names == {f"img{i}" for i in range(8)}


def test_bad_arguments_fail_before_the_logdir_exists(tmp_path, tutorial_checkpoints, yolo_weights):
    ckpt = tutorial_checkpoints / "resNetFpn-model-0.pth"
    logdir = tmp_path / "never"
    out = ["--images", BUS, "--logdir", logdir]
    assert_usage_error(tbfeat("sweep", ckpt, *out, "--model", MODEL, "--stages", "fpn_9"),
                       "unknown stage 'fpn_9'")  # fmt: skip
    assert_usage_error(tbfeat("sweep", ckpt, *out), "state-dict checkpoint", "--model")
    assert_usage_error(tbfeat("sweep", ckpt, *out, "--model", "nowhere.py:f"), "not found")
    assert_usage_error(
        tbfeat("sweep", yolo_weights / "epoch0.pt", *out, "--arch", "fasterrcnn_resnet50_fpn"),
        "is an Ultralytics checkpoint", "--arch",
    )  # fmt: skip
    data = tmp_path / "data.yaml"
    data.write_text("train: images/train\n")
    assert_usage_error(tbfeat("sweep", data, *out), "is a YAML file, not a checkpoint")
    assert not logdir.exists()
    # a failure at the first checkpoint keeps nothing, and says so
    truncated = tmp_path / "resNetFpn-model-3.pth"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    assert_usage_error(tbfeat("sweep", truncated, *out, "--model", MODEL), "no step is kept")
    assert not logdir.exists()
