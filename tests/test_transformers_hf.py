"""Hugging Face Swin, ConvNeXt, DETR and RT-DETR: each family's own stages, and the maps
logged against hand reshapes of what the model itself returns or hands to its decoder."""

import numpy as np
import pytest
import torch
from torch import nn

from tbfeat import FeatureLogger, list_stages, stage_cams
from tbfeat.adapters import adapt
from tbfeat.render import colorize, feature_grid
from tbfeat.tokens import TokenLayout, split

from .helpers import decode, read_events

hf = pytest.importorskip("transformers")

GRID = dict(max_channels=6, ncols=3)  # small grids, the same options on both sides
SWIN = dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 2], num_heads=[1, 2],
            window_size=2, num_labels=3)  # fmt: skip
CONVNEXT = dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)


def swin(cls=None, **kwargs):
    torch.manual_seed(0)
    return (cls or hf.SwinModel)(hf.SwinConfig(**SWIN, **kwargs)).eval()


def convnext(cls, **kwargs):
    torch.manual_seed(0)
    return cls(hf.ConvNextConfig(**CONVNEXT, **kwargs)).eval()


def detr():
    torch.manual_seed(0)
    backbone = hf.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
        out_features=["stage1", "stage2"],
    )  # fmt: skip
    config = hf.DetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=5,
        num_labels=3,
    )  # fmt: skip
    return hf.DetrForObjectDetection(config).eval()


def rt_detr():
    torch.manual_seed(0)
    backbone = hf.RTDetrResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = hf.RTDetrConfig(
        backbone_config=backbone, use_pretrained_backbone=False, encoder_hidden_dim=16,
        encoder_in_channels=[16, 16, 16], feat_strides=[8, 16, 32], encoder_ffn_dim=16,
        encoder_layers=1, encoder_attention_heads=2, d_model=16, decoder_layers=1,
        decoder_ffn_dim=16, decoder_attention_heads=2, decoder_in_channels=[16, 16, 16],
        num_feature_levels=3, num_queries=5, num_labels=3, num_denoising=0,
    )  # fmt: skip
    return hf.RTDetrForObjectDetection(config).eval()


def pre_merging(model, x) -> tuple:
    """The stem's and each stage's tokens before its patch merging, reshaped, as
    transformers computes them: its encoder's ``output_hidden_states_before_downsampling``
    (the model's own keyword is new in transformers 5, and 5.0 does not pass it on)."""
    inner = getattr(model, "swin", model)
    with torch.no_grad():
        tokens, size = inner.embeddings(x)
        out = inner.encoder(tokens, size, output_hidden_states=True,
                            output_hidden_states_before_downsampling=True)  # fmt: skip
    return out.reshaped_hidden_states


def resnet_of(detector):
    """The Hugging Face ResNet backbone inside a DETR or an RT-DETR."""
    return next(m for m in detector.modules() if hasattr(m, "out_features") and
                type(m).__name__.endswith("ResNetBackbone"))  # fmt: skip


def logged(model, x, tmp_path, **kwargs):
    """``FeatureLogger(model, tmp_path).log(x, step=0)``, read back; and its stages."""
    logger = FeatureLogger(model, tmp_path, cam=kwargs.pop("cam", None), **GRID, **kwargs)
    logger.log(x, step=0)
    logger.close()
    return read_events(tmp_path), list_stages(model)


def assert_map(events, key: str, fmap: torch.Tensor) -> None:
    """The image and mean logged for stage ``key`` are those of ``fmap`` (1, C, H, W)."""
    (event,) = events.Images(f"features/{key}/0")
    np.testing.assert_array_equal(decode(event), colorize(feature_grid(fmap, **GRID)[0]))
    (mean,) = events.Scalars(f"stats/{key}/mean")
    assert mean.value == pytest.approx(fmap.mean().item(), rel=1e-5, abs=1e-6)


