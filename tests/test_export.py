"""tbfeat export: figures from real logdirs, compared pixel by pixel with the logged PNGs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tbfeat import FeatureLogger
from tbfeat.export import ExportError, export, panel_layout, select_stages
from tbfeat.pictures import CAM_CMAP, cam_values
from tbfeat.render import cam_overlay, colorize

from .helpers import blended, decode, indices, read_events

TRAIN_FILES = {
    *(f"{kind}_{stage}_{image}.png" for kind in ("features", "cam")
      for stage in ("04_layer1", "05_layer2") for image in ("0", "1")),
    "evolution_04_layer1.png",
    "evolution_05_layer2.png",
    "overview_drift.png",
}  # fmt: skip


def run_cli(*args):
    cmd = [sys.executable, "-m", "tbfeat", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def error_line(proc):
    """The one ``tbfeat: error:`` line of a run that failed with status 2."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tbfeat: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A folder of runs like the demo's; ``train/``: a classifier at steps 1-3, its weights
    nudged between steps so that every step looks different."""
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    logger = FeatureLogger(
        model, logdir=root / "train", stages=["layer1", "layer2"], max_channels=4
    )
    for step in (1, 2, 3):
        logger.log(x, step=step)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    logger.close()
    return root


@pytest.fixture(scope="module")
def sweep_dir(demo, yolo_weights):
    """``sweep/`` beside ``train/``: two Ultralytics checkpoints swept over bus.jpg."""
    from ultralytics.utils import ASSETS

    logdir = demo / "sweep"
    bus = Path(ASSETS) / "bus.jpg"
    proc = run_cli("sweep", yolo_weights, "--images", bus, "--logdir", logdir, "--imgsz", 64,
                   "--stages", 2, 9)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return logdir


def assert_panels_exact(path, events, dpi=300):
    """Each panel of the figure, taken every k-th pixel, is the logged PNG of its step
    (image events) or the picture given (arrays)."""
    logged = [e if isinstance(e, np.ndarray) else decode(e) for e in events]
    lay = panel_layout([a.shape[:2] for a in logged], dpi=dpi)
    with Image.open(path) as im:
        assert round(im.info["dpi"][0]) >= dpi and round(im.info["dpi"][1]) >= dpi
        out = np.asarray(im.convert("RGB"))
    assert out.shape[0] == lay.height and out.shape[1] >= lay.width
    k = lay.scale
    assert k >= 1 and lay.boxes[0].width >= 0.9 * 2 * dpi  # about 2 inches wide at least
    for a, box in zip(logged, lay.boxes, strict=True):
        crop = out[box.y : box.y + box.height, box.x : box.x + box.width]
        assert np.array_equal(crop[::k, ::k], a)
        assert np.array_equal(crop, np.repeat(np.repeat(a, k, axis=0), k, axis=1))
    return logged


def test_training_run_figures_keep_every_logged_pixel(demo, tmp_path):
    out = tmp_path / "figures"
    paths = export(demo / "train", out)
    assert {p.name for p in paths} == TRAIN_FILES
    assert all(p.parent == out and p.stat().st_size > 5000 for p in paths)
    acc = read_events(demo / "train", derived=True)
    grids = assert_panels_exact(
        out / "features_05_layer2_1.png", acc.Images("features/05_layer2/1")
    )
    assert len(grids) == 3 and not np.array_equal(grids[0], grids[2])
    maps = acc.Images("cam/04_layer1/0")
    drawn = [blended(demo / "train", "cam/04_layer1/0", e.step) for e in maps]
    assert_panels_exact(out / "cam_04_layer1_0.png", drawn)
    (seen,) = acc.Images("input/0")  # the map of each step over the one probe image
    for event, picture in zip(maps, drawn, strict=True):
        image = torch.from_numpy(decode(seen)).permute(2, 0, 1) / 255
        assert np.array_equal(picture, cam_overlay(image, cam_values(indices(event))))
    for tag, name in (
        ("evolution/05_layer2", "evolution_05_layer2"),
        ("overview/drift", "overview_drift"),
    ):
        last = acc.Images(tag)[-1:]
        assert last[0].step == 3
        assert_panels_exact(out / f"{name}.png", last)


def test_stages_steps_and_images_select(demo, tmp_path):
    acc = read_events(demo / "train", derived=True)
    paths = export(demo / "train", tmp_path / "a", stages=["5"], steps=[3, 1], images=["1"])
    names = {p.name for p in paths}
    assert names == {"features_05_layer2_1.png", "cam_05_layer2_1.png", "evolution_05_layer2.png"}
    chosen = [e for e in acc.Images("features/05_layer2/1") if e.step in (1, 3)]
    assert_panels_exact(tmp_path / "a" / "features_05_layer2_1.png", chosen)
    # the part after the index, any case; evolution as it was at the latest step chosen
    paths = export(demo / "train", tmp_path / "b", stages=["LAYER1"], steps=[2], images=["0"])
    assert {p.name for p in paths} == {
        "features_04_layer1_0.png", "cam_04_layer1_0.png", "evolution_04_layer1.png"
    }  # fmt: skip
    at_2 = [e for e in acc.Images("evolution/04_layer1") if e.step == 2]
    assert_panels_exact(tmp_path / "b" / "evolution_04_layer1.png", at_2)


def test_pdf_and_svg_embed_the_panels(demo, tmp_path):
    pdf = export(demo / "train", tmp_path, stages=["04_layer1"], images=["0"], fmt="pdf")
    svg = export(demo / "train", tmp_path, stages=["04_layer1"], images=["0"], fmt="svg")
    assert len(pdf) == len(svg) == 3
    for path in pdf:
        assert path.suffix == ".pdf" and path.read_bytes().startswith(b"%PDF")
    for path in svg:
        text = path.read_text()
        assert path.suffix == ".svg" and "<svg" in text and "data:image/png;base64" in text


def test_stage_selectors():
    keys = ["02_C2f", "04_C2f", "04.01_layer1.1.conv1", "05_Concat/0", "05_Concat/1", "09_SPPF"]
    assert select_stages(["9"], keys) == select_stages(["SPPF"], keys) == ["09_SPPF"]
    assert select_stages(["09"], keys) == ["09_SPPF"]
    for selector in ("4.1", "04.01", "layer1.1.conv1", "04.01_layer1.1.conv1"):
        assert select_stages([selector], keys) == ["04.01_layer1.1.conv1"]
    assert select_stages(["5"], keys) == select_stages(["Concat"], keys) == keys[3:5]
    assert select_stages(["Concat/1"], keys) == select_stages(["05_Concat/1"], keys) == keys[4:5]
    assert select_stages(["4"], keys) == ["04_C2f"]
    with pytest.raises(ExportError, match="'C2f' is ambiguous: it names 02_C2f, 04_C2f"):
        select_stages(["C2f"], keys)
    with pytest.raises(ExportError, match=r"unknown stage 'SPFF' \(did you mean 'SPPF'\?\)"):
        select_stages(["SPFF"], keys)


def test_cli_exports_a_sweep_beside_a_training(demo, sweep_dir, tmp_path):
    out = tmp_path / "figures"
    proc = run_cli("export", demo, "--out", out, "--stages", "SPPF", "--dpi", 150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = {"features_09_SPPF_bus.png", "cam_09_SPPF_bus.png", "evolution_09_SPPF.png"}
    assert {p.name for p in (out / "sweep").iterdir()} == expected
    assert not (out / "train").exists()  # the training has no stage SPPF
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("exported 3 figures")
    acc = read_events(sweep_dir, derived=True)
    events = acc.Images("features/09_SPPF/bus")
    assert [e.step for e in events] == [1, 2]
    assert_panels_exact(out / "sweep" / "features_09_SPPF_bus.png", events, dpi=150)
    # everything: one folder per run
    proc = run_cli("export", demo, "--out", tmp_path / "all", "--dpi", 72, "--format", "svg")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in (tmp_path / "all").iterdir()} == {"sweep", "train"}
    assert (
        len(list((tmp_path / "all" / "sweep").glob("*.svg"))) == 2 * 2 + 2 + 1
    )  # and overview_drift


def test_bad_arguments_exit_2_with_one_line_and_write_nothing(demo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"  # another writer's scalars only
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(other)) as writer:
        writer.add_scalar("loss", 1.0, 1)
    train = demo / "train"
    cases = [
        ([train, "--stages", "layer3"], ["'layer3'", "did you mean 'layer2'", "04_layer1"]),
        ([train, "--images", "bus"], ["'bus'", "logged images: 0, 1"]),
        ([train, "--steps", "2", "4"], ["step 4", "did you mean 3", "logged steps: 1-3"]),
        ([train, "--stages", "4", "--steps", "7"], ["step 7", "chosen stages", "1-3"]),
        ([train, "--dpi", "50"], ["dpi", ">= 72", "50"]),
        ([train, "--format", "jpg"], ["'jpg'", "png, pdf, svg"]),
        ([empty], ["no event files", "empty"]),
        ([other], ["no tbfeat images"]),
        ([tmp_path / "missing"], ["logdir not found", "missing"]),
    ]
    procs = []
    for i, (args, _) in enumerate(cases):  # all at once: each start imports tbfeat
        cmd = [sys.executable, "-m", "tbfeat", "export", *map(str, args), "--out"]
        procs.append(subprocess.Popen([*cmd, str(tmp_path / f"out{i}")], text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    for i, ((_, fragments), proc) in enumerate(zip(cases, procs, strict=True)):
        stdout, stderr = proc.communicate(timeout=300)
        line = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
        for fragment in fragments:
            assert fragment in line, (fragment, line)
        assert not (tmp_path / f"out{i}").exists()


def test_maps_of_a_given_writer_and_overlays_of_older_runs_are_drawn_too(tmp_path):
    """A writer given to tbfeat takes RGB pictures: its maps are the colormap's colours,
    read back as the same indices. A run written before maps were stored as maps has
    full-size overlays under cam/ and no input/: they are shown as they were logged."""
    from torch.utils.tensorboard import SummaryWriter

    net = torchvision.models.resnet18(weights=None, num_classes=3)
    image = torch.rand(3, 48, 48)
    own = FeatureLogger(net, logdir=tmp_path / "own", stages=["layer1"], max_channels=2)
    own.log([image], step=1, names=["x"])
    own.close()
    with SummaryWriter(tmp_path / "given") as writer:
        given = FeatureLogger(net, writer=writer, stages=["layer1"], max_channels=2)
        given.log([image], step=1, names=["x"])
        given.close()
    tag = "cam/04_layer1/x"
    stored = indices(read_events(tmp_path / "own").Images(tag)[0])
    rgb = decode(read_events(tmp_path / "given").Images(tag)[0])
    assert np.array_equal(rgb, colorize(stored, CAM_CMAP))
    assert np.array_equal(blended(tmp_path / "given", tag, 1), blended(tmp_path / "own", tag, 1))

    overlay = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    with SummaryWriter(tmp_path / "older") as writer:  # what tbfeat wrote before
        writer.add_image("features/04_layer1/x", overlay[:12, :25], 1, dataformats="HWC")
        writer.add_image(tag, overlay, 1, dataformats="HWC")
    paths = export(tmp_path / "older", tmp_path / "figures")
    assert {p.name for p in paths} == {"features_04_layer1_x.png", "cam_04_layer1_x.png"}
    assert_panels_exact(tmp_path / "figures" / "cam_04_layer1_x.png", [overlay])
    # the same run continued by today's tbfeat: the old step as logged, the new one drawn
    more = FeatureLogger(net, logdir=tmp_path / "older", stages=["layer1"], max_channels=2)
    more.log([image], step=2, names=["x"])
    more.close()
    export(tmp_path / "older", tmp_path / "continued")
    drawn = blended(tmp_path / "older", tag, 2)
    assert np.array_equal(drawn, blended(tmp_path / "own", tag, 1))
    assert_panels_exact(tmp_path / "continued" / "cam_04_layer1_x.png", [overlay, drawn])


def test_export_reads_back_without_loading_torch(demo, tmp_path):
    """What reads a logdir back loads neither torch nor the model side: the command's
    memory is that of the pictures it draws (maps blended over their images included)."""
    code = (
        "import sys\n"
        "from tbfeat.cli import main\n"
        "rc = main(['export', sys.argv[1], '--out', sys.argv[2], '--stages', '4', '--dpi', '72'])\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('tbfeat.'))\n"
        "print(rc, *loaded)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, demo / "train", tmp_path], text=True,
                          capture_output=True, check=False, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rc, *loaded = proc.stdout.split("\n")[-2].split()
    assert rc == "0" and "torch" not in loaded, loaded
    assert {"tbfeat.export", "tbfeat.reader", "tbfeat.pictures"} <= set(loaded)
    assert (tmp_path / "cam_04_layer1_0.png").is_file()
