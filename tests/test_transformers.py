"""Transformer models: timm's own stage descriptions, and tokens logged as the maps they
hold, against hand reshapes of the blocks' outputs."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tbfeat import FeatureLogger, list_stages, stage_cams
from tbfeat.adapters import ModelAdapter, adapt
from tbfeat.cams import compute_cams
from tbfeat.render import colorize, feature_grid
from tbfeat.stages import Stage
from tbfeat.targets import as_target
from tbfeat.tokens import TokenLayout

from .helpers import decode, read_events

timm = pytest.importorskip("timm")

GRID = dict(max_channels=6, ncols=3)  # small grids, the same options on both sides


def vit(**kwargs) -> nn.Module:
    """A 2-block ViT-Tiny for 32x64 inputs: a 2x4 patch grid behind a class token and two
    register tokens."""
    kwargs = {"img_size": (32, 64), "depth": 2, "reg_tokens": 2, "num_classes": 3} | kwargs
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


def swin() -> nn.Module:
    """A one-block-per-stage Swin for 32x32 inputs: stages of 8x8 ... 1x1, channels last."""
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=2,
        depths=(1, 1, 1, 1), embed_dim=24, num_classes=3,
    ).eval()  # fmt: skip


def output_of(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """What module ``name`` returns in a plain forward of ``x``."""
    seen = {}
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda m, a, out: seen.setdefault("out", out.detach().clone())
    )
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["out"]


def scalar(events, tag: str) -> float:
    (event,) = events.Scalars(tag)
    return event.value


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}),
        ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 2}),
        ("convnext_atto", {}),
        ("resnet18", {}),
        ("efficientnet_b0", {}),
    ],
)
def test_default_stages_are_the_models_own_feature_info(name, kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs)
    stages = list_stages(model)
    assert [s.name for s in stages] == [d["module"] for d in model.feature_info]
    assert [s.key for s in stages][:2] == [f"00_{stages[0].name}", f"01_{stages[1].name}"]
    if hasattr(model, "num_prefix_tokens"):  # ViT and DeiT (class + distillation token)
        layout = TokenLayout(
            prefix=model.num_prefix_tokens, cls=True, grid=tuple(model.patch_embed.grid_size)
        )
        assert {s.tokens for s in stages} == {layout}
    else:  # ConvNeXt, ResNet and EfficientNet stages are (N, C, H, W) already
        assert {s.tokens for s in stages} == {None}


def test_swin_stages_are_channels_last_because_the_model_says_so():
    model = swin()
    stages = list_stages(model)
    assert [s.name for s in stages] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert model.output_fmt == "NHWC"
    assert {s.tokens for s in stages} == {TokenLayout(channels_last=True)}


def test_a_vit_blocks_grid_is_its_patch_tokens_reshaped_by_hand(tmp_path):
    model, x = vit(), torch.rand(2, 3, 32, 64)
    tokens = output_of(model, "blocks.1", x)  # (2, 1 + 2 + 2*4, 192)
    assert tokens.shape == (2, 11, 192)
    fmap = tokens[:, 3:].reshape(2, 2, 4, 192).permute(0, 3, 1, 2)  # registers left out
    logger = FeatureLogger(model, tmp_path, stages=["blocks.1"], **GRID)
    logger.log(x, step=0)
    logger.close()
    events = read_events(tmp_path)
    for i in range(2):
        (event,) = events.Images(f"features/01_blocks.1/{i}")
        expect = colorize(feature_grid(fmap[i : i + 1], **GRID)[0])
        np.testing.assert_array_equal(decode(event), expect)
    assert scalar(events, "stats/01_blocks.1/mean") == pytest.approx(fmap.mean().item(), rel=1e-5)
    cls = tokens[:, 0]  # the class token, apart from the registers
    assert scalar(events, "stats/01_blocks.1/cls/mean") == pytest.approx(cls.mean().item(), 1e-5)
    assert scalar(events, "stats/01_blocks.1/cls/max") == pytest.approx(cls.max().item(), 1e-6)
    assert "activations/01_blocks.1/cls" in events.Tags()["histograms"]
    assert not [t for t in events.Tags()["images"] if "/cls" in t]  # no grid of one token


def test_a_swin_stages_grid_is_its_channels_last_output_permuted(tmp_path):
    model, probes = swin(), torch.rand(1, 3, 32, 32)
    out = output_of(model, "layers.0", probes)  # (1, 8, 8, 24), channels last
    assert out.shape == (1, 8, 8, 24)
    logger = FeatureLogger(model, tmp_path, stages=["layers.0"], **GRID)
    for step in range(2):  # two steps: drift and evolution too
        logger.log(probes, step=step)
    logger.close()
    events = read_events(tmp_path, derived=True)
    first, _ = events.Images("features/00_layers.0/0")
    expect = colorize(feature_grid(out.permute(0, 3, 1, 2), **GRID)[0])
    np.testing.assert_array_equal(decode(first), expect)
    assert [e.step for e in events.Scalars("drift/00_layers.0")] == [1]
    assert [e.step for e in events.Images("evolution/00_layers.0")] == [0, 1]
    (_, info), *_ = events.run_info()
    assert [o.shape for o in info.outputs] == [(24, 8, 8)]


class Tokenize(nn.Module):
    """Each pixel of a one-row image becomes a token: ``(N, W, C)``; ``body`` passes it on."""

    def __init__(self):
        super().__init__()
        self.body = nn.Identity()

    def forward(self, x):
        return self.body(x.flatten(2).transpose(1, 2))


class TokenAdapter(ModelAdapter):
    """Says that ``body`` returns a class token and a 2x2 patch grid."""

    def candidate_stages(self):
        layout = TokenLayout(prefix=1, cls=True, grid=(2, 2))
        return [Stage(0, "body", "Identity", self.module.body, "body", tokens=layout)]


def test_a_token_count_that_is_no_grid_warns_once_and_logs_statistics_only(tmp_path):
    adapter = TokenAdapter(Tokenize())
    assert adapt(adapter) is adapter
    image = torch.rand(3, 1, 6)  # 6 tokens: a class token and 5 patches, no 2x2 grid
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = FeatureLogger(adapter, tmp_path)
        logger.log(image, step=0)
        logger.log(image, step=1)
        logger.close()
    said = [str(w.message) for w in caught if "statistics only" in str(w.message)]
    assert len(said) == 1, said
    assert "00_body" in said[0] and "(1, 6, 3)" in said[0]
    events = read_events(tmp_path)
    assert events.Tags()["images"] == []
    assert [e.value for e in events.Scalars("stats/00_body/mean")] == pytest.approx(
        [image.mean().item()] * 2, rel=1e-5
    )
    assert "stats/00_body/cls/mean" not in events.Tags()["scalars"]


def test_a_grid_of_the_same_stage_logs_its_map():
    """The stage of the test above, with tokens that do fill the grid."""
    adapter = TokenAdapter(Tokenize())
    image = torch.arange(15.0).reshape(3, 1, 5)  # class token and 4 patches
    cams = stage_cams(adapter, image, stages=[0], method="activation")
    patches = image[:, 0, 1:].reshape(3, 2, 2).abs().mean(0)
    expect = (patches - patches.min()) / (patches.max() - patches.min())
    small = compute_cams(adapter, [image], list_stages(adapter), "activation", as_target(None))
    torch.testing.assert_close(small.maps["00_body"][0], expect)
    assert tuple(cams["00_body"].shape) == (1, 1, 5)  # resized to the input


def test_layercam_of_a_vit_block_is_computed_on_its_token_map():
    torch.manual_seed(0)  # weights and an input whose map is not flat
    model, x = vit(), torch.rand(1, 3, 32, 64)
    adapter = adapt(model)
    stages = [s for s in list_stages(model) if s.name == "blocks.0"]
    result = compute_cams(adapter, [x[0]], stages, "layercam", as_target(None))
    small = result.maps["00_blocks.0"][0]
    assert tuple(small.shape) == (2, 4)  # the patch grid

    kept = {}  # by hand: the gradient of the top class's score towards the block's tokens
    block = model.blocks[0]
    handle = block.register_forward_hook(lambda m, a, out: kept.setdefault("tokens", out))
    with torch.enable_grad():
        scores = model(x.clone().requires_grad_(True))
        tokens = kept["tokens"]
        (grad,) = torch.autograd.grad(scores[0, scores[0].argmax()], tokens)
    handle.remove()
    a = tokens.detach()[0, 3:].reshape(2, 4, -1)
    g = grad[0, 3:].reshape(2, 4, -1)
    cam = (g.clamp(min=0) * a).sum(-1).clamp(min=0)
    assert cam.max() > 0 and cam.min() < cam.max()
    cam = cam / cam.max()
    expect = (cam - cam.min()) / (cam.max() - cam.min())
    torch.testing.assert_close(small, expect, atol=1e-5, rtol=1e-4)
    full = stage_cams(model, x, stages=["blocks.0"])
    assert tuple(full["00_blocks.0"].shape) == (1, 32, 64)


def known_answer_vit() -> nn.Module:
    """A one-block ViT whose class ``k`` is the mean over the patches of input channel
    ``k``: the patch embedding averages each colour of a patch into token channel 0..2, the
    block passes tokens through (its attention and MLP write zeros into the residual), no
    position embedding, no norm, and the head reads token channel ``k`` for class ``k``."""
    model = vit(reg_tokens=0, global_pool="avg", depth=1)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        conv = model.patch_embed.proj
        for k in range(3):
            conv.weight[k, k] = 1.0 / conv.weight[k, k].numel()
        model.head.weight[:, :3] = torch.eye(3)
    model.norm, model.fc_norm = nn.Identity(), nn.Identity()
    return model


def test_layercam_of_a_known_answer_vit_peaks_on_the_patch_that_holds_each_classs_evidence():
    model = known_answer_vit()
    x = torch.full((1, 3, 32, 64), 0.1)
    where = {0: (0, 1), 1: (1, 3), 2: (1, 0)}  # class -> (row, column) of its 2x4 patch grid
    for k, (r, c) in where.items():
        x[0, k, 16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)] = 1.0
    stages = [s for s in list_stages(model) if s.name == "blocks.0"]
    for k, (r, c) in where.items():
        maps = compute_cams(adapt(model), [x[0]], stages, "layercam", as_target(k)).maps
        small = maps["00_blocks.0"][0]
        assert tuple(small.shape) == (2, 4)
        assert divmod(int(small.argmax()), 4) == (r, c)  # the map peaks on the evidence
        assert small[r, c] == 1 and small.sum() == 1  # and only there (min-max scaled)


# ------------------------------------------------------------------ Hugging Face
SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    image_size=32, patch_size=8,
)  # fmt: skip


def test_hugging_face_vit_layers_are_stages_and_their_grids_are_hidden_states_reshaped(tmp_path):
    hf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = hf.ViTForImageClassification(hf.ViTConfig(**SMALL, num_labels=3)).eval()
    stages = list_stages(model)
    assert len(stages) == model.config.num_hidden_layers
    assert {s.tokens for s in stages} == {
        TokenLayout(prefix=1, cls=True, stride=(8, 8), rounding="down")
    }
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states  # embeddings, then layers
    fmap = hidden[2][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    logger = FeatureLogger(model, tmp_path, stages=[1], **GRID)
    logger.log(x, step=0)
    logger.close()
    events = read_events(tmp_path)
    key = stages[1].key
    (event,) = events.Images(f"features/{key}/0")
    np.testing.assert_array_equal(decode(event), colorize(feature_grid(fmap, **GRID)[0]))
    cls_mean = hidden[2][:, 0].mean().item()
    assert scalar(events, f"stats/{key}/cls/mean") == pytest.approx(cls_mean, rel=1e-5)

    small = compute_cams(adapt(model), [x[0]], stages[:1], "layercam", as_target(None))
    assert tuple(small.maps[stages[0].key][0].shape) == (4, 4)  # the classifier's logits
    assert tuple(stage_cams(model, x, stages=[0])[stages[0].key].shape) == (1, 32, 32)


def test_dinov2_register_tokens_are_left_out_of_the_map(tmp_path):
    """At a non-square size the patch size does not divide: DINOv2 interpolates its
    position embedding and its patch embedding leaves the remainder out (5x7 patches)."""
    hf = pytest.importorskip("transformers")
    config = hf.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4)
    model = hf.Dinov2WithRegistersModel(config).eval()
    stages = list_stages(model)
    assert [s.tokens.prefix for s in stages] == [5, 5]  # class token and 4 registers
    x = torch.rand(1, 3, 44, 60)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
    assert hidden[1].shape[1] == 5 + 5 * 7
    logger = FeatureLogger(model, tmp_path, stages=[0], **GRID)
    logger.log(x, step=0)
    logger.close()
    events = read_events(tmp_path)
    fmap = hidden[1][:, 5:].reshape(1, 5, 7, 32).permute(0, 3, 1, 2)
    (event,) = events.Images(f"features/{stages[0].key}/0")
    np.testing.assert_array_equal(decode(event), colorize(feature_grid(fmap, **GRID)[0]))
    mean = scalar(events, f"stats/{stages[0].key}/mean")
    assert mean == pytest.approx(fmap.mean().item(), rel=1e-5)


def test_the_models_image_processor_prepares_the_probes(tmp_path):
    hf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = hf.ViTForImageClassification(hf.ViTConfig(**SMALL, num_labels=3)).eval()
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    processor = hf.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=mean,
                                     image_std=std)  # fmt: skip
    x = torch.randint(0, 256, (3, 32, 32)) / 255  # whole 8-bit levels, as a file gives
    by_hand = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    # the processor takes tbfeat's [0, 1] pixels as they are (no second 1/255 rescale)
    seen = processor(images=x, do_rescale=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(seen[0], by_hand, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # (its arithmetic, float64 in transformers 4, is the model's input)
        hidden = model(seen, output_hidden_states=True).hidden_states
    fmap = hidden[1][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    logger = FeatureLogger(model, tmp_path, stages=[0], preprocess=processor, **GRID)
    logger.log([x, torch.rand(3, 48, 80)], step=0, names=["same", "resized"])
    logger.close()
    events = read_events(tmp_path)
    key = list_stages(model)[0].key
    (event,) = events.Images(f"features/{key}/same")
    expect = colorize(feature_grid(fmap, **GRID)[0])
    np.testing.assert_array_equal(decode(event), expect)
    (event,) = events.Images(f"features/{key}/resized")  # resized to 32x32: a 4x4 grid
    assert decode(event).shape == expect.shape


def test_a_vit_run_at_another_size_maps_the_grid_of_that_size(tmp_path):
    """A Hugging Face ViT called with interpolate_pos_encoding in the user's own forward,
    and a timm ViT of dynamic_img_size, at a non-square size: the grid of that input."""
    hf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = hf.ViTModel(hf.ViTConfig(**SMALL)).eval(), torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
        with FeatureLogger(model, tmp_path / "hf", stages=[1], **GRID):
            model(pixel_values=x, interpolate_pos_encoding=True)
    fmap = hidden[2][:, 1:].reshape(1, 5, 7, 32).permute(0, 3, 1, 2)
    events = read_events(tmp_path / "hf")
    (event,) = events.Images(f"features/{list_stages(model)[1].key}/0")
    np.testing.assert_array_equal(decode(event), colorize(feature_grid(fmap, **GRID)[0]))

    # (no register tokens: timm 1.0.3 cannot run them at another size)
    net, x = vit(dynamic_img_size=True, reg_tokens=0), torch.rand(1, 3, 48, 80)
    logger = FeatureLogger(net, tmp_path / "timm", stages=["blocks.1"], **GRID)
    logger.log(x, step=0)
    logger.close()
    tokens = output_of(net, "blocks.1", x)  # a class token, then 3x5 patches
    fmap = tokens[:, 1:].reshape(1, 3, 5, -1).permute(0, 3, 1, 2)
    (event,) = read_events(tmp_path / "timm").Images("features/01_blocks.1/0")
    np.testing.assert_array_equal(decode(event), colorize(feature_grid(fmap, **GRID)[0]))


def test_a_dinov2_backbone_logs_the_layers_its_out_features_name(tmp_path):
    """Without its final layer norm, a Dinov2Backbone's feature maps are those layers'
    patch tokens reshaped: what tbfeat logs of them, bit for bit, at a non-square size."""
    hf = pytest.importorskip("transformers")
    config = hf.Dinov2Config(**{**SMALL, "num_hidden_layers": 3}, apply_layernorm=False,
                             out_features=["stage1", "stage3"])  # fmt: skip
    model = hf.Dinov2Backbone(config).eval()
    stages = list_stages(model)
    assert [(s.key, s.name) for s in stages] == [
        ("00_stage1", "encoder.layer.0"), ("01_stage3", "encoder.layer.2")
    ]
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        maps = model(x).feature_maps
    assert [tuple(m.shape) for m in maps] == [(1, 32, 5, 7)] * 2
    logger = FeatureLogger(model, tmp_path, **GRID)
    logger.log(x, step=0)
    logger.close()
    events = read_events(tmp_path)
    for stage, fmap in zip(stages, maps, strict=True):
        (event,) = events.Images(f"features/{stage.key}/0")
        np.testing.assert_array_equal(decode(event), colorize(feature_grid(fmap, **GRID)[0]))


def test_a_hugging_face_model_of_another_family_takes_its_image_processor(tmp_path):
    """A family tbfeat has no stage rules for (a ResNet classifier): its children are
    its stages, as for any module, and preprocess= still takes an image processor."""
    hf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = hf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = hf.ResNetForImageClassification(config).eval()
    assert [s.name for s in list_stages(model)] == ["resnet", "classifier"]
    processor = hf.ViTImageProcessor(size={"height": 32, "width": 32})
    x = torch.randint(0, 256, (3, 50, 40)) / 255
    logger = FeatureLogger(model, tmp_path, stages=[0], preprocess=processor, **GRID)
    logger.log(x, step=0)
    logger.close()
    seen = processor(images=x, do_rescale=False, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        fmap = model.resnet(seen).last_hidden_state
    (event,) = read_events(tmp_path).Images("features/00_ResNetModel/last_hidden_state/0")
    np.testing.assert_array_equal(decode(event), colorize(feature_grid(fmap, **GRID)[0]))
