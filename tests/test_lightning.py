"""The Lightning callback with a real Trainer and a tiny model."""

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")  # the optional extra; `make test` installs it

from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from tbfeat.lightning import FeatureLoggerCallback  # noqa: E402

from .helpers import read_events  # noqa: E402


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))))


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = TinyNet()
        self.modes_seen = []

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.model(x), y))

    def on_train_epoch_start(self):
        self.modes_seen.append(self.model.training)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def loaders():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.rand(16, 3, 16, 16, generator=g), torch.randint(0, 2, (16,), generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=8), torch.utils.data.DataLoader(
        data, batch_size=8
    )


def make_trainer(tb, callback, **kwargs):
    """A quiet 3-epoch CPU Trainer with the TensorBoard logger and our callback."""
    return pl.Trainer(
        max_epochs=3, logger=tb, callbacks=[callback], accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        **kwargs,
    )  # fmt: skip


def test_callback_logs_each_validation_epoch_into_lightnings_own_run(tmp_path):
    module = Module()
    tb = TensorBoardLogger(tmp_path, name="exp")
    probe = torch.rand(2, 3, 16, 16)
    callback = FeatureLoggerCallback(images=probe, names=["a", "b"], max_channels=4)
    trainer = make_trainer(tb, callback, log_every_n_steps=1, num_sanity_val_steps=1)
    train, val = loaders()
    trainer.fit(module, train, val)

    acc = read_events(tb.log_dir)
    tags = acc.Tags()
    assert sorted(t for t in tags["images"]) == [
        f"{kind}/{k}/{n}"
        for kind in ("cam", "features")
        for k in ("00_Conv2d", "01_BatchNorm2d", "02_ReLU")
        for n in ("a", "b")
    ] + ["input/a", "input/b"]
    # every epoch, the sanity check skipped, next to Lightning's own metrics
    for kind in ("features", "cam"):
        assert [e.step for e in acc.Images(f"{kind}/00_Conv2d/a")] == [0, 1, 2]
    assert [e.step for e in acc.Images("input/a")] == [0]  # the same probe image each epoch
    assert "val_loss" in tags["scalars"] and "train_loss" in tags["scalars"]
    assert [e.step for e in acc.Scalars("stats/03_head/mean")] == [0, 1, 2]
    # the model trained between epochs: its first stage's statistics moved
    means = [e.value for e in acc.Scalars("stats/00_Conv2d/mean")]
    assert len(set(means)) == 3
    assert module.modes_seen == [True, True, True]
    assert all(not m._forward_hooks for m in module.modules())


def test_callback_every_n_epochs_and_attribute_selection(tmp_path):
    module = Module()
    tb = TensorBoardLogger(tmp_path, name="exp")
    seen = []

    def crop(image):  # preprocess: what the module gets, per probe image
        seen.append(tuple(image.shape))
        return image[:, :8, :8]

    callback = FeatureLoggerCallback(
        images=torch.rand(1, 3, 16, 16), module="model", stages=["conv"], every=2,
        preprocess=crop,
    )  # fmt: skip
    trainer = make_trainer(tb, callback, num_sanity_val_steps=0)
    trainer.fit(module, *loaders())
    acc = read_events(tb.log_dir)
    events = acc.Images("features/00_Conv2d/0")
    assert [e.step for e in events] == [1, 2]  # epoch 2, and the last
    assert seen == [(3, 16, 16)] * 2 and events[0].height == 8  # 8 channels of 8x8


def test_callback_rejects_bad_arguments_at_construction():
    with pytest.raises(ValueError, match="inputs is empty"):
        FeatureLoggerCallback(images=[])
    with pytest.raises(ValueError, match="step must be 'epoch' or 'global_step'"):
        FeatureLoggerCallback(images=torch.rand(1, 3, 4, 4), step="batch")
