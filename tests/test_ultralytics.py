"""Ultralytics YOLO: predict, val and a real short training, read back from the event files."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ultralytics = pytest.importorskip("ultralytics")  # the optional extra; `make test` installs it

from ultralytics import YOLO  # noqa: E402
from ultralytics.utils import ASSETS  # noqa: E402

from tbfeat import FeatureLogger, list_stages  # noqa: E402
from tbfeat.integrations.ultralytics import UltralyticsCallbacks  # noqa: E402
from tbfeat.synthetic import make_shapes_dataset  # noqa: E402
from tbfeat.writer import FILE_SUFFIX  # noqa: E402

from .helpers import read_events  # noqa: E402

BUS, ZIDANE = Path(ASSETS) / "bus.jpg", Path(ASSETS) / "zidane.jpg"


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def ours(yolo, logger) -> int:
    """Callbacks of this logger still registered on the YOLO object."""
    return sum(
        isinstance(getattr(f, "__self__", None), UltralyticsCallbacks)
        and f.__self__.logger is logger
        for fns in yolo.callbacks.values()
        for f in fns
    )


def image_tags(logdir) -> list[str]:
    return read_events(logdir).Tags()["images"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=8, n_val=5, imgsz=64)


def test_stages_are_layers_keyed_by_index_and_type_with_the_head_skipped(tmp_path):
    yolo = YOLO("yolov8n.yaml")
    stages = list_stages(yolo)
    assert [s.key for s in stages][:4] == ["00_Conv", "01_Conv", "02_C2f", "03_Conv"]
    assert stages[9].key == "09_SPPF" and stages[-1].key == "22_Detect"
    logger = FeatureLogger(yolo, logdir=tmp_path)
    assert [s.index for s in logger.stages] == list(range(22))  # all but the Detect head
    assert [s.key for s in FeatureLogger(yolo, stages=["SPPF", 2]).stages] == ["02_C2f", "09_SPPF"]
    assert len(FeatureLogger(yolo, stages="C2f").stages) == 8
    with pytest.raises(ValueError, match="did you mean 'SPPF'"):
        FeatureLogger(yolo, stages=["SPFF"])


def test_adapter_for_declines_what_is_not_an_ultralytics_model():
    from ultralytics.utils import IterableSimpleNamespace

    from tbfeat.adapters import adapt
    from tbfeat.integrations.ultralytics import UltralyticsAdapter, adapter_for

    other = IterableSimpleNamespace(imgsz=64)  # Ultralytics', but no model
    assert adapter_for(other) is None and adapter_for(torch.nn.Linear(2, 2)) is None
    with pytest.raises(TypeError, match=r"got ultralytics\.utils\.IterableSimpleNamespace$"):
        adapt(other)
    yolo = YOLO("yolov8n.yaml")
    assert type(adapter_for(yolo)) is UltralyticsAdapter
    assert adapt(yolo).module is yolo.model and adapt(yolo.model).module is yolo.model


def test_predict_logs_each_image_by_file_stem_and_leaves_nothing_behind(tmp_path):
    yolo = YOLO("yolov8n.yaml")
    with FeatureLogger(yolo, logdir=tmp_path, step=3) as logger:
        assert ours(yolo, logger) == len(UltralyticsCallbacks(logger).callbacks())
        results = yolo.predict([BUS, ZIDANE], imgsz=128, batch=2, verbose=False)
    assert len(results) == 2
    tags = image_tags(tmp_path)
    assert len(tags) == 22 * 2
    assert "features/02_C2f/bus" in tags and "features/21_C2f/zidane" in tags
    acc = read_events(tmp_path)
    assert {e.step for t in tags for e in acc.Images(t)} == {3}
    assert no_hooks(yolo.model) and no_hooks(yolo.predictor.model)
    assert ours(yolo, logger) == 0


def test_predict_never_logs_the_warmup_forward(tmp_path, monkeypatch):
    # On a GPU the predictor warms up with a forward; make the CPU do it too. 8.4 passes the
    # first batch (im=...) inside that batch; 8.3 a zero tensor of imgsz before it.
    from ultralytics.nn.autobackend import AutoBackend

    def warmup(self, imgsz=(1, 3, 640, 640), im=None):
        self.forward(im if im is not None else torch.zeros(imgsz, device=self.device))

    monkeypatch.setattr(AutoBackend, "warmup", warmup)
    yolo = YOLO("yolov8n.yaml")
    with FeatureLogger(yolo, logdir=tmp_path, max_images=4):
        yolo.predict(BUS, imgsz=64, verbose=False)
    tags = image_tags(tmp_path)
    assert [t for t in tags if t.startswith("features/00_")] == ["features/00_Conv/bus"]
    assert read_events(tmp_path).Histograms("activations/00_Conv")[0].histogram_value.num == (
        16 * 32 * 32  # one 64x64 image: 16 channels at stride 2
    )


def test_predict_stream_arrays_and_max_images(tmp_path):
    yolo = YOLO("yolov8n.yaml")
    frames = [np.full((80, 96, 3), v, np.uint8) for v in (20, 120, 220)]
    with FeatureLogger(yolo, logdir=tmp_path, max_images=2, stages=[0, 9]):
        for _ in yolo.predict(frames, imgsz=64, stream=True, verbose=False):
            pass
    assert image_tags(tmp_path) == [
        "features/00_Conv/0",
        "features/00_Conv/1",
        "features/09_SPPF/0",
        "features/09_SPPF/1",
    ]


def test_predict_a_folder_names_images_by_stem(tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(BUS, folder / "a bus.jpg")
    shutil.copy(ZIDANE, folder / "zidane.jpg")
    yolo = YOLO("yolov8n.yaml")
    with FeatureLogger(yolo, logdir=tmp_path / "run", stages=["SPPF"]):
        yolo.predict(folder, imgsz=64, verbose=False)
    assert image_tags(tmp_path / "run") == ["features/09_SPPF/a_bus", "features/09_SPPF/zidane"]


def test_predict_output_is_unchanged_by_the_logger(tmp_path):
    yolo = YOLO("yolov8n.yaml")
    plain = yolo.predict(BUS, imgsz=128, verbose=False, conf=0.0)[0].boxes.data
    with FeatureLogger(yolo, logdir=tmp_path):
        logged = yolo.predict(BUS, imgsz=128, verbose=False, conf=0.0)[0].boxes.data
    assert torch.equal(plain, logged)


def test_val_logs_the_first_max_images_validation_images(tmp_path, shapes):
    yolo = YOLO("yolov8n.yaml")
    with FeatureLogger(yolo, logdir=tmp_path / "val", max_images=3, stages=["SPPF"]):
        yolo.val(
            data=str(shapes),
            imgsz=64,
            batch=2,
            device="cpu",
            plots=False,
            verbose=False,
            project=str(tmp_path),
            name="v",
        )
    tags = image_tags(tmp_path / "val")
    assert len(tags) == 3 and all(t.startswith("features/09_SPPF/val_") for t in tags)
    val_files = sorted(p.stem for p in (shapes.parent / "images" / "val").iterdir())
    assert {t.rsplit("/", 1)[1] for t in tags} <= set(val_files)
    assert no_hooks(yolo.model)


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from ultralytics.utils import SETTINGS
    # Ultralytics' own TensorBoard callback on or off, in a temp config dir
    SETTINGS.update(tensorboard=sys.argv[4] == "1")
    from ultralytics import YOLO
    from tbfeat import FeatureLogger

    data, project, every = sys.argv[1], sys.argv[2], int(sys.argv[3])
    yolo = YOLO("yolov8n.yaml")
    with FeatureLogger(yolo, every=every, max_images=2) as logger:
        yolo.train(data=data, epochs=2, imgsz=64, batch=4, workers=0, device="cpu",
                   plots=False, project=project, name="exp", save_period=1, amp=False,
                   verbose=False, seed=0)
    trainer = yolo.trainer
    models = [yolo.model, trainer.model, trainer.ema.ema]
    print(json.dumps({
        "save_dir": str(trainer.save_dir),
        "hooks": sum(len(m._forward_hooks) for model in models for m in model.modules()),
        "ours": sum(1 for fns in yolo.callbacks.values() for f in fns
                    if getattr(getattr(f, "__self__", None), "logger", None) is logger),
    }))
    """
)