def inputs_of(module, x, model, kwarg: str | None = None):
    """What ``module`` returns (or, with ``kwarg``, is called with) in a forward of ``x``."""
    seen = {}
    if kwarg is None:
        handle = module.register_forward_hook(lambda m, a, out: seen.setdefault("v", out))
    else:
        handle = module.register_forward_pre_hook(
            lambda m, a, kw: seen.setdefault("v", kw) and None, with_kwargs=True
        )
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["v"] if kwarg is None else seen["v"][kwarg]


# ------------------------------------------------------------------ default stages
@pytest.mark.parametrize("cls", ["SwinModel", "SwinForImageClassification"])
def test_swin_models_log_every_stage_of_config_depths_as_input_sized_tokens(cls):
    model = swin(getattr(hf, cls))
    stages = list_stages(model)
    assert [s.label for s in stages] == model.config.stage_names[1:]  # stage1, stage2
    assert len(stages) == len(model.config.depths)
    assert [s.tokens for s in stages] == [TokenLayout(stride=(4, 4)), TokenLayout(stride=(8, 8))]
    depths = model.config.depths  # each stage's last block, before the patch merging
    assert [s.name[-8:] for s in stages] == [f"blocks.{d - 1}" for d in depths]


def test_backbones_log_their_out_features():
    swin_backbone = swin(hf.SwinBackbone, out_features=["stem", "stage2"])
    stages = list_stages(swin_backbone)
    assert [s.label for s in stages] == swin_backbone.out_features == ["stem", "stage2"]
    assert [s.tokens.stride for s in stages] == [(4, 4), (8, 8)]
    conv_backbone = convnext(hf.ConvNextBackbone, out_features=["stage1", "stage2"])
    stages = list_stages(conv_backbone)
    assert [s.label for s in stages] == conv_backbone.out_features
    assert {s.tokens for s in stages} == {None}  # (N, C, H, W) already


@pytest.mark.parametrize("cls", ["ConvNextModel", "ConvNextForImageClassification"])
def test_convnext_models_log_every_stage(cls):
    model = convnext(getattr(hf, cls))
    stages = list_stages(model)
    assert [s.label for s in stages] == model.config.stage_names[1:]
    assert len(stages) == model.config.num_stages
    assert {s.type for s in stages} == {"ConvNextStage"}


# ------------------------------------------------------------------ maps
def test_swin_stages_of_a_non_square_input_are_its_pre_merging_hidden_states(tmp_path):
    model, x = swin(), torch.rand(1, 3, 36, 52)  # 9x13 patches, then 5x7 (rounded up)
    maps = pre_merging(model, x)[1:]  # the stem first, then each stage before merging
    assert [tuple(m.shape[-2:]) for m in maps] == [(9, 13), (5, 7)]
    events, stages = logged(model, x, tmp_path)
    for stage, fmap in zip(stages, maps, strict=True):
        assert_map(events, stage.key, fmap)


def test_a_with_block_maps_swin_tokens_of_a_forward_called_with_keywords(tmp_path):
    model, x = swin(hf.SwinForImageClassification), torch.rand(1, 3, 40, 24)
    maps = pre_merging(model, x)
    with torch.no_grad(), FeatureLogger(model, tmp_path, cam=None, **GRID) as logger:
        logger.step = 3
        model(pixel_values=x)  # the user's own forward: the input is a keyword
    events = read_events(tmp_path)
    stages = list_stages(model)
    assert tuple(maps[2].shape[-2:]) == (5, 3)
    for stage, fmap in zip(stages, maps[1:], strict=True):
        assert_map(events, stage.key, fmap)
    assert [e.step for e in events.Scalars(f"stats/{stages[1].key}/mean")] == [3]


def test_swin_backbone_stages_are_its_feature_maps(tmp_path):
    model, x = swin(hf.SwinBackbone, out_features=["stage1", "stage2"]), torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        maps = model(x).feature_maps
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 12), (4, 6)]
    events, stages = logged(model, x, tmp_path)
    for stage, fmap in zip(stages, maps, strict=True):
        assert_map(events, stage.key, fmap)


