"""Tags: every tag tbfeat writes is built and parsed by tbfeat.tags and round-trips; the
custom scalars charts select exactly their tags with TensorBoard's own matching; the run
metadata read back equals the stages as the model computed them."""

import json

import numpy as np
import pytest
import torch
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar import custom_scalars_plugin
from tensorboard.plugins.custom_scalar import metadata as custom_scalars_metadata
from tensorboard.plugins.scalar import scalars_plugin
from torch import nn

from tbfeat import STAT_NAMES, FeatureLogger, tags
from tbfeat.pictures import LEVELS, palette
from tbfeat.tags import Grid, Output, RunInfo, Tag

from .helpers import decode, read_events

BASES = [
    "00_Conv2d",
    "04.00_layer1.0.conv1",  # a deeper module: dots
    "05_Concat/1",  # an output position
    "01_Multi/1_p3",  # a dict key
    "20.00_rpn.head.conv/call1_0",  # a shared module's second call
    "10_head-v2",
    "07_a[0]+b*(c)",  # a label an integration chose: regex-special characters
    "03_pool_1",
]
IMAGES = ["bus", "bus_1", "0", "val.000", "a-b", "img[1]+(2)*"]


def every_tag(base: str) -> list[tuple[str, Tag]]:
    """Each builder's tag of ``base`` with the :class:`Tag` it must parse to."""
    out = [(tags.features(base, i), Tag("features", base, image=i)) for i in IMAGES]
    out += [(tags.cam(base, i), Tag("cam", base, image=i)) for i in IMAGES]
    out += [(tags.stats(base, s), Tag("stats", base, stat=s)) for s in STAT_NAMES]
    out += [
        (tags.activations(base), Tag("activations", base)),
        (tags.drift(base), Tag("drift", base)),
        (tags.drift(base, vs_first=True), Tag("drift", base, vs_first=True)),
        (tags.evolution(base), Tag("evolution", base)),
    ]
    return out


@pytest.mark.parametrize("base", BASES)
def test_every_builder_round_trips_through_the_parser(base):
    for tag, expected in every_tag(base):
        assert tag.count(base) == 1, tag
        parsed = tags.parse(tag)
        assert parsed == expected, tag
        assert str(parsed) == tag and tags.build(expected) == tag
    assert tags.parse(tags.OVERVIEW) == Tag("overview")
    assert tags.parse(tags.RUN) == Tag("run")
    assert str(Tag("overview")) == "overview/drift" and str(Tag("run")) == "tbfeat/run"


def test_the_tag_strings_are_the_logged_format():
    assert tags.features("05_Concat/1", "bus") == "features/05_Concat/1/bus"
    assert tags.cam("09_SPPF", "bus_1") == "cam/09_SPPF/bus_1"
    assert tags.activations("00_Conv") == "activations/00_Conv"
    assert tags.stats("01_Multi/0_1", "mean") == "stats/01_Multi/0_1/mean"
    assert tags.drift("00_Conv2d") == "drift/00_Conv2d"
    assert tags.drift("00_Conv2d", vs_first=True) == "drift/00_Conv2d_vs_first"
    assert tags.evolution("09_SPPF") == "evolution/09_SPPF"
    parsed = tags.parse("features/20.00_rpn.head.conv/call1/0")
    assert (parsed.base, parsed.stage, parsed.output, parsed.image) == (
        "20.00_rpn.head.conv/call1",
        "20.00_rpn.head.conv",
        "call1",
        "0",
    )
    assert tags.parse("stats/09_SPPF/mean").output is None


@pytest.mark.parametrize(
    "tag",
    [
        "train/box_loss",
        "lr/pg0",
        "metrics/mAP50(B)",
        "val/cls_loss",
        "loss",
        "after/close",
        custom_scalars_metadata.CONFIG_SUMMARY_TAG,
        "features/09_SPPF",  # no image
        "features/09_SPPF/",  # an empty image
        "features/bus/0",  # no stage number
        "cam//0",
        "stats/09_SPPF",  # no statistic
        "stats/lr/pg0",
        "activations/",
        "drift/",
        "drift/_vs_first",
        "drift/03_x_vs_first_vs_first",  # a base drift() refuses
        "evolution/x",
        "overview/other",
        "tbfeat/other",
        "features/00_a//0",
    ],
)
def test_the_parser_leaves_other_tags_alone(tag):
    assert tags.parse(tag) is None


