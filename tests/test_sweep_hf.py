"""Sweeps over Hugging Face ``Trainer`` checkpoints: ``checkpoint-<N>`` folders saved as the
Trainer saves them, logged at their ``global_step``, each step's grids against grids of
the saved model's own hidden states."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tbfeat import list_stages
from tbfeat.checkpoints import CheckpointError, find_checkpoints
from tbfeat.integrations.transformers import encoder_layers
from tbfeat.render import colorize, feature_grid
from tbfeat.sweep import plan_sweep, sweep

from .helpers import decode, read_events
from .test_cli import tbfeat_here

hf = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    image_size=32, patch_size=8, num_labels=3,
)  # fmt: skip
CHANNELS = 6  # --max-channels; tiles per row stay the default 8 on both sides


def save_trainer_checkpoint(model, folder, step: int, *, bin_file: bool = False) -> None:
    """A checkpoint folder as ``Trainer`` writes it: ``save_pretrained``, then its state;
    ``bin_file``: the weights in ``pytorch_model.bin`` instead (older transformers)."""
    model.save_pretrained(folder)
    if bin_file:
        from safetensors.torch import load_file

        saved = folder / "model.safetensors"
        torch.save(load_file(saved), folder / "pytorch_model.bin")  # the same keys as saved
        saved.unlink()
    state = {"global_step": step, "epoch": step / 2, "log_history": [{"loss": 1.0, "step": step}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    (folder / "training_args.bin").write_bytes(b"not read")


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """A Trainer's ``output_dir`` with checkpoints at steps 2 and 4 (the weights changed
    between them), the models as saved, and a 32x32 probe image."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = hf.ViTForImageClassification(hf.ViTConfig(**SMALL)).eval()
    saved = {}
    for step in (2, 4):
        save_trainer_checkpoint(model, root / "out" / f"checkpoint-{step}", step)
        saved[step] = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "probe.png")
    return root, saved