def test_convnext_stages_are_its_hidden_states_and_feature_maps(tmp_path):
    x = torch.rand(1, 3, 32, 48)
    model = convnext(hf.ConvNextForImageClassification)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states[1:]
    events, stages = logged(model, x, tmp_path / "model")
    for stage, fmap in zip(stages, hidden, strict=True):
        assert_map(events, stage.key, fmap)
    backbone = convnext(hf.ConvNextBackbone, out_features=["stage1", "stage2"])
    with torch.no_grad():
        maps = backbone(x).feature_maps
    events, stages = logged(backbone, x, tmp_path / "backbone")
    for stage, fmap in zip(stages, maps, strict=True):
        assert_map(events, stage.key, fmap)


# ------------------------------------------------------------------ detectors
DETECTION_PARTS = ("decoder", "class_labels_classifier", "bbox", "enc_score_head", "enc_output",
                   "query", "logits", "boxes")  # fmt: skip


def no_detection_tags(events) -> None:
    tags = [t for kind in ("images", "scalars", "histograms") for t in events.Tags()[kind]]
    assert tags and not [t for t in tags if any(p in t for p in DETECTION_PARTS)]


def test_detr_logs_backbone_stages_its_projected_level_and_the_encoders_tokens(tmp_path):
    model, x = detr(), torch.rand(1, 3, 64, 96)
    backbone = resnet_of(model)
    feature_maps = inputs_of(backbone, x, model).feature_maps
    projected = inputs_of(model.model.input_projection, x, model)
    memory = inputs_of(model.model.decoder, x, model, kwarg="encoder_hidden_states")
    events, stages = logged(model, x, tmp_path)
    assert [s.label for s in stages] == [*backbone.out_features, "level_0", "encoder"]
    no_detection_tags(events)
    for stage, fmap in zip(stages[:2], feature_maps, strict=True):
        assert_map(events, stage.key, fmap)
    assert tuple(projected.shape) == (1, 16, 8, 12)  # the input over the stride of 8
    assert_map(events, stages[2].key, projected)
    tokens = memory.reshape(1, 8, 12, 16).permute(0, 3, 1, 2)  # what the decoder reads
    assert_map(events, stages[3].key, tokens)


