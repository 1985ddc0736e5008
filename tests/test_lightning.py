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
    # every epoch (1-based, as sweeps and Ultralytics count), the sanity check skipped,
    # next to Lightning's own metrics
    for kind in ("features", "cam"):
        assert [e.step for e in acc.Images(f"{kind}/00_Conv2d/a")] == [1, 2, 3]
    assert [e.step for e in acc.Images("input/a")] == [1]  # the same probe image each epoch
    assert "val_loss" in tags["scalars"] and "train_loss" in tags["scalars"]
    assert [e.step for e in acc.Scalars("stats/03_head/mean")] == [1, 2, 3]
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
    assert [e.step for e in events] == [2, 3]  # epoch 2, and the last
    assert seen == [(3, 16, 16)] * 2 and events[0].height == 8  # 8 channels of 8x8


def test_callback_rejects_bad_arguments_at_construction():
    with pytest.raises(ValueError, match="inputs is empty"):
        FeatureLoggerCallback(images=[])
    with pytest.raises(ValueError, match="step must be 'epoch' or 'global_step'"):
        FeatureLoggerCallback(images=torch.rand(1, 3, 4, 4), step="batch")


def test_the_callback_and_a_sweep_of_the_trainings_checkpoints_log_an_epoch_at_one_step(tmp_path):
    """One step convention: the callback logs epoch ``e`` (0-based ``current_epoch``) at
    step ``e + 1``; a sweep of the ``epoch=E-step=S.ckpt`` files the same training saved
    (their ``state_dict`` keys under the LightningModule's ``model.``) logs each at the
    step the callback used, with the same statistics."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from PIL import Image

    from tbfeat import sweep

    module = Module()
    tb = TensorBoardLogger(tmp_path, name="exp")
    probe = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    image = tmp_path / "probe.png"
    Image.fromarray((probe[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(image)
    callback = FeatureLoggerCallback(images=[image], names=["p"], max_channels=4)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=3, logger=tb, callbacks=[callback, saver], accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, *loaders())
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "epoch=2-step=6.ckpt"]
    result = sweep([tmp_path / "ckpt"], model=TinyNet, images=[image], logdir=tmp_path / "sweep")
    assert result.logged == [1, 2, 3]
    trained, swept = read_events(tb.log_dir), read_events(tmp_path / "sweep")
    for tag in ("stats/00_Conv2d/mean", "stats/03_head/mean"):
        a, b = trained.Scalars(tag), swept.Scalars(tag)
        assert [e.step for e in a] == [e.step for e in b] == [1, 2, 3]
        assert [e.value for e in a] == pytest.approx([e.value for e in b], rel=1e-5, abs=1e-6)