def run_training(tmp_path, data, every=1, ultralytics_tensorboard=True) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "GITHUB"))}
    env["YOLO_CONFIG_DIR"] = str(tmp_path / "config")  # keep the user's Ultralytics settings
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            TRAIN_SCRIPT,
            str(data),
            str(tmp_path / "runs"),
            str(every),
            "1" if ultralytics_tensorboard else "0",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_training_logs_every_epoch_into_the_trainers_own_run(tmp_path, shapes):
    out = run_training(tmp_path, shapes)
    save_dir = Path(out["save_dir"])
    acc = read_events(save_dir)
    tags = acc.Tags()
    feature_tags = [t for t in tags["images"] if t.startswith("features/")]
    assert len(feature_tags) == 22 * 2  # 22 stages x the first 2 validation images
    for tag in feature_tags:
        assert [e.step for e in acc.Images(tag)] == [1, 2]
    assert [e.step for e in acc.Scalars("stats/09_SPPF/mean")] == [1, 2]
    # and each stage's class activation map of each probe image, at every epoch
    cam_tags = [t for t in tags["images"] if t.startswith("cam/")]
    assert sorted(cam_tags) == sorted(t.replace("features/", "cam/", 1) for t in feature_tags)
    for tag in cam_tags:
        assert [e.step for e in acc.Images(tag)] == [1, 2]
    # Ultralytics' own curves are in the same run, written once: by its callback
    assert "train/box_loss" in tags["scalars"] and "metrics/mAP50(B)" in tags["scalars"]
    writers = scalar_writers(save_dir)
    assert ("train/box_loss", 1) in writers
    # (Ultralytics 8.3 may open two writers of its own; tbfeat adds none of these tags)
    assert not any(f.name.endswith(FILE_SUFFIX) for fs in writers.values() for f in fs)
    # checkpoints were saved (hooks never stood in the way of pickling) and load back
    for name in ("last.pt", "best.pt", "epoch1.pt"):
        reloaded = YOLO(save_dir / "weights" / name)
        assert len(reloaded.model.model) == 23
    assert out["hooks"] == 0 and out["ours"] == 0