def expected_grid(model, image, layer: int) -> np.ndarray:
    """The grid of encoder layer ``layer``: its hidden state's 4x4 patch tokens as a map
    (the class token left out), from a plain forward of the image as read by PIL."""
    x = torch.from_numpy(np.asarray(Image.open(image).convert("RGB"), dtype=np.float32) / 255)
    with torch.no_grad():
        hidden = model(x.permute(2, 0, 1)[None], output_hidden_states=True).hidden_states
    fmap = hidden[layer + 1][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    return colorize(feature_grid(fmap, max_channels=CHANNELS)[0])


def assert_steps_are_the_saved_models(logdir, saved, image) -> None:
    events = read_events(logdir)
    tags = [t for t in events.Tags()["images"] if t.startswith("features/")]
    keys = [s.key for s in list_stages(hf.ViTForImageClassification(hf.ViTConfig(**SMALL)))]
    assert sorted(tags) == [f"features/{k}/probe" for k in keys]  # the two encoder layers
    for layer, tag in enumerate(sorted(tags)):
        grids = events.Images(tag)
        assert [e.step for e in grids] == sorted(saved)
        for event, step in zip(grids, sorted(saved), strict=True):
            np.testing.assert_array_equal(decode(event), expected_grid(saved[step], image, layer))
    first, second = (decode(e) for e in events.Images(tags[0]))
    assert not np.array_equal(first, second)  # the weights changed between the checkpoints


def test_a_trainer_output_dir_sweeps_at_its_global_steps_with_the_model_of_config_json(
    tmp_path, trainer_run
):
    root, saved = trainer_run
    proc = tbfeat_here("sweep", root / "out", "--images", root / "probe.png",
                       "--logdir", tmp_path / "run", "--max-channels", CHANNELS)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "logged steps 2, 4 to" in proc.stdout
    assert_steps_are_the_saved_models(tmp_path / "run", saved, root / "probe.png")


def test_pytorch_model_bin_checkpoints_load_into_the_model_given(tmp_path, trainer_run):
    root, saved = trainer_run
    for step, model in saved.items():
        save_trainer_checkpoint(model, tmp_path / "out" / f"checkpoint-{step}", step, bin_file=True)
    assert not list((tmp_path / "out").rglob("*.safetensors"))

    def build():
        return hf.ViTForImageClassification(hf.ViTConfig(**SMALL))

    folders = [tmp_path / "out" / "checkpoint-4", tmp_path / "out" / "checkpoint-2"]
    result = sweep(folders, images=[root / "probe.png"], logdir=tmp_path / "run", model=build,
                   max_channels=CHANNELS)  # fmt: skip
    assert result.logged == [2, 4]
    assert_steps_are_the_saved_models(tmp_path / "run", saved, root / "probe.png")


def test_the_step_is_global_step_else_the_folders_number(tmp_path, trainer_run):
    root, _ = trainer_run
    out = tmp_path / "out"
    for n in (10, 9):  # natural order: 9 before 10
        (out / f"checkpoint-{n}").mkdir(parents=True)
        (out / f"checkpoint-{n}" / "model.safetensors").write_bytes(b"")
    (out / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 12}')
    (out / "runs").mkdir()  # a Trainer's other folders are not checkpoints
    found = find_checkpoints([out])
    assert [p.name for p in found] == ["checkpoint-9", "checkpoint-10"]
    assert [(p.step, p.kind) for p in plan_sweep(found)] == [(9, "hf"), (12, "hf")]


def test_a_checkpoint_folder_without_weights_is_not_a_checkpoint(tmp_path, trainer_run):
    root, _ = trainer_run
    empty = tmp_path / "checkpoint-3"
    empty.mkdir()
    (empty / "trainer_state.json").write_text('{"global_step": 3}')
    with pytest.raises(CheckpointError, match=r"checkpoint-3' is not a checkpoint: .* holds "
                       r"model\.safetensors or .* pytorch_model\.bin"):  # fmt: skip
        find_checkpoints([tmp_path])
    proc = tbfeat_here("sweep", empty, "--images", root / "probe.png", "--logdir", tmp_path / "r")
    assert proc.returncode == 2 and "checkpoint-3' is not a checkpoint" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_weights_that_do_not_fit_name_the_file_and_keys(tmp_path, trainer_run):
    root, saved = trainer_run
    folder = tmp_path / "checkpoint-2"
    save_trainer_checkpoint(saved[2], folder, 2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    proc = tbfeat_here("sweep", folder, "--images", root / "probe.png", "--logdir", tmp_path / "r")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"checkpoint {str(folder / 'model.safetensors')!r} does not fit " \
           "ViTForImageClassification: missing" in proc.stderr  # fmt: skip
    deeper = hf.ViTForImageClassification(hf.ViTConfig(**{**SMALL, "num_hidden_layers": 3}))
    third = encoder_layers(deeper)[2][0]
    assert f"{third}." in proc.stderr  # the missing layer's keys, as this transformers names them
    no_config = tmp_path / "bare" / "checkpoint-2"
    save_trainer_checkpoint(saved[2], no_config, 2)
    (no_config / "config.json").unlink()
    images = ["--images", root / "probe.png"]
    proc = tbfeat_here("sweep", no_config, *images, "--logdir", tmp_path / "s")
    assert proc.returncode == 2
    assert "holds no config.json to build the model: pass the model" in proc.stderr


def test_sharded_weights_load_from_their_index(tmp_path, trainer_run):
    from tbfeat.hf_checkpoints import load_folder, shards

    _, saved = trainer_run
    saved[4].save_pretrained(tmp_path / "checkpoint-4", max_shard_size="20KB")
    assert (tmp_path / "checkpoint-4" / "model.safetensors.index.json").is_file()
    assert len(shards(tmp_path / "checkpoint-4")) > 1
    loaded = load_folder(tmp_path / "checkpoint-4").model
    assert loaded.state_dict().keys() == saved[4].state_dict().keys()
    for key, value in saved[4].state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_a_tied_weight_saved_once_fills_both_names(tmp_path):
    from safetensors.torch import save_file
    from torch import nn

    from tbfeat.hf_checkpoints import load_folder

    def tied():
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        model[1].weight = model[0].weight
        return model

    torch.manual_seed(1)
    source = tied()
    state = {k: v for k, v in source.state_dict().items() if k != "1.weight"}  # saved once
    (tmp_path / "checkpoint-1").mkdir()
    save_file(state, tmp_path / "checkpoint-1" / "model.safetensors")
    model = load_folder(tmp_path / "checkpoint-1", tied).model
    assert model[1].weight is model[0].weight
    assert torch.equal(model[1].weight, source[0].weight)
    assert torch.equal(model[1].bias, source[1].bias)
    untied = lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))  # noqa: E731
    with pytest.raises(CheckpointError, match=r"model\.safetensors' does not fit Sequential: "
                       r"missing 1 keys, e.g. 1\.weight"):  # fmt: skip
        load_folder(tmp_path / "checkpoint-1", untied)


def modified_vit():
    """A ViT whose head was replaced after it was built: its keys are not those of a
    model built from its config (``classifier.1.*`` for ``classifier.*``)."""
    from torch import nn

    model = hf.ViTForImageClassification(hf.ViTConfig(**SMALL))
    model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(32, 3))
    return model


def assert_same_weights(model, saved) -> None:
    """``model`` holds every tensor of ``saved``, bit for bit and in its dtype."""
    state = model.state_dict()
    assert state.keys() == saved.state_dict().keys()
    for key, value in saved.state_dict().items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key


def test_a_modified_model_loads_the_checkpoint_it_saved(tmp_path, trainer_run):
    from tbfeat.hf_checkpoints import load_folder

    root, _ = trainer_run
    torch.manual_seed(2)
    saved = modified_vit().eval()
    save_trainer_checkpoint(saved, tmp_path / "out" / "checkpoint-3", 3)
    assert "classifier.1.weight" in saved.state_dict()
    assert_same_weights(load_folder(tmp_path / "out" / "checkpoint-3", modified_vit).model, saved)
    result = sweep([tmp_path / "out"], images=[root / "probe.png"], logdir=tmp_path / "run",
                   model=modified_vit, max_channels=CHANNELS)  # fmt: skip
    assert result.logged == [3]
    # a model without the modification still does not fit, naming the keys
    build = lambda: hf.ViTForImageClassification(hf.ViTConfig(**SMALL))  # noqa: E731
    with pytest.raises(CheckpointError, match=r"model\.safetensors' does not fit "
                       r"ViTForImageClassification: missing 2 keys, e\.g\. classifier\.(bias|"
                       r"weight).*; unexpected 2 keys, e\.g\. classifier\.1\."):  # fmt: skip
        load_folder(tmp_path / "out" / "checkpoint-3", build)