def test_builders_refuse_what_would_not_parse_back():
    with pytest.raises(ValueError, match="'bus/1'"):
        tags.features("00_Conv", "bus/1")
    with pytest.raises(ValueError, match="non-empty"):
        tags.cam("00_Conv", "")
    with pytest.raises(ValueError, match="'layer1'"):
        tags.stats("layer1", "mean")
    with pytest.raises(ValueError, match="'00_a//1'"):
        tags.activations("00_a//1")
    with pytest.raises(TypeError, match="int"):
        tags.evolution(3)
    # its drift against the step before would read as 03_x's against the first step
    with pytest.raises(ValueError, match="'03_x_vs_first'"):
        tags.drift("03_x_vs_first")
    with pytest.raises(ValueError, match="kind"):
        tags.build(Tag("image", "00_a"))


def test_a_pattern_matches_exactly_its_tags():
    import re

    one = tags.pattern(tags.drift("04.00_a.b"))
    assert re.match(one, "drift/04.00_a.b")
    for other in ("drift/04.00_a.b_vs_first", "drift/04x00_a.b", "xdrift/04.00_a.b"):
        assert not re.match(one, other), other
    odd = [tags.features("07_a[0]+b*(c)", "img[1]+(2)*"), tags.evolution("10_head-v2")]
    both = tags.pattern(*odd)
    assert all(re.match(both, t) for t in odd)
    assert not re.match(both, odd[1] + "_1")
    with pytest.raises(ValueError):
        tags.pattern()


def test_run_info_round_trips_through_its_json():
    info = RunInfo((
        Output("00_Conv2d", "Conv2d", "Conv2d", "0", (6, 12, 12),
               (("bus", (6, 12, 12)), ("bus_1", (6, 12, 12))), Grid((4, 0, 2), 2, (6, 6), 2)),
        Output("03_Pair/1", "Pair", "Pair", "3", (2, 6, 6)),
        Output("04_Flatten", "Flatten", "Flatten", "4", (864,)),
    ))  # fmt: skip
    data = tags.encode_run(info)
    doc = json.loads(data.decode("utf-8"))
    assert doc["version"] == 1
    assert [o["base"] for o in doc["outputs"]] == list(info.order)
    assert doc["outputs"][0]["images"] == {"bus": [6, 12, 12], "bus_1": [6, 12, 12]}
    assert doc["outputs"][0]["grid"] == {"channels": [4, 0, 2], "ncols": 2, "tile": [6, 6],
                                         "pool": 2}  # fmt: skip
    assert tags.decode_run(data) == info
    with pytest.raises(ValueError, match="version 2"):
        tags.decode_run(json.dumps({**doc, "version": 2}))
    with pytest.raises(ValueError, match="not tbfeat run metadata"):
        tags.decode_run(b'{"version": 1}')


# --------------------------------------------------------------------------- a real run
class Pair(nn.Module):
    """A stage with a tuple output: the map, and two of its channels at half the size."""

    def forward(self, x):
        return x, x[:, :2, ::2, ::2]


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), Pair()
    )