def scalar_writers(logdir) -> dict:
    """``{(tag, step): [event files holding it]}`` over every event file of a run, read
    raw (a reader merging files would hide a step written twice)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found: dict = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag.startswith(("train/", "val/", "lr/", "metrics/")):
                    found.setdefault((value.tag, event.step), []).append(path)
    return found


def test_curves_are_written_when_ultralytics_tensorboard_is_off(tmp_path, shapes):
    """With its TensorBoard setting off (the default), Ultralytics writes no curves:
    tbfeat writes them into the run, the same tags at the same steps as Ultralytics' own
    callback writes with the setting on, each once."""
    (tmp_path / "off").mkdir()
    (tmp_path / "on").mkdir()
    off = scalar_writers(run_training(tmp_path / "off", shapes, ultralytics_tensorboard=False)[
        "save_dir"
    ])  # fmt: skip
    on = scalar_writers(run_training(tmp_path / "on", shapes)["save_dir"])
    assert set(off) == set(on)
    others = {k: [p.name for p in f] for k, f in off.items()
              if len(f) != 1 or not f[0].name.endswith(FILE_SUFFIX)}  # fmt: skip
    assert not others, others
    assert not any(f.name.endswith(FILE_SUFFIX) for fs in on.values() for f in fs)
    steps: dict = {}
    for tag, step in off:
        steps.setdefault(tag, []).append(step)
    for tag in ("train/box_loss", "train/cls_loss", "lr/pg0", "val/box_loss"):
        assert sorted(steps[tag]) == [1, 2], tag
    # and the final validation of best.pt where Ultralytics writes it: one step on (8.4),
    # or the last epoch's step again (8.3; written once, as set(off) == set(on) says)
    assert sorted(steps["metrics/mAP50(B)"]) == sorted(
        {s for t, s in on if t == "metrics/mAP50(B)"}
    )
    assert sorted(steps["metrics/mAP50(B)"])[:2] == [1, 2]


def test_every_n_epochs_still_logs_the_last(tmp_path, shapes):
    out = run_training(tmp_path, shapes, every=5)
    acc = read_events(out["save_dir"])
    assert [
        e.step for e in acc.Images("features/00_Conv/" + acc.Tags()["images"][0].rsplit("/", 1)[1])
    ] == [2]


def test_log_letterboxes_probes_at_imgsz_through_the_model(tmp_path):
    yolo = YOLO("yolov8n.yaml")
    yolo.model.train()
    logger = FeatureLogger(yolo, logdir=tmp_path, imgsz=96, stages=[0])
    logger.log([BUS, ZIDANE], step=5)
    logger.close()
    assert yolo.model.training  # mode restored, and YOLO.eval() (which trains) never called
    acc = read_events(tmp_path)
    for name in ("bus", "zidane"):
        (event,) = acc.Images(f"features/00_Conv/{name}")
        # 16 channels of 48x48 (stride 2 on a 96x96 letterbox): 8 per row, 2 rows
        assert (event.step, event.width, event.height) == (5, 8 * 49 - 1, 2 * 49 - 1)


def test_a_resumed_training_continues_its_history(tmp_path, shapes):
    class Stop(Exception):
        pass

    def stop_after_epoch_2(trainer):
        if trainer.epoch == 1:  # epoch 2 (1-based) is saved in last.pt, then the run dies
            raise Stop

    yolo = YOLO("yolov8n.yaml")
    yolo.add_callback("on_fit_epoch_end", stop_after_epoch_2)
    args = dict(
        data=str(shapes), epochs=3, imgsz=64, batch=4, workers=0, device="cpu", plots=False,
        project=str(tmp_path), name="r", amp=False, verbose=False, seed=0,
    )  # fmt: skip
    with pytest.raises(Stop), FeatureLogger(yolo, stages=[0, 9], max_images=2):
        yolo.train(**args)
    save_dir = Path(yolo.trainer.save_dir)
    resumed = YOLO(save_dir / "weights" / "last.pt")
    with FeatureLogger(resumed, stages=[0, 9], max_images=2):
        resumed.train(resume=True)
    assert Path(resumed.trainer.save_dir) == save_dir
    acc = read_events(save_dir, derived=True)
    assert [e.step for e in acc.Scalars("stats/09_SPPF/mean")] == [1, 2, 3]
    # drift at epoch 3 against epoch 2 from the saved history, and a 3-column strip
    assert [e.step for e in acc.Scalars("drift/09_SPPF")] == [2, 3]
    strips = acc.Images("evolution/00_Conv")
    assert [e.step for e in strips] == [1, 2, 3]
    assert strips[-1].width == 3 * strips[0].width + 2  # 3 columns, 1 px apart


# ---------------------------------------------------------------- multi-GPU (DDP) launch
LAUNCH_SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, warnings
    from ultralytics import YOLO
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.utils import ASSETS
    from ultralytics.utils.dist import generate_ddp_file
    from tbfeat import FeatureLogger

    launched = []

    def launch(trainer):
        # what train() does with several devices: write the launch file, run it in fresh
        # processes (the ranks; here one, on the CPU, with RANK unset like rank 0 of one)
        launched.append(generate_ddp_file(trainer))
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
        subprocess.run([sys.executable, launched[-1]], check=True, env=env)
        if hasattr(trainer, "ddp"):
            trainer.ddp = True  # the launching process took the multi-device branch
        else:  # 8.3 decides from the devices asked for
            trainer.args.device = "0,1"

    BaseTrainer.train = launch
    data, project = sys.argv[1], sys.argv[2]
    yolo = YOLO("yolov8n.yaml")
    yolo.predict(ASSETS / "bus.jpg", imgsz=64, verbose=False)  # the YOLO object holds a lock now
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FeatureLogger(yolo, max_images=2):
            yolo.train(data=data, epochs=2, imgsz=64, batch=4, workers=0, device="cpu",
                       plots=False, project=project, name="exp", amp=False, verbose=False)
    print(json.dumps({
        "script": launched[0],
        "save_dir": str(yolo.trainer.save_dir),
        "warnings": [str(w.message) for w in caught if "tbfeat" in str(w.message)],
    }))
    """
)


