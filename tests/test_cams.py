"""Per-stage class activation maps against a model whose evidence sits where the test
puts it, and a model left exactly as it was."""

import io

import matplotlib
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from tbfeat import FeatureLogger, stage_cams
from tbfeat.pictures import CAM_ALPHA, CAM_CMAP, LEVELS, cam_values, palette
from tbfeat.render import cam_indices, cam_overlay, to_rgb8
from tbfeat.targets import CamTarget, choose

from .helpers import blended, decode, indices, read_events


class Spots(nn.Module):
    """Class c's score is the mean of input channel c (through a 1x1 conv and a ReLU):
    its evidence is exactly where that channel is bright."""

    def __init__(self):
        super().__init__()
        self.pick = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.pick.weight.zero_()
            self.pick.weight[0, 0] = 1.0  # class 0 <- red
            self.pick.weight[1, 1] = 1.0  # class 1 <- green
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()

    def forward(self, x):
        return self.flat(self.pool(self.act(self.pick(x))))


def spots_image() -> torch.Tensor:
    image = torch.zeros(3, 32, 32)
    image[0, 2:10, 3:11] = 1.0  # red, top left: the stronger class
    image[1, 22:28, 20:26] = 0.6  # green, bottom right
    return image


def peak(cam: torch.Tensor) -> tuple[int, int]:
    flat = int(cam.flatten().argmax())
    return divmod(flat, cam.shape[-1])


def test_each_targets_map_peaks_where_its_evidence_is():
    model, image = Spots(), spots_image()
    for target, rows, cols in ((0, range(2, 10), range(3, 11)), (1, range(22, 28), range(20, 26))):
        cams = stage_cams(model, image, stages=["act"], target=target)
        cam = cams["01_ReLU"][0]
        r, c = peak(cam)
        assert r in rows and c in cols, (target, r, c)
        outside = torch.ones_like(cam, dtype=torch.bool)
        outside[rows.start : rows.stop, cols.start : cols.stop] = False
        assert float(cam[outside].max()) < 0.05  # nothing of the other class's spot
    top1 = stage_cams(model, image, stages=["act"])["01_ReLU"]
    assert torch.equal(top1, stage_cams(model, image, stages=["act"], target=0)["01_ReLU"])
    scored = stage_cams(model, image, stages=["act"], target=lambda out: out[:, 1])["01_ReLU"]
    assert peak(scored[0])[0] in range(22, 28)
    # gradient-free: both spots, as bright as their activations
    free = stage_cams(model, image, stages=["act"], method="activation")["01_ReLU"][0]
    assert float(free[5, 6]) == pytest.approx(1.0) and float(free[25, 22]) == pytest.approx(0.6)


def test_the_model_is_left_exactly_as_it_was():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4).train()
    model.layer1[0].bn1.eval()  # a frozen BatchNorm in a training model stays frozen
    x = torch.rand(2, 3, 64, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    with torch.inference_mode():  # as a validation loop runs
        cams = stage_cams(model, x, stages=["layer1", "layer3"])
    assert set(cams) == {"04_layer1", "06_layer3"}
    for v in cams.values():  # each image scaled to [0, 1] on its own
        assert v.shape == (2, 64, 64) and v.min() >= 0
        assert v.flatten(1).max(1).values.tolist() == [1.0, 1.0]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_frozen_parameters_still_give_layercam():
    model = Spots().requires_grad_(False)
    cam = stage_cams(model, spots_image(), stages=["act"], target=1)["01_ReLU"][0]
    assert peak(cam)[0] in range(22, 28)


def test_bad_arguments_raise_clear_errors():
    model = Spots()
    with pytest.raises(ValueError, match="method must be one of 'layercam', 'activation'"):
        stage_cams(model, spots_image(), method="gradcam")
    with pytest.raises(TypeError, match="target must be None"):
        stage_cams(model, spots_image(), target="cat")
    with pytest.raises(ValueError, match=r"classes \[5\] are all outside the model's 2 classes"):
        stage_cams(model, spots_image(), target=5)
    with pytest.raises(ValueError, match="conf must be in"):
        stage_cams(model, spots_image(), conf=1.5)
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        stage_cams(model, spots_image(), topk=0)
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None
    )
    with pytest.raises(ValueError, match="preprocess= is for plain modules"):
        stage_cams(detector, spots_image(), preprocess=lambda t: t)