def nudge(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        model[0].weight.add_(0.3 * torch.randn(model[0].weight.shape, generator=g))


def served(logdir):
    """TensorBoard's own backend over ``logdir`` (one run, ``.``): the custom scalars
    plugin (with the scalars plugin it asks) and the data provider."""
    mux = plugin_event_multiplexer.EventMultiplexer({".": str(logdir)})
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    plugins = {}
    tb = base_plugin.TBContext(
        logdir=str(logdir), data_provider=provider, multiplexer=mux,
        plugin_name_to_instance=plugins,
    )  # fmt: skip
    plugins["scalars"] = scalars_plugin.ScalarsPlugin(tb)
    plugins["custom_scalars"] = custom_scalars_plugin.CustomScalarsPlugin(tb)
    return plugins["custom_scalars"], provider


def test_every_tag_of_a_logged_run_parses_and_rebuilds(tmp_path):
    model = small_model()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    logger = FeatureLogger(model, logdir=tmp_path, cam="activation", max_channels=4)
    for step in (1, 2, 3):
        nudge(model, step)
        logger.log(x, step=step, names=["a.b", "a.b"])
    logger.close()
    acc = read_events(tmp_path, derived=True, metadata=True)
    listed = acc.Tags()
    written = [t for k in ("images", "scalars", "histograms", "tensors") for t in listed[k]]
    written.remove(custom_scalars_metadata.CONFIG_SUMMARY_TAG)  # TensorBoard's own
    assert len(written) > 50
    parsed = {}
    for tag in written:
        p = tags.parse(tag)
        assert p is not None, tag
        assert str(p) == tag
        parsed[tag] = p
    assert {p.kind for p in parsed.values()} == set(tags.KINDS)
    assert {p.base for p in parsed.values() if p.kind == "features"} == {
        "00_Conv2d", "01_ReLU", "02_Conv2d", "03_Pair/0", "03_Pair/1"
    }  # fmt: skip
    assert {p.image for p in parsed.values() if p.image} == {"a.b", "a.b_1"}
    # derived tags are left out of the default listing, the metadata too
    plain = read_events(tmp_path).Tags()
    assert tags.RUN not in plain["tensors"]
    assert not any(t.startswith("drift/") for t in plain["scalars"])

    # each custom scalars chart draws exactly its tags, as TensorBoard serves them
    plugin, _ = served(tmp_path)
    layout = json.loads(plugin.layout_impl(context.RequestContext(), experiment=""))
    (category,) = layout["category"]
    charts = {c["title"]: c["multiline"]["tag"] for c in category["chart"]}
    drift = [p for p in parsed.values() if p.kind == "drift"]
    stats = {p.base for p in parsed.values() if p.kind == "stats"}
    expected = {
        "drift vs the step before": {str(p) for p in drift if not p.vs_first},
        "drift vs the first step": {str(p) for p in drift if p.vs_first},
        "zero fraction": {tags.stats(b, "zero_fraction") for b in stats},
        "non-finite count": {tags.stats(b, "nonfinite_count") for b in stats},
    }
    assert len(expected["drift vs the step before"]) == 5
    drawn = {}
    for title, patterns in charts.items():
        drawn[title] = set()
        for pattern in patterns:
            answer = plugin.scalars_impl(context.RequestContext(), ".", pattern, "")
            assert answer["regex_valid"], pattern
            drawn[title] |= set(answer["tag_to_events"])
    assert drawn == expected
    assert not any(t.endswith("_vs_first") for t in drawn["drift vs the step before"])


def test_the_run_metadata_is_the_stages_as_computed(tmp_path):
    """Stage order, shapes and shown channels read back equal what forward hooks see, and
    a grid's tile shows the channel the metadata names; a change of shape is written."""
    model = small_model()
    seen = []  # (module name, output) in the order the forward gave them
    for name, child in model.named_children():
        child.register_forward_hook(lambda m, i, o, name=name: seen.append((name, o)))
    logger = FeatureLogger(
        model, logdir=tmp_path, cam=None, channels="strongest", max_channels=3, ncols=2,
        tile=6,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    inputs = {1: torch.rand(2, 3, 12, 12, generator=g), 2: torch.rand(2, 3, 12, 12, generator=g)}
    inputs[3] = torch.rand(2, 3, 16, 16, generator=g)
    outputs = {}
    for step, x in inputs.items():
        seen.clear()
        nudge(model, step)
        logger.log(x, step=step, names=["bus", "bus"])
        outputs[step] = list(seen)
    logger.close()

    acc = read_events(tmp_path, metadata=True)
    written = acc.run_info()
    assert [s for s, _ in written] == [1, 3]  # step 2 changed nothing
    labels = {"0": "Conv2d", "1": "ReLU", "2": "Conv2d", "3": "Pair"}
    first = {}  # the channels chosen at the first step stay (the grids compare)
    for step, info in written:
        expected = []  # (base, module name, one image's output)
        for i, (name, out) in enumerate(outputs[step]):
            key = f"{i:02d}_{labels[name]}"
            parts = [(f"{key}/{j}", t) for j, t in enumerate(out)] if name == "3" else [(key, out)]
            expected += [(base, name, t) for base, t in parts]
        assert info.order == tuple(b for b, _, _ in expected)
        for o, (base, name, t) in zip(info.outputs, expected, strict=True):
            assert (o.module, o.type, o.label) == (name, labels[name], labels[name])
            assert o.shape == tuple(t.shape[1:])
            assert o.images == (("bus", tuple(t.shape[1:])), ("bus_1", tuple(t.shape[1:])))
            strongest = numpy_strongest(t.numpy(), 3)
            first.setdefault(base, strongest)
            h, w = t.shape[-2:]
            k = -(-max(h, w) // 6)
            assert o.grid == Grid(first[base], min(2, len(strongest)), (-(-h // k), -(-w // k)), k)
    grid = written[0][1].outputs[0].grid
    assert grid.channels != (0, 1, 2) and grid.pool == 2  # not the first channels: a real test
    # the third tile (row 1, column 0) of image bus_1's grid at step 1 shows its channel
    conv = outputs[1][0][1][1].numpy()  # image bus_1 of stage 00_Conv2d
    (event,) = [e for e in acc.Images("features/00_Conv2d/bus_1") if e.step == 1]
    rgb = decode(event)
    th, tw = grid.tile
    assert rgb.shape[:2] == (2 * (th + 1) - 1, 2 * (tw + 1) - 1)
    tile = rgb[th + 1 : 2 * th + 1, :tw]
    assert np.array_equal(tile, palette("viridis")[numpy_tile(conv[grid.channels[2]], 2)])
    assert not np.array_equal(tile, palette("viridis")[numpy_tile(conv[grid.channels[1]], 2)])


def numpy_strongest(x: np.ndarray, k: int) -> tuple[int, ...]:
    """The ``k`` channels of largest mean over images and positions (non-finite as 0),
    largest first."""
    x = np.where(np.isfinite(x), x, 0.0).astype(np.float64)
    strength = x.mean(axis=(0, 2, 3))
    return tuple(int(c) for c in np.argsort(-strength, kind="stable")[: min(k, x.shape[1])])


def numpy_tile(m: np.ndarray, k: int) -> np.ndarray:
    """Palette indices of one channel's map, ``k x k`` average-pooled and scaled to its
    own finite min/max, in float32 as the grid computes them."""
    h, w = m.shape
    assert h % k == 0 and w % k == 0
    acc = np.zeros((h // k, w // k), np.float32)
    for dy in range(k):  # the window's values summed row by row, then divided
        for dx in range(k):
            acc = acc + m[dy::k, dx::k].astype(np.float32)
    pooled = acc / np.float32(k * k)
    lo, hi = pooled.min(), pooled.max()
    span = max(hi - lo, max(abs(lo), abs(hi)) * np.float32(1e-5))
    return np.round((pooled - lo) / span * np.float32(LEVELS - 1)).astype(np.uint8)


def test_the_run_metadata_stays_out_of_tensorboards_dashboards(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    model = small_model()
    x = torch.rand(1, 3, 12, 12)
    with SummaryWriter(tmp_path / "given") as writer:  # a user's writer gets it too
        logger = FeatureLogger(model, writer=writer, cam=None)
        logger.log(x, step=1)
        logger.close()
    ((step, info),) = read_events(tmp_path / "given", metadata=True).run_info()
    assert step == 1 and info.order == ("00_Conv2d", "01_ReLU", "02_Conv2d", "03_Pair/0",
                                        "03_Pair/1")  # fmt: skip
    _, provider = served(tmp_path / "given")
    ctx = context.RequestContext()
    shown = set()
    for plugin in ("scalars", "images", "histograms", "distributions", "text", "custom_scalars"):
        for listing in (provider.list_scalars, provider.list_tensors):
            shown |= set(listing(ctx, experiment_id="", plugin_name=plugin).get(".", {}))
        blobs = provider.list_blob_sequences(ctx, experiment_id="", plugin_name=plugin)
        shown |= set(blobs.get(".", {}))
    assert "features/00_Conv2d/0" in shown and tags.RUN not in shown
    ours = provider.list_tensors(ctx, experiment_id="", plugin_name=tags.PLUGIN_NAME)
    assert set(ours["."]) == {tags.RUN}
    content = json.loads(ours["."][tags.RUN].plugin_content)
    assert content == {"version": 1}
