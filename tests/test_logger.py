"""FeatureLogger end to end: events read back with TensorBoard's EventAccumulator."""

import warnings

import matplotlib
import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tbfeat import STAT_NAMES, FeatureLogger, LogOptions, list_stages
from tbfeat.integrations.torchvision import build
from tbfeat.pictures import LEVELS

from .helpers import decode, read_events


class Fixed(nn.Module):
    """Returns a known tensor, whatever the input."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, x):
        return self.value.expand(x.shape[0], *self.value.shape[1:]).clone()


class Multi(nn.Module):
    def forward(self, x):
        return (x, x * 2), {"p3": x[:, :2], "none": None}


class Head(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 4, 3, stride=2), nn.ReLU()),
        Head(),
    )


def test_known_output_gives_exact_pixels_and_statistics(tmp_path):
    rng = np.random.default_rng(0)
    value = np.maximum(rng.normal(size=(1, 3, 5, 6)), 0).astype(np.float32)
    model = nn.Sequential(Fixed(torch.from_numpy(value)))
    with FeatureLogger(model, logdir=tmp_path, step=7):
        model(torch.zeros(1, 3, 2, 2))

    acc = read_events(tmp_path)
    assert acc.Tags()["images"] == ["features/00_Fixed/0"]
    (image,) = acc.Images("features/00_Fixed/0")
    assert (image.step, image.width, image.height) == (7, 3 * 7 - 1, 5)
    rgb = decode(image)
    cmap = matplotlib.colormaps["viridis"]
    for c in range(3):
        ch = value[0, c].astype(np.float64)
        q = np.round((ch - ch.min()) / (ch.max() - ch.min()) * (LEVELS - 1)) / (LEVELS - 1)
        expect = np.round(cmap(q)[..., :3] * 255).astype(np.uint8)
        np.testing.assert_array_equal(rgb[:, c * 7 : c * 7 + 6], expect)

    a = value.astype(np.float64)
    expected = {
        "mean": a.mean(),
        "std": a.std(),
        "min": a.min(),
        "max": a.max(),
        "zero_fraction": (a == 0).mean(),
        "negative_fraction": 0.0,
        "nonfinite_count": 0.0,
    }
    assert sorted(t for t in acc.Tags()["scalars"]) == sorted(
        f"stats/00_Fixed/{n}" for n in STAT_NAMES
    )
    for name, want in expected.items():
        (ev,) = acc.Scalars(f"stats/00_Fixed/{name}")
        assert ev.step == 7
        assert ev.value == pytest.approx(want, rel=1e-5, abs=1e-6), name
    (hist,) = acc.Histograms("activations/00_Fixed")
    assert hist.step == 7 and hist.histogram_value.num == a.size
    assert sum(hist.histogram_value.bucket) == a.size
    assert hist.histogram_value.min == pytest.approx(a.min())


def test_same_tags_at_every_step_and_image_sizes(tmp_path):
    model = small_net()
    logger = FeatureLogger(model, logdir=tmp_path, max_channels=4)
    x = torch.rand(2, 3, 16, 16)
    for step in (1, 2, 3):
        logger.log(x, step=step)
    logger.close()
    acc = read_events(tmp_path)
    images = acc.Tags()["images"]
    keys = ("00_Conv2d", "01_BatchNorm2d", "02_ReLU", "03_3")
    assert sorted(images) == sorted([f"{kind}/{k}/{i}" for kind in ("cam", "features")
                                     for k in keys for i in (0, 1)]
                                    + ["input/0", "input/1"])  # fmt: skip
    for tag in images:
        events = acc.Images(tag)
        if tag.startswith("input/"):  # the 16x16 input, once: it did not change
            assert [(e.step, e.width, e.height) for e in events] == [(1, 16, 16)]
            continue
        assert [e.step for e in events] == [1, 2, 3]
        if tag.startswith("cam/"):  # each map at its stage's resolution
            side = 7 if tag.startswith("cam/03") else 16
            assert {(e.width, e.height) for e in events} == {(side, side)}
        elif tag.startswith("features/03"):  # 4 channels of 7x7
            assert {(e.width, e.height) for e in events} == {(4 * 8 - 1, 7)}
        else:  # 4 of 8 channels of 16x16
            assert {(e.width, e.height) for e in events} == {(4 * 17 - 1, 16)}
    # the 2-D head gets statistics and a histogram, never an image
    assert [e.step for e in acc.Scalars("stats/04_Head/mean")] == [1, 2, 3]
    assert "activations/04_Head" in acc.Tags()["histograms"]
    assert not any(t.startswith("features/04") for t in images)


def test_hooks_exist_only_inside_the_block_also_after_an_exception(tmp_path):
    model = small_net().train()
    logger = FeatureLogger(model, logdir=tmp_path)
    with logger:
        assert not no_hooks(model)
        model(torch.rand(1, 3, 8, 8))
    assert no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), logger.at(2):
        model(torch.rand(1, 3, 8, 8))
        raise RuntimeError("boom")
    assert no_hooks(model) and model.training
    # what was logged before the exception was flushed
    assert [e.step for e in read_events(tmp_path).Scalars("stats/00_Conv2d/mean")] == [0, 2]
    logger.close()
    logger.close()  # twice is fine
    assert no_hooks(model)


def test_log_restores_every_module_mode(tmp_path):
    model = small_net().train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    logger = FeatureLogger(model, logdir=tmp_path)
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    logger.log(torch.rand(1, 3, 8, 8), step=1)
    assert seen == [False, False]  # the probe, then its class activation maps
    assert model.training and model[0].training and not model[1].training
    assert len(model[0]._forward_hooks) == 1  # the user's hook stays, ours is gone
    logger.close()


def test_log_returns_the_model_output_unchanged(tmp_path):
    model = small_net().eval()
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        plain = model(x)
    logger = FeatureLogger(model, logdir=tmp_path)
    assert torch.equal(logger.log(x, step=0), plain)
    logger.close()


def test_resnet18_logs_one_grid_per_default_stage(tmp_path):
    model = torchvision.models.resnet18(weights=None)
    stages = list_stages(model)
    assert [s.key for s in stages] == [
        "00_Conv2d",
        "01_BatchNorm2d",
        "02_ReLU",
        "03_MaxPool2d",
        "04_layer1",
        "05_layer2",
        "06_layer3",
        "07_layer4",
        "08_AdaptiveAvgPool2d",
        "09_Linear",
    ]
    logger = FeatureLogger(model, logdir=tmp_path)
    logger.log(torch.rand(1, 3, 64, 64), step=3)
    logger.close()
    acc = read_events(tmp_path)
    assert sorted(acc.Tags()["images"]) == sorted(
        [f"{kind}/{s.key}/0" for kind in ("cam", "features") for s in stages[:-1]] + ["input/0"]
    )
    sizes = {t: (acc.Images(t)[0].width, acc.Images(t)[0].height) for t in acc.Tags()["images"]}
    assert sizes["features/07_layer4/0"] == (8 * 3 - 1, 4 * 3 - 1)  # 32 of 512 ch, 2x2 maps
    assert sizes["features/08_AdaptiveAvgPool2d/0"] == (8 * 2 - 1, 4 * 2 - 1)
    assert len(acc.Tags()["histograms"]) == len(stages)


def test_stage_selection_by_index_name_glob_type_and_deep_name(tmp_path):
    model = torchvision.models.resnet18(weights=None)

    def keys(spec):
        return [s.key for s in FeatureLogger(model, logdir=tmp_path, stages=spec).stages]

    assert keys([0, -1]) == ["00_Conv2d", "09_Linear"]
    assert keys("layer*") == ["04_layer1", "05_layer2", "06_layer3", "07_layer4"]
    assert keys(["layer4", "layer2"]) == ["05_layer2", "07_layer4"]
    assert keys("BatchNorm2d") == ["01_BatchNorm2d"]
    assert keys("layer1.0.conv1") == ["04.00_layer1.0.conv1"]
    assert keys("layer1.*.conv2") == ["04.00_layer1.0.conv2", "04.01_layer1.1.conv2"]
    # each deeper module its own number under its stage, in forward order, before it
    assert keys(["layer1", "layer1.1.conv1", "layer1.0.conv2", "conv1"]) == [
        "00_Conv2d", "04.00_layer1.0.conv2", "04.01_layer1.1.conv1", "04_layer1",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown stage 'layr3' \(did you mean 'layer3'\?\)"):
        FeatureLogger(model, stages=["layr3"])
    with pytest.raises(ValueError, match="out of range; allowed: 0..9"):
        FeatureLogger(model, stages=[10])
    with pytest.raises(TypeError, match="int index or a str"):
        FeatureLogger(model, stages=[1.5])
    with pytest.raises(ValueError, match="empty"):
        FeatureLogger(model, stages=[])


def test_multi_output_stages_get_one_grid_per_element(tmp_path, caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Multi())
    with caplog.at_level("INFO", logger="tbfeat"), FeatureLogger(model, logdir=tmp_path):
        model(torch.rand(1, 3, 6, 6))
    acc = read_events(tmp_path)
    assert acc.Tags()["images"] == [
        "features/00_Conv2d/0",
        "features/01_Multi/0_0/0",
        "features/01_Multi/0_1/0",
        "features/01_Multi/1_p3/0",
    ]
    assert acc.Images("features/01_Multi/1_p3/0")[0].width == 2 * 7 - 1
    assert "stats/01_Multi/0_1/mean" in acc.Tags()["scalars"]


def test_unloggable_outputs_are_skipped_and_noted_once(tmp_path, caplog):
    class Odd(nn.Module):
        def forward(self, x):
            return x.sum(dim=(1, 2, 3))  # 1-D

    class NoTensor(nn.Module):
        def forward(self, x):
            return "text"

    model = nn.Sequential(Odd(), NoTensor())
    with caplog.at_level("INFO", logger="tbfeat"), FeatureLogger(model, logdir=tmp_path):
        model(torch.rand(2, 3, 4, 4))
        model(torch.rand(2, 3, 4, 4))
    notes = [r.getMessage() for r in caplog.records]
    assert sum("00_Odd" in n for n in notes) == 1
    assert sum("01_NoTensor" in n for n in notes) == 1


def test_max_images_counts_across_the_forwards_of_a_step(tmp_path):
    model = nn.Sequential(nn.Identity())
    xs = [torch.full((2, 1, 3, 3), float(i)) + torch.arange(9.0).reshape(3, 3) for i in range(3)]
    with FeatureLogger(model, logdir=tmp_path, max_images=3, step=1):
        for x in xs:
            model(x)
    acc = read_events(tmp_path)
    assert acc.Tags()["images"] == [f"features/00_Identity/{i}" for i in range(3)]
    logged = torch.cat([xs[0], xs[1][:1]]).numpy()
    assert acc.Scalars("stats/00_Identity/mean")[0].value == pytest.approx(logged.mean())
    assert acc.Scalars("stats/00_Identity/std")[0].value == pytest.approx(logged.std(), rel=1e-5)
    assert acc.Histograms("activations/00_Identity")[0].histogram_value.num == logged.size


def test_image_names_come_from_files(tmp_path):
    from PIL import Image

    path = tmp_path / "street scene.png"
    Image.fromarray(np.full((10, 12, 3), 80, np.uint8)).save(path)
    gray = Image.fromarray(np.arange(120, dtype=np.uint8).reshape(10, 12))
    model = nn.Sequential(nn.Conv2d(3, 2, 1))
    logger = FeatureLogger(model, logdir=tmp_path / "run")
    logger.log([path, gray], step=0)
    logger.close()
    tags = read_events(tmp_path / "run").Tags()["images"]
    assert sorted(tags) == ["features/00_Conv2d/1", "features/00_Conv2d/street_scene"]


def test_strongest_channels_stay_fixed_after_the_first_step(tmp_path):
    from tbfeat import colorize, feature_grid

    weights = torch.tensor([0.0, 5.0, 1.0, 3.0])
    scale = nn.Conv2d(1, 4, 1, bias=False)
    model = nn.Sequential(scale)
    logger = FeatureLogger(
        model, logdir=tmp_path, max_channels=2, channels="strongest", normalize="stage"
    )
    x = torch.rand(1, 1, 4, 4) + 1
    with torch.no_grad():
        scale.weight.copy_(weights.view(4, 1, 1, 1))
        first_out = model(x)
    logger.log(x, step=0)
    with torch.no_grad():
        scale.weight.copy_(torch.tensor([9.0, 0.0, 8.0, 0.0]).view(4, 1, 1, 1))
    logger.log(x, step=1)
    logger.close()
    step0, step1 = read_events(tmp_path).Images("features/00_Conv2d/0")
    # step 0 shows channels 1 and 3 (the strongest), in that order
    expect = colorize(feature_grid(first_out, [1, 3], normalize="stage")[0])
    np.testing.assert_array_equal(decode(step0), expect)
    # at step 1 the same channels (1, 3) are shown, now zero everywhere: the grid is flat
    rgb = decode(step1)
    assert len(np.unique(rgb[:, :4].reshape(-1, 3), axis=0)) == 1


def test_a_writer_passed_in_is_flushed_not_closed_and_own_writer_is_closed(tmp_path):
    writer = SummaryWriter(tmp_path / "given")
    model = small_net()
    logger = FeatureLogger(model, writer=writer, stages=[0])
    logger.log(torch.rand(1, 3, 8, 8), step=1)
    logger.close()
    writer.add_scalar("after/close", 1.0, 0)  # still usable
    writer.close()
    acc = read_events(tmp_path / "given")
    assert "after/close" in acc.Tags()["scalars"] and "features/00_Conv2d/0" in acc.Tags()["images"]

    own = FeatureLogger(model, logdir=tmp_path / "own", stages=[0])
    assert not list((tmp_path / "own").glob("events.out.tfevents.*"))  # created lazily
    own.log(torch.rand(1, 3, 8, 8), step=1)
    sw = own.writer
    own.close()
    assert sw.file_writer is None  # SummaryWriter.close() drops its file writer


def test_changing_the_step_inside_a_block_ends_the_previous_step(tmp_path):
    model = nn.Sequential(nn.Identity())
    with FeatureLogger(model, logdir=tmp_path, step=1) as logger:
        model(torch.ones(1, 1, 2, 2))
        logger.step = 2
        model(torch.full((1, 1, 2, 2), 3.0))
    acc = read_events(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("stats/00_Identity/mean")] == [
        (1, 1.0),
        (2, 3.0),
    ]
    assert [e.step for e in acc.Images("features/00_Identity/0")] == [1, 2]


def test_only_rank_zero_hooks_and_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    model = small_net()
    logger = FeatureLogger(model, logdir=tmp_path / "r1")
    assert not logger.enabled
    with logger:
        assert no_hooks(model)
        model(torch.rand(1, 3, 8, 8))
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    assert logger.log(torch.rand(1, 3, 8, 8), step=1) is None
    assert calls == []  # returned at once: the model never ran
    logger.writer.add_scalar("loss", 1.0, 1)  # a stand-in: the same code runs on every rank
    with logger.writer as w:
        assert w.log_dir is None
    logger.add_scalars({"loss": 1.0}, step=1)
    logger.close()
    assert not (tmp_path / "r1").exists()


def test_a_failing_stage_warns_once_and_never_breaks_the_forward(tmp_path, monkeypatch):
    import tbfeat.recorder as core

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(core, "feature_tiles", broken)
    model = small_net().eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        plain = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FeatureLogger(model, logdir=tmp_path, stages=[0]), torch.no_grad():
            out1 = model(x)
            out2 = model(x)
    assert torch.equal(out1, plain) and torch.equal(out2, plain)
    messages = [str(w.message) for w in caught if "tbfeat" in str(w.message)]
    assert len(messages) == 1 and "00_Conv2d" in messages[0] and "render failed" in messages[0]
    # statistics of that stage were still written
    assert "stats/00_Conv2d/mean" in read_events(tmp_path).Tags()["scalars"]


def test_bad_arguments_raise_clear_errors():
    model = small_net()
    with pytest.raises(ValueError, match="max_channels must be >= 1, got 0"):
        FeatureLogger(model, max_channels=0)
    with pytest.raises(ValueError, match=r"unknown cmap 'virdis' \(did you mean 'viridis'\?\)"):
        FeatureLogger(model, cmap="virdis")
    with pytest.raises(
        TypeError, match=r"unknown option 'max_chanels' \(did you mean 'max_channels'"
    ):
        FeatureLogger(model, max_chanels=4)
    with pytest.raises(ValueError, match="normalize must be one of 'channel', 'stage'"):
        LogOptions(normalize="global")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        FeatureLogger("resnet18")
    with pytest.raises(TypeError, match="step must be an int"):
        FeatureLogger(model, step=1.0)
    logger = FeatureLogger(model)
    with pytest.raises(ValueError, match="inputs is empty"):
        logger.log([], step=0)
    with pytest.raises(
        ValueError, match=r"must be \(C, H, W\), or \(N, C, H, W\) for a batch, got shape \(5, 5\)"
    ):
        logger.log(torch.rand(5, 5), step=0)
    with pytest.raises(TypeError, match="dtype uint32|must be uint8, uint16 or float"):
        logger.log(np.zeros((4, 4, 3), dtype=np.uint32), step=0)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        logger.log("missing.jpg", step=0)


def test_repeated_image_names_get_the_first_free_suffix(tmp_path):
    from tbfeat.images import unique_names

    assert unique_names(["bus", "bus", "bus_1", "a"]) == ["bus", "bus_1", "bus_1_1", "a"]
    assert unique_names(["bus", "x"], taken=["bus", "bus_1"]) == ["bus_2", "x"]
    model = nn.Sequential(nn.Identity())
    logger = FeatureLogger(model, logdir=tmp_path)
    session = logger.begin()  # the integration API: name images as batches arrive
    session.add_names(["a b", "a_b"])
    session.add_names(["a/b"])
    assert session.names == ["a_b", "a_b_1", "a_b_2"]
    model(torch.rand(3, 1, 2, 2))
    logger.end()
    logger.close()
    assert read_events(tmp_path).Tags()["images"] == [
        f"features/00_Identity/{n}" for n in ("a_b", "a_b_1", "a_b_2")
    ]


def test_preprocess_prepares_probes_as_the_model_was_trained(tmp_path):
    """``weights.transforms()`` (resize, crop, ImageNet normalization) before the probe;
    without it the model gets the image as it is, in [0, 1]."""
    from torchvision.models import ResNet18_Weights

    model = torchvision.models.resnet18(weights=None).eval()
    transform = ResNet18_Weights.DEFAULT.transforms()
    image = torch.rand(3, 300, 400, generator=torch.Generator().manual_seed(0))
    for name, preprocess, x in (
        ("with", transform, transform(image)),
        ("without", None, image),
    ):
        logger = FeatureLogger(model, logdir=tmp_path / name, stages=[0], preprocess=preprocess)
        logger.log(image, step=1)
        logger.close()
        with torch.no_grad():
            expected = model.conv1(x[None]).double()
        (mean,) = read_events(tmp_path / name).Scalars("stats/00_Conv2d/mean")
        assert mean.value == pytest.approx(float(expected.mean()), rel=1e-4, abs=1e-6)
        (grid,) = read_events(tmp_path / name).Images("features/00_Conv2d/0")
        if preprocess is not None:  # cropped to 224: 112 px maps after conv1's stride 2
            assert grid.width == 8 * (112 + 1) - 1
    detector = build("fasterrcnn_mobilenet_v3_large_fpn", weights_backbone=None)
    with pytest.raises(ValueError, match="preprocess= is for plain modules and classifiers"):
        FeatureLogger(detector, preprocess=transform)
    with pytest.raises(TypeError, match="preprocess must be a function"):
        FeatureLogger(model, preprocess="imagenet")
    with pytest.raises(TypeError, match=r"must return one \(C, H, W\) tensor per image, got list"):
        FeatureLogger(model, preprocess=lambda t: [t]).log(image, step=1)


def test_stage_numbers_are_as_wide_as_the_list_whatever_is_chosen(tmp_path):
    model = nn.Sequential(*[nn.Identity() for _ in range(120)])
    assert list_stages(model)[5].key == "005_Identity"
    for spec in ([5], [5, 105], None):
        keys = [s.key for s in FeatureLogger(model, stages=spec).stages]
        assert "005_Identity" in keys
