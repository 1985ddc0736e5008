"""Documentation screenshot of a Hugging Face vision transformer trained with the
``Trainer`` and tbfeat's callback, in the tbfeat dashboard of the real TensorBoard.

    python scripts/screenshots_transformers.py        # trains (about a minute), then the PNG

A ViT of 4 layers (hidden size 64, 8x8 patches of 64x64 images) learns which shape a
synthetic image holds; ``tbfeat.hf.FeatureLoggerCallback`` logs the probes (a shape it
learns, and Ultralytics' bus photo) with their class activation maps at each
evaluation, into the Trainer's own TensorBoard run. Writes
``docs/dashboard_vit.png``: the layers' token maps and maps at the first, a middle and the
last evaluation. Nothing is downloaded: the model is built from its config, the data is
drawn on the spot, the image processor is built locally.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from screenshots import Browser, TensorBoard, _save, browser_missing, open_dashboard  # noqa: E402

SIZE = 64
CONFIG = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
              image_size=SIZE, patch_size=8, num_labels=3)  # fmt: skip


class Shapes(torch.utils.data.Dataset):
    """One shape per image; the label is its class (square, disc, triangle)."""

    def __init__(self, n: int, seed: int) -> None:
        from tbfeat.synthetic import draw_shapes

        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(n):
            image, boxes = draw_shapes(rng, SIZE, max_objects=1)
            pixels = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()) / 255
            self.items.append({"pixel_values": (pixels - 0.5) / 0.5, "labels": boxes[0][0]})
        self.first = image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def train(out: Path, epochs: int) -> Path:
    """A Trainer run with the callback; returns the Trainer's TensorBoard run folder."""
    import transformers as hf
    from ultralytics.utils import ASSETS

    from tbfeat.hf import FeatureLoggerCallback

    torch.manual_seed(0)
    model = hf.ViTForImageClassification(hf.ViTConfig(**CONFIG))
    processor = hf.ViTImageProcessor(size={"height": SIZE, "width": SIZE})  # mean 0.5, std 0.5
    val = Shapes(64, seed=1)
    callback = FeatureLoggerCallback(
        images=[val.first, ASSETS / "bus.jpg"], names=["shape", "bus"], preprocess=processor,
        cam="layercam", max_channels=16,
    )  # fmt: skip
    args = hf.TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=32,
        eval_strategy="epoch", save_strategy="no", logging_strategy="epoch",
        report_to=["tensorboard"], use_cpu=True, learning_rate=1e-3, disable_tqdm=True,
    )  # fmt: skip
    hf.Trainer(model, args, train_dataset=Shapes(1024, seed=0), eval_dataset=val,
               callbacks=[callback]).train()  # fmt: skip
    (run,) = (out / "runs").iterdir()
    return run


def detector(logdir: Path) -> list[str]:
    """An RT-DETR's stages over the bus photo at step 0; returns the stage keys."""
    import transformers as hf
    from ultralytics.utils import ASSETS

    from tbfeat import FeatureLogger, list_stages

    torch.manual_seed(0)
    model = hf.RTDetrForObjectDetection(hf.RTDetrConfig(use_pretrained_backbone=False)).eval()
    processor = hf.RTDetrImageProcessor(size={"height": 320, "width": 320})
    with FeatureLogger(model, logdir, preprocess=processor, cam="layercam", max_channels=16) as fl:
        fl.log([ASSETS / "bus.jpg"], step=0)
    return [s.key for s in list_stages(model)]


def timm_swin(logdir: Path) -> list[str]:
    """timm's Swin-T (untrained) over the bus photo through timm's own transform at
    step 0: four channels-last stages; returns the stage keys."""
    import timm
    import torchvision.transforms.v2 as T
    from ultralytics.utils import ASSETS

    from tbfeat import FeatureLogger, list_stages

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    cfg = model.pretrained_cfg
    to_input = T.Compose([T.Resize(cfg["input_size"][1:]), T.Normalize(cfg["mean"], cfg["std"])])
    with FeatureLogger(model, logdir, preprocess=to_input, cam="layercam", max_channels=16) as fl:
        fl.log([ASSETS / "bus.jpg"], step=0)
    return [s.key for s in list_stages(model)]


def screenshot(logdir: Path, state: str, path: Path) -> None:
    with TensorBoard(logdir) as tb, Browser() as browser:
        open_dashboard(browser, tb, state)
        time.sleep(0.5)  # the last pictures paint
        browser.frame(None)
        _save(browser, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    reason = browser_missing()
    if reason:
        parser.error(reason)
    tmp = Path(tempfile.mkdtemp(prefix="tbfeat-vit-"))
    try:
        run = train(tmp, args.epochs)
        import transformers as hf

        from tbfeat import list_stages

        keys = [s.key for s in list_stages(hf.ViTForImageClassification(hf.ViTConfig(**CONFIG)))]
        state = f"&run={run.name}&image=shape&stages={','.join(keys)}&mode=both"
        screenshot(run.parent, state, args.out / "dashboard_vit.png")
        keys = detector(tmp / "rtdetr")
        state = f"&run=.&image=bus&stages={','.join(keys)}&mode=both"
        screenshot(tmp / "rtdetr", state, args.out / "dashboard_rtdetr.png")
        keys = timm_swin(tmp / "swin")
        state = f"&run=.&image=bus&stages={','.join(keys)}&mode=both"
        screenshot(tmp / "swin", state, args.out / "dashboard_swin.png")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
