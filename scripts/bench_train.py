"""Per-epoch wall time of a short YOLOv8n training with and without a FeatureLogger.

Runs each variant in its own process, alternating, on the synthetic shapes data set:
plain, logged without class activation maps (``cam=None``) and logged with them (the
default), and reports the median epoch time (epoch start to the end of on_fit_epoch_end,
so the logger's epoch-end probe is inside) and the overheads.

    python scripts/bench_train.py --epochs 4 --repeats 2
    python scripts/bench_train.py --n-train 256 --imgsz 160   # the demo's data set
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
from ultralytics import YOLO
from tbfeat import FeatureLogger
data, project, epochs, imgsz, batch, use = sys.argv[1:7]
yolo = YOLO("yolov8n.yaml")
times, t0 = [], [0.0]
yolo.add_callback("on_train_epoch_start", lambda tr: t0.__setitem__(0, time.perf_counter()))
yolo.add_callback("on_fit_epoch_end", lambda tr: times.append(time.perf_counter() - t0[0]))
kw = dict(data=data, epochs=int(epochs), imgsz=int(imgsz), batch=int(batch), workers=0,
          device="cpu", plots=False, project=project, name="exp", amp=False, verbose=False,
          seed=0, deterministic=False, val=True)
if use != "0":
    with FeatureLogger(yolo, cam=None if use == "1" else "layercam"):
        yolo.train(**kw)
else:
    yolo.train(**kw)
print(json.dumps(times[: int(epochs)]))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-train", type=int, default=64)
    args = p.parse_args()
    from tbfeat.synthetic import make_shapes_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = make_shapes_dataset(
            Path(tmp) / "data", n_train=args.n_train, n_val=8, imgsz=args.imgsz
        )
        results: dict[str, list[float]] = {"plain": [], "logged": [], "cams": []}
        for r in range(args.repeats):
            for name, use in (("plain", "0"), ("logged", "1"), ("cams", "2")):
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        str(data),
                        f"{tmp}/{name}{r}",
                        str(args.epochs),
                        str(args.imgsz),
                        str(args.batch),
                        use,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                # the first epoch carries start-up costs; compare the rest
                results[name] += json.loads(out.stdout.strip().splitlines()[-1])[1:]
    plain, logged = statistics.median(results["plain"]), statistics.median(results["logged"])
    cams = statistics.median(results["cams"])
    print(
        f"median epoch: plain {plain:.3f}s, with FeatureLogger(cam=None) {logged:.3f}s "
        f"({100 * (logged / plain - 1):+.1f}%), with class activation maps {cams:.3f}s "
        f"({100 * (cams / plain - 1):+.1f}%; {100 * (cams / logged - 1):+.1f}% over cam=None)"
    )


if __name__ == "__main__":
    main()
