"""Per-stage class activation maps against a model whose evidence sits where the test
puts it, and a model left exactly as it was."""

import pytest
import torch
import torchvision
from torch import nn

from tbfeat import stage_cams


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
    with pytest.raises(ValueError, match="target class 5 is out of range; allowed 0..1"):
        stage_cams(model, spots_image(), target=5)
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None
    )
    with pytest.raises(ValueError, match="not supported yet"):
        stage_cams(detector, spots_image())


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
