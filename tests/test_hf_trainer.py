"""The Hugging Face ``Trainer`` callback: a real two-epoch training of a tiny ViT, read
back from the Trainer's own TensorBoard run at the Trainer's steps."""

import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tbfeat
from tbfeat import list_stages
from tbfeat.render import colorize, feature_grid

from .helpers import decode, read_events

hf = pytest.importorskip("transformers")

from tbfeat.hf import FeatureLoggerCallback  # noqa: E402

GRID = dict(max_channels=6, ncols=3)
CONFIG = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    image_size=32, patch_size=8, num_labels=2,
)  # fmt: skip


class Squares(torch.utils.data.Dataset):
    """Eight 32x32 images: class 1 has a bright square where class 0 is dark."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        x = torch.rand(3, 32, 32, generator=g) * 0.2
        if i % 2:
            x[:, 8:24, 8:24] += 0.8
        return {"pixel_values": x, "labels": i % 2}


def probe() -> torch.Tensor:
    """An image with the square, in whole 8-bit levels (so that it is the same read back
    from the PNG :func:`probe_file` writes)."""
    return (Squares()[1]["pixel_values"] * 255).round() / 255


def probe_file(folder: Path) -> Path:
    path = folder / "square.png"
    pixels = (probe() * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path)
    return path


def trainer(
    out: Path, callback: FeatureLoggerCallback, *, eval_dataset=None, processing_class=None,
    **args,
) -> "hf.Trainer":  # fmt: skip
    torch.manual_seed(0)
    model = hf.ViTForImageClassification(hf.ViTConfig(**CONFIG))
    args = dict(
        output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=4,
        per_device_eval_batch_size=8, eval_strategy="epoch", save_strategy="epoch",
        logging_strategy="epoch", report_to=["tensorboard"], use_cpu=True,
        disable_tqdm=True, learning_rate=1e-2,
    ) | args  # fmt: skip
    args = hf.TrainingArguments(**args)
    return hf.Trainer(
        model, args, train_dataset=Squares(), eval_dataset=eval_dataset or Squares(),
        callbacks=[callback], processing_class=processing_class,
    )  # fmt: skip


def expected_grid(checkpoint: Path, stage: int) -> np.ndarray:
    """The grid of ``stage`` for the probe, computed from the checkpoint's weights (loaded
    by transformers itself, which renames the keys it saves): the layer's hidden state
    without its class token, reshaped by hand."""
    model = hf.ViTForImageClassification.from_pretrained(checkpoint, local_files_only=True)
    model.eval()
    with torch.no_grad():
        hidden = model(probe()[None], output_hidden_states=True).hidden_states
    fmap = hidden[stage + 1][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    return colorize(feature_grid(fmap, **GRID)[0])


def test_a_two_epoch_training_logs_each_evaluation_into_the_trainers_own_run(tmp_path, monkeypatch):
    """...and a sweep of the checkpoints the same training saved logs the same grids at
    the same steps."""
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    image = probe_file(tmp_path)
    callback = FeatureLoggerCallback(images=[image], **GRID)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no tbfeat warning either
        trainer(tmp_path, callback).train()

    (run,) = (tmp_path / "runs").iterdir()  # one run: the Trainer's and tbfeat's files
    files = sorted(p.name for p in run.iterdir() if p.name.startswith("events."))
    assert len(files) == 2 and sum(f.endswith(".tbfeat") for f in files) == 1
    events = read_events(run)
    steps = [e.step for e in events.Scalars("eval/loss")]  # the Trainer's own scalars
    assert steps == [2, 4]  # 8 images, batches of 4, two epochs
    key = list_stages(trainer(tmp_path / "x", callback).model)[1].key
    images = events.Images(f"features/{key}/square")
    assert [e.step for e in images] == steps
    for event in images:  # each evaluation's grid is the weights of that step's checkpoint
        expect = expected_grid(tmp_path / f"checkpoint-{event.step}", stage=1)
        np.testing.assert_array_equal(decode(event), expect)
    assert callback.logger is None  # closed at the end of training

    result = tbfeat.sweep([tmp_path], images=[image], logdir=tmp_path / "sweep", **GRID)
    assert list(result.logged) == steps
    swept = read_events(tmp_path / "sweep").Images(f"features/{key}/square")
    assert [e.step for e in swept] == steps
    for a, b in zip(swept, images, strict=True):
        np.testing.assert_array_equal(decode(a), decode(b))


def test_step_epoch_logs_the_one_based_epoch_into_a_named_logdir(tmp_path):
    """...once per evaluation with two eval data sets, a 48x64 probe going through the
    Trainer's own image processor; step='epoch' with evaluations between epochs is an
    error before the training starts."""
    callback = FeatureLoggerCallback(
        images=[torch.rand(3, 48, 64)], names=["big"], step="epoch", logdir=tmp_path / "tb",
        stages=[0], **GRID,
    )  # fmt: skip
    two = {"a": Squares(), "b": Squares()}
    processor = hf.ViTImageProcessor(size={"height": 32, "width": 32})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no tbfeat warning either
        trainer(tmp_path / "out", callback, save_strategy="no", eval_dataset=two,
                processing_class=processor).train()  # fmt: skip
    events = read_events(tmp_path / "tb")
    key = list_stages(trainer(tmp_path / "x", callback).model)[0].key
    assert [e.step for e in events.Images(f"features/{key}/big")] == [1, 2]
    with pytest.raises(ValueError, match="step='epoch' needs eval_strategy='epoch', got 'steps'"):
        trainer(tmp_path / "y", callback, eval_strategy="steps", eval_steps=1).train()


def test_a_problem_while_logging_is_one_warning_and_the_training_goes_on(tmp_path):
    callback = FeatureLoggerCallback(images=[torch.rand(3, 32, 32)], logdir=tmp_path / "tb")
    callback.preprocess = lambda image: image[:1]  # one channel: the patch embedding fails
    with pytest.warns(RuntimeWarning, match="stopped logging feature maps of this training") as w:
        result = trainer(tmp_path / "out", callback, save_strategy="no").train()
    assert result.global_step == 4 and len([x for x in w if "tbfeat" in str(x.message)]) == 1


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(step="epochs"), "step must be 'global_step' or 'epoch', got 'epochs'"),
        (dict(preprocess=3), "preprocess must be a function, got int"),
        (dict(logdir=3), "logdir must be a path or None, got int"),
        (dict(max_channels=0), "max_channels"),
    ],
)
def test_bad_arguments_fail_before_training(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        FeatureLoggerCallback(images=[probe()], **kwargs)


def test_the_run_folder_is_the_one_tensorboard_opened_in_this_process(tmp_path, monkeypatch):
    from tbfeat.integrations.hf_trainer import trainer_run_dir

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    args = hf.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    other = tmp_path / "runs" / "Jan01_00-00-00_elsewhere"  # another process's run
    other.mkdir(parents=True)
    (other / "events.out.tfevents.1.elsewhere.1.0").write_bytes(b"")
    if getattr(args, "logging_dir", None):  # transformers 4 names the folder in its args
        assert trainer_run_dir(args) == args.logging_dir
        return
    fresh = trainer_run_dir(args)  # none of this process: a new folder, as the Trainer names
    assert Path(fresh).parent == tmp_path / "runs" and Path(fresh) != other
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "runs" / "mine")):
        assert trainer_run_dir(args) == str(tmp_path / "runs" / "mine")
    time.sleep(0.01)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # evaluate() before train(): ./runs/<date>_<host>
    with SummaryWriter("runs/Jan01_00-00-01_here"):
        assert Path(trainer_run_dir(args)).resolve() == tmp_path / "cwd/runs/Jan01_00-00-01_here"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", os.fspath(tmp_path / "env"))
    assert trainer_run_dir(args) == str(tmp_path / "env")


def test_only_the_main_process_logs(tmp_path):
    callback = FeatureLoggerCallback(images=[probe()], logdir=tmp_path / "tb")
    model = hf.ViTForImageClassification(hf.ViTConfig(**CONFIG))
    args = hf.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    for zero in (False, True):
        state = hf.TrainerState(is_world_process_zero=zero, global_step=3, max_steps=4)
        callback.on_train_begin(args, state, hf.TrainerControl())
        callback.on_evaluate(args, state, hf.TrainerControl(), model=model)
        callback.on_train_end(args, state, hf.TrainerControl())
        logged = tmp_path.joinpath("tb").exists() and read_events(tmp_path / "tb").Tags()
        assert bool(logged and logged["images"]) == zero


def test_a_training_that_ended_without_its_end_leaves_nothing_to_the_next(tmp_path, monkeypatch):
    """An exception ends a training without on_train_end: the next training logs its own
    model into its own run."""
    callback = FeatureLoggerCallback(images=[probe()], names=["square"], max_channels=4)
    state = hf.TrainerState(is_world_process_zero=True, global_step=2, max_steps=4)
    models = [hf.ViTForImageClassification(hf.ViTConfig(**CONFIG)) for _ in range(2)]
    for name, model in zip(("first", "second"), models, strict=True):
        # each training its own run: transformers 5 by the variable, 4 by logging_dir
        monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / name / "tb"))
        args = hf.TrainingArguments(output_dir=str(tmp_path / name), use_cpu=True, report_to=[])
        callback.on_train_begin(args, state, hf.TrainerControl())
        callback.on_evaluate(args, state, hf.TrainerControl(), model=model)
        assert callback.logger.model is model  # no on_train_end between the two
    callback.on_train_end(args, state, hf.TrainerControl())
    for name in ("first", "second"):
        files = list((tmp_path / name).rglob("events.out.tfevents.*.tbfeat"))
        assert len(files) == 1, name