def test_weights_keep_the_models_dtype_whatever_its_config_says(tmp_path, trainer_run):
    from tbfeat.hf_checkpoints import load_folder

    _, saved = trainer_run
    folder = tmp_path / "checkpoint-4"
    save_trainer_checkpoint(saved[4], folder, 4)

    def build():  # float32 parameters, a config that says bfloat16
        return hf.ViTForImageClassification(hf.ViTConfig(**SMALL, torch_dtype="bfloat16"))

    assert next(build().parameters()).dtype == torch.float32
    assert_same_weights(load_folder(folder, build).model, saved[4])
    config = json.loads((folder / "config.json").read_text())
    key = "dtype" if "dtype" in config else "torch_dtype"  # as this transformers writes it
    (folder / "config.json").write_text(json.dumps({**config, key: "bfloat16"}))
    assert_same_weights(load_folder(folder).model, saved[4])  # the model config.json names


def test_an_adapter_only_checkpoint_is_refused_saying_how_to_merge_it(tmp_path, trainer_run):
    root, _ = trainer_run
    folder = tmp_path / "out" / "checkpoint-5"
    folder.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (folder / name).write_bytes(b"{}")
    (folder / "trainer_state.json").write_text('{"global_step": 5}')
    expected = (rf"{str(folder)!r} holds a PEFT \(LoRA\) adapter \(adapter_model\.safetensors, "
                r"adapter_config\.json\) and no full weights: adapter-only checkpoints are not "
                r"supported\. Merge .*merge_and_unload\(\)\.save_pretrained")  # fmt: skip
    for given in (tmp_path / "out", folder):
        with pytest.raises(CheckpointError, match=expected):
            find_checkpoints([given])
    proc = tbfeat_here("sweep", tmp_path / "out", "--images", root / "probe.png",
                       "--logdir", tmp_path / "r")  # fmt: skip
    assert proc.returncode == 2
    assert "holds a PEFT (LoRA) adapter" in proc.stderr and "merge_and_unload()" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def processor_run(tmp_path_factory, trainer_run):
    """The Trainer's checkpoints, each with the image processor it saves beside the
    weights (32 px, normalized), and a 40x50 probe image, which the model cannot take
    as it is."""
    root, saved = trainer_run
    out = tmp_path_factory.mktemp("processor") / "out"
    processor = hf.ViTImageProcessor(size={"height": 32, "width": 32})
    for step, model in saved.items():
        save_trainer_checkpoint(model, out / f"checkpoint-{step}", step)
        processor.save_pretrained(out / f"checkpoint-{step}")
    rng = np.random.default_rng(1)
    image = out.parent / "large.png"
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    return out, image, processor, saved


def expected_processed_grid(model, image, processor, layer: int) -> np.ndarray:
    """:func:`expected_grid` of the image as the processor prepares it: resized to
    32x32, normalized with its mean and std."""
    x = torch.from_numpy(np.asarray(Image.open(image).convert("RGB"), dtype=np.float32) / 255)
    pixels = processor(images=x.permute(2, 0, 1), do_rescale=False, return_tensors="pt")
    pixels = pixels["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32) and pixels.min() < -0.5  # resized and normalized
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True).hidden_states
    fmap = hidden[layer + 1][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    return colorize(feature_grid(fmap, max_channels=CHANNELS)[0])


@pytest.mark.parametrize("workers", [1, 2])
def test_the_image_processor_a_trainer_saved_prepares_the_probes(tmp_path, processor_run, workers):
    out, image, processor, saved = processor_run
    result = sweep([out], images=[image], logdir=tmp_path / "run", max_channels=CHANNELS,
                   workers=workers)  # fmt: skip
    assert result.logged == [2, 4]
    events = read_events(tmp_path / "run")
    tags = sorted(t for t in events.Tags()["images"] if t.startswith("features/"))
    assert len(tags) == 2
    for layer, tag in enumerate(tags):
        for event in events.Images(tag):
            expect = expected_processed_grid(saved[event.step], image, processor, layer)
            np.testing.assert_array_equal(decode(event), expect)


def test_stages_of_a_folder_with_an_image_processor_probe_at_its_size(processor_run):
    out, _, _, _ = processor_run
    proc = tbfeat_here("stages", out / "checkpoint-2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "probe image 640x640, which the model sees as 1x3x32x32" in proc.stdout
    assert proc.stdout.count("1x17x32") == 2  # each layer's tokens: 4x4 patches, the class token
