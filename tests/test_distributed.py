"""Several processes on the CPU with gloo: only global rank 0 runs probes and writes.

Each test runs real processes (``torchrun``, Lightning's DDP launchers) and reads the
event files back; the Ultralytics DDP launch is tested in ``test_ultralytics.py``.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .helpers import read_events

ROOT = Path(__file__).resolve().parents[1]

TORCHRUN_LOOP = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from tbfeat import FeatureLogger, list_stages

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same weights on every rank
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    model = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)  # each rank its own shard
    x, y = torch.rand(16, 3, 16, 16, generator=g), torch.randint(0, 2, (16,), generator=g)
    probes = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))

    logger = FeatureLogger(model, logdir=sys.argv[1], max_channels=4)
    forwards = []
    net.register_forward_pre_hook(lambda m, args: forwards.append(m.training))
    epochs = []
    for epoch in range(1, 4):
        model.train()
        for i in range(0, 16, 4):  # every step all-reduces gradients between the ranks
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 4]), y[i : i + 4]).backward()
            optimizer.step()
        before = len(forwards)
        out = logger.log(probes, step=epoch)  # called on every rank
        epochs.append({"returned": out is not None, "forwards": forwards[before:]})
    logger.close()
    print("RESULT " + json.dumps({
        "rank": rank, "pid": os.getpid(), "epochs": epochs,
        "stages": [s.key for s in logger.stages], "bare": [s.key for s in list_stages(net)],
    }), flush=True)
    dist.barrier()  # the script's own: the ranks leave together
    # gloo's teardown at exit can abort a rank on a loaded machine ("terminate called
    # without an active exception", a native thread destroyed while joinable) after
    # everything ran; leave without native destructors, as a finished job may
    os._exit(0)
    """
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST", "GITHUB", "MASTER_", "TORCHELASTIC"))
        and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    }
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def tbfeat_event_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*.tbfeat"))


def test_a_torchrun_loop_logs_once_per_epoch_from_rank_zero(tmp_path):
    """``torchrun --nproc_per_node 2`` over a DDP training loop that calls ``log()`` on
    every rank: rank 0 probes the bare model (no collective call, so no rank waits on
    another) and writes one event file; rank 1 returns at once without a forward."""
    script = tmp_path / "loop.py"
    script.write_text(TORCHRUN_LOOP)
    logdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(logdir)],
        capture_output=True, text=True, env=clean_env(), timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = [
        json.loads(line.split("RESULT ", 1)[1])
        for line in proc.stdout.splitlines()
        if "RESULT " in line
    ]
    by_rank = {r["rank"]: r for r in results}
    assert sorted(by_rank) == [0, 1]
    # eval mode: the probe, then its class activation maps
    assert by_rank[0]["epochs"] == [{"returned": True, "forwards": [False, False]}] * 3
    assert by_rank[1]["epochs"] == [{"returned": False, "forwards": []}] * 3
    # the DDP wrapper gives the bare model's stages and tags
    assert by_rank[0]["stages"] == by_rank[0]["bare"] == by_rank[1]["stages"]
    assert by_rank[0]["stages"][:3] == ["00_Conv2d", "01_BatchNorm2d", "02_ReLU"]
    (event_file,) = tbfeat_event_files(logdir)
    assert f".{by_rank[0]['pid']}." in event_file.name  # rank 0's process wrote it
    acc = read_events(logdir)
    images = acc.Tags()["images"]
    stages = by_rank[0]["stages"]  # grids and maps of the 4-D outputs; statistics of all
    assert sorted(images) == sorted(
        [f"{kind}/{k}/{n}" for kind in ("cam", "features") for k in stages[:5] for n in "01"]
        + ["input/0", "input/1"]
    )
    assert all([e.step for e in acc.Images(t)] == [1, 2, 3] for t in images if "input/" not in t)
    assert all([e.step for e in acc.Scalars(f"stats/{k}/mean")] == [1, 2, 3] for k in stages)


LIGHTNING_DDP = textwrap.dedent(
    """
    import sys
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from tbfeat.lightning import FeatureLoggerCallback
    from tests.test_lightning import Module, loaders

    if __name__ == "__main__":
        root, strategy = sys.argv[1], sys.argv[2]
        probes = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        callback = FeatureLoggerCallback(images=probes, names=["a", "b"], max_channels=4)
        trainer = Trainer(
            max_epochs=2, logger=TensorBoardLogger(root, name="exp"), callbacks=[callback],
            accelerator="cpu", devices=2, strategy=strategy, num_sanity_val_steps=0,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        trainer.fit(Module(), *loaders())
    """
)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_lightning_ddp_logs_each_validation_epoch_from_rank_zero(tmp_path, strategy):
    """Lightning with 2 CPU processes: the feature maps of every validation epoch go into
    the TensorBoardLogger's one event file, written by rank 0; nothing else is written."""
    pytest.importorskip("lightning.pytorch")
    script = tmp_path / "fit.py"
    script.write_text(LIGHTNING_DDP)
    root = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, str(script), str(root), strategy],
        capture_output=True, text=True, env=clean_env(), timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "exp" / "version_0"
    assert [p.name for p in (root / "exp").iterdir()] == ["version_0"]
    (event_file,) = run.glob("events.out.tfevents.*")  # Lightning's writer, on rank 0
    assert tbfeat_event_files(root) == []  # tbfeat wrote into it, opened nothing of its own
    acc = read_events(run)
    features = [t for t in acc.Tags()["images"] if t.startswith("features/")]
    assert sorted(features) == [
        f"features/{k}/{n}" for k in ("00_Conv2d", "01_BatchNorm2d", "02_ReLU") for n in "ab"
    ]
    assert all([e.step for e in acc.Images(t)] == [1, 2] for t in features)  # 1-based epochs
    assert [e.step for e in acc.Scalars("stats/03_head/mean")] == [1, 2]
    assert "val_loss" in acc.Tags()["scalars"]


HF_TRAINER_DDP = textwrap.dedent(
    """
    import os, sys
    import torch
    from tests.test_hf_trainer import probe, trainer
    from tbfeat.hf import FeatureLoggerCallback

    out = sys.argv[1]
    callback = FeatureLoggerCallback(images=[probe()], names=["square"], max_channels=4)
    trainer(out, callback, save_strategy="no", per_device_train_batch_size=2).train()
    print(f"RANK {os.environ['RANK']} {os.getpid()}", flush=True)
    """
)


def test_a_hugging_face_trainer_under_torchrun_logs_from_the_main_process_only(tmp_path):
    """``torchrun --nproc_per_node 2`` over a ``Trainer`` (DDP with gloo): the callback
    on the main process writes one event file into the Trainer's run, at its steps."""
    pytest.importorskip("transformers")
    script = tmp_path / "train.py"
    script.write_text(HF_TRAINER_DDP)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(tmp_path / "out")],
        capture_output=True, text=True, env=clean_env(), timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    pids = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RANK "))
    assert sorted(pids) == ["0", "1"]
    (run,) = (tmp_path / "out" / "runs").iterdir()
    (event_file,) = tbfeat_event_files(tmp_path / "out")
    assert event_file.parent == run and f".{pids['0']}." in event_file.name
    events = read_events(run)
    steps = [e.step for e in events.Scalars("eval/loss")]  # 8 images, 2 ranks x 2 a batch
    assert steps == [2, 4]
    tags = [t for t in events.Tags()["images"] if t.startswith("features/")]
    assert tags and all([e.step for e in events.Images(t)] == steps for t in tags)
