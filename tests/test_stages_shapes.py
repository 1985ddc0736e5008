"""``tbfeat stages`` on transformers: each token stage's output as the model returns it
and the map tbfeat logs of it, against the shapes of a hand forward."""

import pytest
import torch

from .test_cli import tbfeat_here

BLOCKS = ("blocks.0", "blocks.1")
TIMM_VIT = "timm:create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, depth=2)"


def layer_output(model, name: str) -> torch.Tensor:
    """What module ``name`` returns for one 32x32 image."""
    seen = {}
    module = dict(model.named_modules())[name]
    handle = module.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    handle.remove()
    out = seen["out"]
    return out[0] if isinstance(out, tuple) else out


def rows(stdout: str) -> dict[str, list[str]]:
    """The table's rows by stage name: ``[output shape, map shape]``."""
    table = {}
    for line in stdout.splitlines()[1:]:
        cells = line.lstrip("* ").split()
        if len(cells) == 6 and cells[0].isdigit():
            table[cells[2]] = cells[4:]
    return table


def shapes_by_hand(tokens: torch.Tensor, prefix: int) -> list[str]:
    """The tokens' shape, and the map of their patch tokens reshaped to a square grid."""
    n, count, channels = tokens.shape
    side = int((count - prefix) ** 0.5)
    fmap = tokens[:, prefix:].reshape(n, side, side, channels).permute(0, 3, 1, 2)
    return ["x".join(map(str, tokens.shape)), "x".join(map(str, fmap.shape))]


def test_a_timm_vits_stages_show_tokens_and_the_map_logged():
    timm = pytest.importorskip("timm")
    proc = tbfeat_here("stages", "--model", TIMM_VIT, "--imgsz", 32)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    expect = {name: shapes_by_hand(layer_output(model, name), 1) for name in BLOCKS}
    assert expect["blocks.0"] == ["1x5x192", "1x192x2x2"]
    assert rows(proc.stdout) == expect
    assert "map shape: the (N, C, H, W) map tbfeat logs" in proc.stdout


def test_a_hugging_face_vits_layers_show_tokens_and_the_map_logged(tmp_path):
    hf = pytest.importorskip("transformers")
    config = hf.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=3,
    )  # fmt: skip
    model = hf.ViTForImageClassification(config)
    model.save_pretrained(tmp_path / "vit")
    proc = tbfeat_here("stages", tmp_path / "vit", "--imgsz", 32)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():  # the embeddings, then each layer's output
        hidden = model.eval()(torch.zeros(1, 3, 32, 32), output_hidden_states=True).hidden_states
    expect = [shapes_by_hand(h, 1) for h in hidden[1:]]
    assert expect == [["1x17x32", "1x32x4x4"]] * 2
    assert list(rows(proc.stdout).values()) == expect


def test_a_convolutional_models_table_has_no_map_column():
    proc = tbfeat_here("stages", "resnet18", "--imgsz", 64)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "output shape" in proc.stdout and "map shape" not in proc.stdout