def test_a_detr_with_a_timm_backbone_logs_the_stages_of_its_feature_info(tmp_path):
    """DETR's default backbone is timm's (use_timm_backbone): its stages and their
    reduction come from timm's own feature_info, here a ResNet-18's (32 at the last)."""
    config = hf.DetrConfig(
        backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False,
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=5,
        num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model, x = hf.DetrForObjectDetection(config).eval(), torch.rand(1, 3, 70, 90)
    timm_net = next(m for m in model.modules() if hasattr(getattr(m, "feature_info", None),
                                                          "get_dicts"))  # fmt: skip
    feature_maps = inputs_of(timm_net, x, model)
    projected = inputs_of(model.model.input_projection, x, model)
    memory = inputs_of(model.model.decoder, x, model, kwarg="encoder_hidden_states")
    events, stages = logged(model, x, tmp_path)
    modules = [d["module"] for d in timm_net.feature_info.get_dicts()]
    assert [s.label for s in stages] == [*modules, "level_0", "encoder"]
    no_detection_tags(events)
    for stage, fmap in zip(stages[: len(modules)], feature_maps, strict=True):
        assert_map(events, stage.key, fmap)
    assert tuple(projected.shape[-2:]) == (3, 3)  # 70x90 over 32, rounded up
    assert_map(events, stages[-1].key, memory.reshape(1, 3, 3, 16).permute(0, 3, 1, 2))


def test_rt_detr_logs_backbone_stages_and_each_level_its_decoder_reads(tmp_path):
    model, x = rt_detr(), torch.rand(1, 3, 64, 96)
    backbone = resnet_of(model)
    feature_maps = inputs_of(backbone, x, model).feature_maps
    flat = inputs_of(model.model.decoder, x, model, kwarg="encoder_hidden_states")
    shapes = inputs_of(model.model.decoder, x, model, kwarg="spatial_shapes").tolist()
    events, stages = logged(model, x, tmp_path)
    levels = [f"level_{i}" for i in range(model.config.num_feature_levels)]
    assert [s.label for s in stages] == [*backbone.out_features, *levels]
    no_detection_tags(events)
    for stage, fmap in zip(stages[:3], feature_maps, strict=True):
        assert_map(events, stage.key, fmap)
    assert shapes == [[8, 12], [4, 6], [2, 3]]
    chunks = flat.split([h * w for h, w in shapes], dim=1)
    for stage, chunk, (h, w) in zip(stages[3:], chunks, shapes, strict=True):
        assert_map(events, stage.key, chunk.reshape(1, h, w, 16).permute(0, 3, 1, 2))


def test_detector_cams_explain_the_query_class_logits():
    model, x = detr(), torch.rand(1, 3, 64, 96)
    tap = adapt(model).score_tap(model)
    with torch.no_grad():
        logits = model(x).logits[0]  # (queries, classes + "no object")
    ((logit, prob),) = tap.scores(model(x))
    torch.testing.assert_close(logit, logits[:, :-1].t())  # "no object" left out
    torch.testing.assert_close(prob, logits.softmax(-1)[:, :-1].t())
    rt = rt_detr()
    with torch.no_grad():
        out = rt(x)
    ((logit, prob),) = adapt(rt).score_tap(rt).scores(out)
    torch.testing.assert_close(prob, out.logits[0].sigmoid().t())
    cams = stage_cams(model, x, stages=["level_0"])
    assert list(cams) == ["02_level_0"] and tuple(cams["02_level_0"].shape) == (1, 64, 96)


# ------------------------------------------------------------------ token layout
def test_a_stride_gives_the_grid_of_each_input_and_is_validated():
    layout = TokenLayout(stride=(4, 8))
    assert layout.at((36, 52)) == TokenLayout(grid=(9, 7))
    tokens = torch.arange(2 * 63 * 3.0).reshape(2, 63, 3)
    parts = split(tokens, layout.at((36, 52)))
    assert torch.equal(parts.map, tokens.reshape(2, 9, 7, 3).permute(0, 3, 1, 2))
    unseen = split(tokens, layout)
    assert unseen.map is None and "input size" in unseen.problem
    for bad in ({"stride": (0, 4)}, {"stride": (4,)}, {"stride": (4, 4), "grid": (2, 2)},
                {"stride": (4, 4), "channels_last": True}):  # fmt: skip
        with pytest.raises(ValueError, match="stride"):
            TokenLayout(**bad)


def test_a_strided_stage_takes_the_size_of_its_roots_forward_and_of_no_other():
    """The hooks give a stage with a stride the grid of the input its root saw in this
    forward; a call of the stage's module outside a root forward gets no grid (it logs
    statistics only) rather than the last forward's."""
    from tbfeat.hooks import StageHooks
    from tbfeat.stages import Stage

    body = nn.Flatten(2)  # (N, C, H, W) -> (N, C, H*W): tokens, channels first here
    root = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), body)
    stage = Stage(0, "1", "Flatten", body, tokens=TokenLayout(stride=(4, 4)))
    seen = []
    with StageHooks([stage], lambda s, out: seen.append(s.tokens), root=root):
        root(torch.rand(1, 3, 32, 48))
        body(torch.rand(1, 4, 8, 12))  # the same module, not inside its root's forward
    assert seen == [TokenLayout(grid=(8, 12)), TokenLayout(stride=(4, 4))]