def tbfeat_files(folder: Path) -> dict[str, tuple[int, int]]:
    """tbfeat's event and history files under ``folder``: name -> (size, mtime_ns)."""
    found = [p for p in folder.rglob("*") if p.suffix == ".tbfeat" or "tbfeat" in p.name]
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in found if p.is_file()}


def test_a_multi_gpu_launch_logs_from_rank_zero_of_its_ranks(tmp_path, shapes):
    """Ultralytics' DDP launch file, written with a logger attached and run in fresh
    processes: rank 0 logs every stage at every epoch into the trainer's save_dir, with
    drift and evolution; rank 1 writes nothing. Releases that drop callbacks in their
    ranks log nothing there and warn, naming the version and the sweep workaround."""
    from tbfeat.integrations.ultralytics import ddp_keeps_callbacks

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "GITHUB"))}
    env["YOLO_CONFIG_DIR"] = str(tmp_path / "config")
    args = [str(shapes), str(tmp_path / "runs")]
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCH_SCRIPT, *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    save_dir = Path(out["save_dir"])
    written = tbfeat_files(save_dir)
    if ddp_keeps_callbacks():
        assert out["warnings"] == []
        acc = read_events(save_dir, derived=True)
        features = [t for t in acc.Tags()["images"] if t.startswith("features/")]
        assert len(features) == 22 * 2  # every stage, the first 2 validation images
        assert all([e.step for e in acc.Images(t)] == [1, 2] for t in features)
        assert [e.step for e in acc.Scalars("drift/09_SPPF")] == [2]
        assert [e.step for e in acc.Images("evolution/09_SPPF")] == [1, 2]
        assert len([p for p in written if p.endswith(".tbfeat")]) == 1
    else:
        (warning,) = out["warnings"]
        assert f"Ultralytics {ultralytics.__version__} ran this train()" in warning
        assert f"tbfeat sweep {save_dir / 'weights'}" in warning and "save_period=1" in warning
        assert written == {}
        return  # no callback of tbfeat's reaches these releases' ranks
    # the same launch as rank 1 of 2: it trains, and tbfeat touches no file
    env["RANK"] = "1"
    proc = subprocess.run(
        [sys.executable, out["script"]], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tbfeat_files(save_dir) == written


def test_callbacks_pickle_as_the_loggers_configuration_only(tmp_path):
    """What Ultralytics' launch pickles into every rank: small, no model, nothing open;
    the copy builds its logger later, from the rank's own model."""
    import cloudpickle

    yolo = YOLO("yolov8n.yaml")
    yolo.predict(BUS, imgsz=64, verbose=False)  # the YOLO object now holds a lock
    logger = FeatureLogger(yolo, logdir=tmp_path, images=[BUS], max_channels=8, stages=[0, 9])
    logger.log(step=1)  # its writer thread runs
    data = cloudpickle.dumps(UltralyticsCallbacks(logger).callbacks())
    assert len(data) < 8_000 and b"DetectionModel" not in data
    copy = cloudpickle.loads(data)["on_train_epoch_end"].__self__
    assert copy.logger is None and copy.options == logger.options
    rank_logger = copy.config.build(yolo.model)  # what rank 0 does with its own model
    assert [s.key for s in rank_logger.stages] == ["00_Conv", "09_SPPF"]
    assert rank_logger.logdir == str(tmp_path) and rank_logger.images == [BUS]
    rank_logger.close()
    logger.close()


def test_a_training_without_probe_images_warns_once_and_goes_on(tmp_path):
    from types import SimpleNamespace

    yolo = YOLO("yolov8n.yaml")
    logger = FeatureLogger(yolo, logdir=tmp_path)
    callbacks = UltralyticsCallbacks(logger)
    trainer = SimpleNamespace(  # an epoch's end with no validation images listed
        epoch=0, epochs=2, ema=SimpleNamespace(ema=yolo.model), model=yolo.model,
        args=SimpleNamespace(imgsz=64), test_loader=SimpleNamespace(dataset=None),
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="no probe images for this training"):
        callbacks.on_train_epoch_end(trainer)
    trainer.epoch = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callbacks.on_train_epoch_end(trainer)  # once only
    logger.close()
    assert not list(tmp_path.iterdir())


def test_an_error_while_probing_warns_once_and_the_training_goes_on(tmp_path, monkeypatch):
    from types import SimpleNamespace

    yolo = YOLO("yolov8n.yaml")
    logger = FeatureLogger(yolo, logdir=tmp_path, images=[BUS], stages=[0])
    callbacks = UltralyticsCallbacks(logger)
    trainer = SimpleNamespace(epoch=0, epochs=3, ema=SimpleNamespace(ema=yolo.model),
                              model=yolo.model, args=SimpleNamespace(imgsz=64))  # fmt: skip

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(yolo.model, "forward", broken)
    with pytest.warns(RuntimeWarning, match="stopped logging this training at epoch 1: Runtime"):
        callbacks.on_train_epoch_end(trainer)
    monkeypatch.undo()
    trainer.epoch = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callbacks.on_train_epoch_end(trainer)  # stopped: no second warning, no probe
    logger.close()
    assert not list(tmp_path.glob("events.*"))


def test_a_rank_builds_its_logger_into_save_dir_and_closes_it_on_teardown(tmp_path):
    """What an Ultralytics DDP rank does with the pickled callbacks, also when its
    training raised (teardown runs; on_train_end does not)."""
    from types import SimpleNamespace

    import cloudpickle

    yolo = YOLO("yolov8n.yaml")
    with FeatureLogger(yolo, images=[BUS], stages=[0], max_channels=4) as logger:
        callbacks = cloudpickle.loads(cloudpickle.dumps(UltralyticsCallbacks(logger)))
    save_dir = tmp_path / "train"
    trainer = SimpleNamespace(epoch=0, epochs=2, ema=SimpleNamespace(ema=yolo.model),
                              model=yolo.model, args=SimpleNamespace(imgsz=64),
                              save_dir=save_dir)  # fmt: skip
    callbacks.on_pretrain_routine_start(trainer)
    assert callbacks.logger is None  # nothing built before an epoch is logged
    callbacks.on_train_epoch_end(trainer)
    built = callbacks.logger
    assert built is not None and built.logdir == str(save_dir)
    callbacks.teardown(trainer)
    assert callbacks.logger is None and callbacks.config.logdir == str(save_dir)
    with pytest.raises(RuntimeError, match="closed"):
        built.log(step=9)
    assert [e.step for e in read_events(save_dir).Images("features/00_Conv/bus")] == [1]


def test_which_releases_keep_callbacks_in_their_ddp_ranks():
    from types import SimpleNamespace

    from tbfeat.integrations.ultralytics import ddp_keeps_callbacks, ran_ddp

    assert [ddp_keeps_callbacks(v) for v in ("8.3.0", "8.4.139", "8.4.140", "8.10.0")] == [
        False, False, True, True,
    ]  # fmt: skip
    assert ddp_keeps_callbacks("8.4.190.dev0") and not ddp_keeps_callbacks("8.4.13")

    def old_trainer(device):  # 8.3 has no trainer.ddp: several devices decide
        return SimpleNamespace(args=SimpleNamespace(device=device))

    assert [ran_ddp(old_trainer(d)) for d in ("0,1", [0, 1], "0", "cpu", None)] == [
        True, True, False, False, False,
    ]  # fmt: skip
    assert ran_ddp(SimpleNamespace(ddp=True, args=None))
