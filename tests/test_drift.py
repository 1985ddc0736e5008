"""Drift (1 - linear CKA) between steps, the evolution strip, and their saved history."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from tbfeat import FeatureLogger
from tbfeat.drift import HISTORY_FILE, centred_gram, cka_from_grams

from .helpers import decode, read_events


def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA straight from the definition, with centred Gram matrices."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    kx, ky = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.sum(kx * ky) / np.sqrt(np.sum(kx * kx) * np.sum(ky * ky)))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA as drift computes it: from the two centred Gram matrices."""
    return cka_from_grams(centred_gram(x), centred_gram(y))


def test_cka_matches_the_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7))
    y = x @ rng.normal(size=(7, 5)) + 0.3 * rng.normal(size=(60, 5))
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(
        numpy_cka(x, y), rel=1e-9
    )


def test_cka_known_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x[:, torch.randperm(16, generator=g)]) == pytest.approx(1.0)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x @ q) == pytest.approx(1.0)
    noise = torch.randn(2000, 8, generator=g)
    assert 1 - linear_cka(torch.randn(2000, 8, generator=g), noise) > 0.99
    with pytest.raises(ValueError, match="different samples"):
        linear_cka(x, x[:10])


def run_steps(logdir, changes, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    probes = torch.rand(2, 3, 40, 40)
    logger = FeatureLogger(model, logdir=logdir, **kw)
    for step, change in changes:
        if change:
            with torch.no_grad():
                model[0].weight.add_(change * torch.randn_like(model[0].weight))
        logger.log(probes, step=step)
    logger.close()
    return read_events(logdir, derived=True)


def test_drift_is_zero_for_an_unchanged_model_and_grows_with_change(tmp_path):
    acc = run_steps(tmp_path / "same", [(1, 0.0), (2, 0.0), (3, 0.0)])
    assert [e.step for e in acc.Scalars("drift/00_Conv2d")] == [2, 3]
    assert all(e.value == pytest.approx(0.0, abs=1e-3) for e in acc.Scalars("drift/00_Conv2d"))
    acc = run_steps(tmp_path / "moving", [(1, 0.0), (2, 0.05), (3, 2.0)])
    small, large = (e.value for e in acc.Scalars("drift/00_Conv2d"))
    assert 0.0 < small < large <= 1.0
    vs_first = [e.value for e in acc.Scalars("drift/00_Conv2d_vs_first")]
    assert vs_first[0] == pytest.approx(small, abs=1e-6) and vs_first[1] > small


def test_evolution_strip_has_a_column_per_step_and_a_row_per_image(tmp_path):
    acc = run_steps(tmp_path, [(1, 0.0), (2, 0.1), (3, 0.1)], evolution_cell=16)
    events = acc.Images("evolution/01_ReLU")
    assert [e.step for e in events] == [1, 2, 3]
    # 40x40 maps pooled by 3 to 14x14 cells; 2 images (rows) x steps so far (columns)
    assert [(e.width, e.height) for e in events] == [(14, 29), (29, 29), (44, 29)]


def test_history_resumes_across_loggers_and_is_bounded(tmp_path):
    run_steps(tmp_path, [(1, 0.0), (2, 0.2)], evolution_steps=3)
    assert (tmp_path / HISTORY_FILE).is_file()
    # a new logger (a resumed run) continues: drift at step 3 against step 2 from disk
    acc = run_steps(tmp_path, [(3, 0.0), (4, 0.2), (5, 0.2)], evolution_steps=3)
    assert [e.step for e in acc.Scalars("drift/00_Conv2d")] == [2, 3, 4, 5]
    last = acc.Images("evolution/00_Conv2d")[-1]
    assert last.step == 5 and last.width == 3 * 15 - 1  # 14 px cells; only the last 3 steps
    size = (tmp_path / HISTORY_FILE).stat().st_size
    assert size < 2_000_000


def test_a_sweep_extended_with_a_checkpoint_continues(tmp_path):
    from tbfeat.integrations.torchvision import build

    torch.manual_seed(0)
    model = build("resnet18", num_classes=3)
    for epoch in range(3):
        with torch.no_grad():
            model.conv1.weight.mul_(1.3)
        torch.save({"model": model.state_dict(), "epoch": epoch}, tmp_path / f"model_{epoch}.pth")
    image = tmp_path / "probe.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), np.uint8)).save(image)
    common = [
        "--images",
        image,
        "--logdir",
        tmp_path / "sweep",
        "--arch",
        "resnet18",
        "--stages",
        "conv1",
        "layer1",
    ]

    def sweep(*ckpts):
        proc = subprocess.run(
            [sys.executable, "-m", "tbfeat", "sweep", *map(str, ckpts), *map(str, common)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]

    sweep(tmp_path / "model_0.pth", tmp_path / "model_1.pth")
    sweep(tmp_path / "model_0.pth", tmp_path / "model_1.pth", tmp_path / "model_2.pth")
    acc = read_events(tmp_path / "sweep", derived=True)
    assert [e.step for e in acc.Scalars("drift/00_Conv2d")] == [2, 3]
    # 24 px maps, 12 px cells
    assert acc.Images("evolution/00_Conv2d")[-1].width == 3 * (12 + 1) - 1


def test_one_overview_of_every_stages_drift_in_the_run(tmp_path):
    """The custom scalars layout charts every stage's drift tags together; the image
    ``overview/drift`` is, at each step, the picture of the drift scalars read back."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    from tbfeat.render import drift_overview

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())
    x = torch.rand(2, 3, 12, 12)
    for steps in ((1, 2, 3), (4,)):  # a second logger continues the run
        logger = FeatureLogger(model, logdir=tmp_path, max_channels=2)
        for step in steps:
            with torch.no_grad():
                model[0].weight.mul_(1.5 if step % 2 else -0.5)
            logger.log(x, step=step)
        logger.close()
    acc = read_events(tmp_path, derived=True)
    scalars = acc.Tags()["scalars"]
    drift_tags = sorted(t for t in scalars if t.startswith("drift/"))
    bases = sorted({t[len("drift/") :].removesuffix("_vs_first") for t in drift_tags})
    assert bases == ["00_Conv2d", "01_ReLU", "02_Conv2d"]  # 4-D outputs only
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for c in layout.category[0].chart}
    assert layout.category[0].title == "tbfeat overview"

    def drawn(chart):  # a chart's entries are regexes TensorBoard matches from the start
        return sorted(t for t in scalars if any(re.match(p, t) for p in charts[chart]))

    assert drawn("drift vs the step before") == [f"drift/{b}" for b in bases]
    assert drawn("drift vs the first step") == [f"drift/{b}_vs_first" for b in bases]
    assert drawn("zero fraction")[0] == "stats/00_Conv2d/zero_fraction"
    assert drawn("zero fraction") == sorted(t for t in scalars if t.endswith("/zero_fraction"))
    events = acc.Images("overview/drift")
    assert [e.step for e in events] == [2, 3, 4]
    values = np.array(
        [[e.value for e in acc.Scalars(f"drift/{b}")] for b in bases], dtype=np.float32
    )
    expected = drift_overview(bases, [2, 3, 4], values)
    assert np.array_equal(decode(events[-1]), expected)


def test_the_overview_picture_is_drawn_at_the_first_ten_drift_steps_then_every_tenth(tmp_path):
    """Drawing ``overview/drift`` costs about 60 ms a step; the drift scalars (and the
    dashboard's drift map drawn from them) stay at every step."""
    from tbfeat.recorder import OVERVIEW_EVERY, OVERVIEW_FIRST

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.rand(1, 3, 12, 12)
    with FeatureLogger(model, logdir=tmp_path, max_channels=2, cam=None) as logger:
        for step in range(31):
            logger.log(x, step=step)
    acc = read_events(tmp_path, derived=True)
    drift_steps = [e.step for e in acc.Scalars("drift/00_Conv2d")]
    assert drift_steps == list(range(1, 31))
    drawn = [e.step for e in acc.Images("overview/drift")]
    expected = [s for n, s in enumerate(drift_steps, 1)
                if n <= OVERVIEW_FIRST or n % OVERVIEW_EVERY == 0]  # fmt: skip
    assert drawn == expected == [*range(1, 11), 20, 30]


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))


def test_log_and_a_sweep_of_the_same_weights_give_the_same_drift(tmp_path):
    """The drift samples are split among the images probed, not among the images
    allowed: ``log()`` at any ``max_images`` and ``tbfeat.sweep`` (which allows 8 by
    default) give one value for the same weights and image."""
    from PIL import Image

    from tbfeat import sweep

    image = tmp_path / "probe.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    model = _small_net()
    states = []
    for epoch in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(epoch)))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        torch.save({"model": states[-1], "epoch": epoch}, folder / f"model_{epoch}.pth")
    result = sweep([folder], model=_small_net, images=[image], logdir=tmp_path / "sweep")
    steps = result.logged
    drifts = {}
    for max_images in (1, 4, 8):
        logdir = tmp_path / f"log{max_images}"
        net = _small_net()
        with FeatureLogger(net, logdir=logdir, max_images=max_images) as logger:
            for step, state in zip(steps, states, strict=True):
                net.load_state_dict(state)
                logger.log(image, step=step)
        drifts[max_images] = read_events(logdir, derived=True)
    swept = read_events(tmp_path / "sweep", derived=True)
    tags = [t for t in swept.Tags()["scalars"] if t.startswith("drift/")]
    assert len(tags) == 6  # 3 stages, against the step before and the first
    for tag in tags:
        expected = [e.value for e in swept.Scalars(tag)]
        assert len(expected) == 2 and max(expected) > 0.001, (tag, expected)
        for max_images, acc in drifts.items():
            got = [e.value for e in acc.Scalars(tag)]
            assert got == pytest.approx(expected, abs=1e-6), (tag, max_images)