def test_values_before_later_in_place_ops_and_exact_class_indices():
    """A stage followed by an in-place ReLU keeps the values it gave; a class index
    stays exact in bfloat16 (257 is not a bfloat16 number)."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 300))  # fmt: skip
    x = torch.rand(1, 3, 16, 16)
    cam = stage_cams(model, x, stages=[0], method="activation")["00_Conv2d"][0]
    with torch.no_grad():
        expected = conv(x).abs().mean(1)[0]
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert torch.allclose(cam, expected, atol=1e-6)  # |conv|, not the clamped ReLU output
    half = model.to(torch.bfloat16)
    by_index = stage_cams(half, x.bfloat16(), stages=[0], target=257)["00_Conv2d"]
    by_score = stage_cams(half, x.bfloat16(), stages=[0], target=lambda o: o[:, 257])["00_Conv2d"]
    assert torch.equal(by_index, by_score)


def test_what_cannot_give_a_layercam_says_so():
    model = Spots()
    with pytest.raises(ValueError, match="images of one size"):
        stage_cams(model, [torch.rand(3, 16, 16), torch.rand(3, 20, 16)])
    with pytest.raises(ValueError, match="does not depend on the input through a gradient"):
        stage_cams(model, spots_image(), target=lambda out: out.detach()[:, 0])


def test_predictions_are_chosen_as_ultralytics_chooses_them():
    """Above conf, strongest first, at most topk, of the allowed classes; the single
    best one where none passes; an image with fewer repeats its own."""
    logits = torch.tensor([[4.0, -3.0, 1.0, 2.0], [0.0, 3.0, -5.0, -5.0]])  # (classes, preds)
    probs = logits.sigmoid()
    picked = choose([(logits, probs)], CamTarget(conf=0.6))  # preds 0, 1 (class 1), 3, 2
    assert [float(s) for s in picked] == [4.0, 3.0, 2.0, 1.0]
    assert [float(s) for s in choose([(logits, probs)], CamTarget(conf=0.6, topk=2))] == [4.0, 3.0]
    only1 = choose([(logits, probs)], CamTarget(classes=(1,), conf=0.99))  # none pass: the best
    assert [float(s) for s in only1] == [3.0]
    weak = (logits - 10, (logits - 10).sigmoid())
    both = choose([(logits, probs), weak], CamTarget(conf=0.6))
    assert [float(s) for s in both] == [4.0 - 6.0, 3.0 - 6.0, 2.0 - 6.0, 1.0 - 6.0]


def test_the_head_inputs_agree_with_ultralytics_own_layercam(tmp_path, monkeypatch):
    """Ultralytics' ``class_activation_map`` (predict with visualize=True) and the
    maximum of the maps of the stages its head reads, on one model and image."""
    cv2 = pytest.importorskip("cv2")
    import ultralytics.utils.plotting as plotting
    from ultralytics import YOLO
    from ultralytics.utils import ASSETS

    if not hasattr(plotting, "class_activation_map"):  # releases before 8.4 have none
        pytest.skip("this Ultralytics release has no class_activation_map to compare with")
    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml")
    head = yolo.model.model[-1]
    for branch in head.cv3:  # class scores that differ between anchors
        nn.init.normal_(branch[-1].weight, std=0.02)
        nn.init.zeros_(branch[-1].bias)
    image = cv2.resize(cv2.imread(str(ASSETS / "bus.jpg")), (320, 320))  # no letterbox padding
    # each level's 5th best score at 0: the 16 predictions explained lie on all three
    # levels (with the same bias everywhere, the finest level's 1600 anchors win them all)
    # (a plain forward: the predictor holds the model it first fuses, so the biases
    # change before any predict)
    seen = []
    handle = head.register_forward_pre_hook(lambda m, a: seen.append([t.detach() for t in a[0]]))
    rgb = torch.from_numpy(image[..., ::-1].copy()).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        yolo.model(rgb)
    handle.remove()

    def best(i):  # each anchor's best class logit on level i
        with torch.no_grad():
            return head.cv3[i](seen[0][i]).amax(1).flatten()

    with torch.no_grad():
        for i, branch in enumerate(head.cv3):
            branch[-1].bias -= best(i).topk(5).values[-1]
    levels = torch.cat([torch.full_like(best(i), i) for i in range(3)])
    top = torch.cat([best(i) for i in range(3)]).topk(16).indices
    assert set(levels[top].tolist()) == {0, 1, 2}
    theirs = []
    colour = plotting.cv2.applyColorMap
    monkeypatch.setattr(
        plotting.cv2, "applyColorMap", lambda c, m: theirs.append(c.copy()) or colour(c, m)
    )
    yolo.predict(image, imgsz=320, visualize=True, save=False, verbose=False, project=tmp_path)
    monkeypatch.undo()
    assert len(theirs) == 1 and theirs[0].shape == (320, 320) and theirs[0].max() > 0
    maps = stage_cams(yolo, image, stages=list(head.f), conf=0.25, topk=16, imgsz=320)
    assert list(maps) == ["15_C2f", "18_C2f", "21_C2f"]
    assert all(float(m.max()) == 1.0 for m in maps.values())  # every level explains some
    # each prediction's map resized to the input before the maximum, as Ultralytics does
    ours = torch.stack(list(maps.values())).amax(0)[0]
    r = np.corrcoef(ours.flatten().numpy(), theirs[0].astype(np.float32).ravel())[0, 1]
    assert r >= 0.96, r  # 0.969 measured; 0.952 when maps were combined before resizing


def model_state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
    )


def assert_unchanged(model, before, run, reference):
    state, modes = before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )
    again = run()
    assert all(torch.equal(a, b) for a, b in zip(flat(reference), flat(again), strict=True))


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat(v)]
    return []


@pytest.mark.parametrize(
    "config", ["yolov8n.yaml", "yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolov8n-obb.yaml",
               "yolov8n-cls.yaml", "rtdetr-l.yaml"],
)  # fmt: skip
def test_every_yolo_head_gives_maps_and_is_left_as_it_was(config):
    from ultralytics import RTDETR, YOLO
    from ultralytics.utils import ASSETS

    torch.manual_seed(0)
    yolo = (RTDETR if config.startswith("rtdetr") else YOLO)(config)
    model = yolo.model.eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.inference_mode():  # anchors cached under inference mode, as in predict
        reference = model(x)
    head = model.model[-1]
    caches = {a: getattr(head, a, None) for a in ("shape", "shapes", "anchors")}
    before = model_state(model)
    with torch.inference_mode():
        maps = stage_cams(yolo, ASSETS / "bus.jpg", stages=[1, 4, len(model.model) - 2], imgsz=128)
    assert len(maps) == 3
    for cam in maps.values():
        assert cam.shape[0] == 1 and cam.min() >= 0 and cam.max() == 1.0
    assert all(getattr(head, a, None) is v for a, v in caches.items())

    def run():
        with torch.inference_mode():
            return model(x)

    assert_unchanged(model, before, run, reference)


@pytest.mark.parametrize(
    "builder", ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
                "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn"],
)  # fmt: skip
def test_torchvision_detectors_give_maps_at_their_transforms_size(builder):
    torch.manual_seed(0)
    kwargs = {} if builder.startswith("ssd") else {"min_size": 128, "max_size": 160}
    model = torchvision.models.get_model(
        builder, weights=None, weights_backbone=None, num_classes=5, **kwargs
    ).eval()
    x = torch.rand(3, 100, 150)
    with torch.no_grad():
        reference = model([x])
    before = model_state(model)
    maps = stage_cams(model, x, topk=2)
    with torch.no_grad():
        seen = model.transform([x])[0].tensors
    assert maps and all(m.shape == (1, *seen.shape[-2:]) for m in maps.values())
    assert any(float(m.max()) == 1.0 for m in maps.values())

    def run():
        with torch.no_grad():
            return model([x])

    assert_unchanged(model, before, run, reference)


def test_a_transform_that_pads_into_views_gets_the_maps_of_a_differentiable_one(monkeypatch):
    """The tutorial's transform pads by ``copy_`` into views of one batch, which autograd
    refuses once the input requires grad. The maps are taken from the batch the transform
    returns, and equal those a differentiable copy of it gives when the gradient runs
    back through it to the image, as it did before."""
    import copy

    import torch.nn.functional as F

    from tbfeat.integrations.torchvision import DetectionAdapter

    from . import tutorial_detector as tutorial

    class PaddedByF(tutorial.Transform):  # the same batch, padded by F.pad: differentiable
        def forward(self, images, targets=None):
            out, _ = super().forward([i.detach() for i in images])
            h, w = out.tensors.shape[-2:]
            resized = [F.interpolate(((i - self.mean) / self.std)[None], size=s,
                                     mode="bilinear", align_corners=False)[0]
                       for i, s in zip(images, out.image_sizes, strict=True)]  # fmt: skip
            batch = torch.stack([F.pad(r, (0, w - r.shape[-1], 0, h - r.shape[-2]))
                                 for r in resized])  # fmt: skip
            return type(out)(batch, out.image_sizes), targets

    torch.manual_seed(0)
    model = tutorial.mobilenet_v2().eval()
    model.transform.min_size, model.transform.max_size = 96, 128
    x = torch.rand(3, 90, 120)
    maps = stage_cams(model, x, topk=3)
    assert maps and any(float(m.max()) == 1.0 for m in maps.values())
    twin = copy.deepcopy(model)
    twin.transform = PaddedByF(96, 128)
    with torch.no_grad():
        assert torch.equal(twin.transform([x])[0].tensors, model.transform([x])[0].tensors)
    # the way maps were taken before: the gradient back through the transform to the image
    monkeypatch.setattr(DetectionAdapter, "cam_forward",
                        lambda self, inputs, module: (module(list(inputs)), list(inputs)))
    before = stage_cams(twin, x, topk=3)
    assert maps.keys() == before.keys()
    for key in maps:
        assert torch.allclose(maps[key], before[key], atol=1e-4), key


def test_log_stores_each_stages_map_and_the_image_once_and_export_blends_them(tmp_path):
    """``cam/<NN>_<Type>/<image>``: the map of ``stage_cams`` as palette indices of the
    documented colormap, at each step; ``input/<image>``: the image the model saw, written
    once while it does not change; export draws the map over it, through the documented
    colormap and alpha, as ``cam_overlay`` draws the map in memory."""
    model, image = Spots(), spots_image()
    logger = FeatureLogger(model, logdir=tmp_path, stages=["act"], max_channels=2)
    for step in (1, 2):
        logger.log([image], step=step, names=["spots"])
    logger.log([image.flip(-1)], step=3, names=["spots"])
    logger.close()
    acc = read_events(tmp_path)
    assert [t for t in acc.Tags()["images"] if t.startswith("cam/")] == ["cam/01_ReLU/spots"]
    events = acc.Images("cam/01_ReLU/spots")
    assert [e.step for e in events] == [1, 2, 3]
    cam = stage_cams(model, image, stages=["act"])["01_ReLU"][0]
    assert np.array_equal(indices(events[1]), cam_indices(cam))
    with Image.open(io.BytesIO(events[1].encoded_image_string)) as im:
        lut = np.asarray(im.getpalette(), dtype=np.uint8).reshape(-1, 3)[:LEVELS]
    assert np.array_equal(lut, palette(CAM_CMAP)[:LEVELS])
    inputs = acc.Images("input/spots")
    assert [e.step for e in inputs] == [1, 3]  # again only when the image changed
    assert np.array_equal(decode(inputs[0]), to_rgb8(image))
    assert np.array_equal(decode(inputs[1]), to_rgb8(image.flip(-1)))

    drawn = blended(tmp_path, "cam/01_ReLU/spots", 2)
    assert np.array_equal(drawn, cam_overlay(image, cam_values(indices(events[1]))))
    assert np.abs(drawn.astype(int) - cam_overlay(image, cam)).max() <= 1  # 8 bits suffice
    flipped = stage_cams(model, image.flip(-1), stages=["act"])["01_ReLU"][0]
    assert np.abs(blended(tmp_path, "cam/01_ReLU/spots", 3).astype(int)
                  - cam_overlay(image.flip(-1), flipped)).max() <= 1  # fmt: skip
    inferno = matplotlib.colormaps["inferno"]
    red = np.array([255.0, 0.0, 0.0])
    spot = (1 - CAM_ALPHA) * red + CAM_ALPHA * 255 * np.array(inferno(1.0)[:3])
    assert np.abs(drawn[5, 6] - spot).max() <= 1  # the top-1 class's spot, brightest
    green = np.array([0.0, 0.6 * 255, 0.0])
    dark = (1 - CAM_ALPHA) * green + CAM_ALPHA * 255 * np.array(inferno(0.0)[:3])
    assert np.abs(drawn[25, 22] - dark).max() <= 1  # the other class's spot: no evidence


def test_cam_none_logs_no_maps_and_a_failing_map_warns_once(tmp_path):
    model, image = Spots(), spots_image()
    with FeatureLogger(model, logdir=tmp_path / "off", stages=["act"], cam=None) as logger:
        logger.log(image, step=1)
    assert not [t for t in read_events(tmp_path / "off").Tags()["images"] if t.startswith("cam")]
    broken = FeatureLogger(model, logdir=tmp_path / "bad", stages=["act"], cam_target=7)
    with pytest.warns(RuntimeWarning, match="class activation maps were not logged") as said:
        for step in (1, 2):
            broken.log(image, step=step)
    broken.close()
    assert len([w for w in said if "class activation" in str(w.message)]) == 1
    tags = read_events(tmp_path / "bad").Tags()["images"]
    assert tags == ["features/01_ReLU/0"]  # the rest of each step is logged
    with pytest.raises(ValueError, match="cam must be one of 'layercam', 'activation', None"):
        FeatureLogger(model, cam="gradcam")
    with pytest.raises(TypeError, match="cam_target must be None"):
        FeatureLogger(model, cam_target="dog")


def test_captured_forwards_get_maps_only_when_asked(tmp_path):
    model, image = Spots(), spots_image()
    batch = torch.stack([image, image.flip(-1)])
    with FeatureLogger(model, logdir=tmp_path / "plain", stages=["act"]):
        model(batch)
    assert not [t for t in read_events(tmp_path / "plain").Tags()["images"] if t.startswith("cam")]
    logger = FeatureLogger(
        model, logdir=tmp_path / "asked", stages=["act"], cam_captures=True, max_images=3
    )
    with logger:
        with torch.inference_mode():  # as a predict loop runs
            out = model(batch)
        model(batch)  # one more image fits max_images
    assert torch.equal(out, model(batch))
    acc = read_events(tmp_path / "asked")
    cams = sorted(t for t in acc.Tags()["images"] if t.startswith("cam/"))
    assert cams == ["cam/01_ReLU/0", "cam/01_ReLU/1", "cam/01_ReLU/2"]
    maps = stage_cams(model, batch, stages=["act"])["01_ReLU"]
    for tag, cam in zip(cams, [*maps, maps[0]], strict=True):
        assert np.array_equal(indices(acc.Images(tag)[-1]), cam_indices(cam))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_ultralytics_predict_gets_maps_when_asked(tmp_path):
    from ultralytics import YOLO
    from ultralytics.utils import ASSETS

    yolo = YOLO("yolov8n.yaml")
    with FeatureLogger(yolo, logdir=tmp_path, cam_captures=True, stages=[2, 15]):
        yolo.predict(ASSETS / "bus.jpg", imgsz=64, save=False, verbose=False)
    tags = read_events(tmp_path).Tags()["images"]
    assert sorted(t for t in tags if t.startswith("cam/")) == ["cam/02_C2f/bus", "cam/15_C2f/bus"]
