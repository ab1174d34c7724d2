"""How long ``cilkit predict`` takes on a folder of image files, beside its two parts measured alone.

A small run is trained (the embedded digits on the convnet, or generated 32x32 RGB images on ResNet-32),
``--images`` PNG files are written to a folder, then three timings are taken on the same files:

* decode: every file opened and decoded with PIL as predict does (``cilkit.trained`` decoding), one after another;
* forward: the model's scores over the decoded images, in the run's evaluation batches (after one warm-up batch);
* predict: ``model.predict(folder)``, which lists the folder, decodes the next batch in a thread while the model
  runs the current one, and ranks the classes; also ``cilkit predict RUN FOLDER --out p.csv`` in a new process
  (Python start-up, loading the run, the table and the CSV included).

    python benchmarks/predict_speed.py --images 10000                       # digits, convnet
    python benchmarks/predict_speed.py --images 10000 --backbone resnet32   # 32x32 RGB, ResNet-32
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import cilkit
from cilkit.data.inputs import _decode, collect


def train(root: Path, backbone: str, threads: int) -> Path:
    run = root / "run"
    common = {"threads": threads, "device": "cpu", "train": {"epochs": 1, "first_epochs": 1, "batch_size": 32,
                                                              "schedule": "constant", "milestones": [], "first_milestones": None,
                                                              "augment": "none"}}
    if backbone == "convnet":
        cilkit.run({**common, "method": "replay", "scenario": {"name": "B0-Inc5"}, "memory": {"size": 60}}, run_dir=run)
    else:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (400, 32, 32, 3), dtype=np.uint8)
        y = np.arange(400) % 10
        np.savez(root / "rgb.npz", x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
        cilkit.run({**common, "method": "replay", "data": {"dataset": "numpy", "root": str(root / "rgb.npz")},
                    "model": {"backbone": "resnet32"}, "scenario": {"name": "B0-Inc5"}, "memory": {"size": 60}},
                   run_dir=run)
    return run


def write_folder(folder: Path, n: int, shape: tuple[int, int, int]) -> None:
    folder.mkdir()
    rng = np.random.default_rng(1)
    c, h, w = shape
    pool = rng.integers(0, 256, (64, h, w, c), dtype=np.uint8)
    for i in range(n):
        image = pool[i % len(pool)]
        Image.fromarray(image[..., 0] if c == 1 else image).save(folder / f"{i:05d}.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--backbone", choices=["convnet", "resnet32"], default="convnet")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = train(root, args.backbone, args.threads)
        model = cilkit.load(run, device="cpu", threads=args.threads)
        p = model.prep
        folder = root / "images"
        write_folder(folder, args.images, (p.channels, p.height, p.width))
        files = [item.path for item in collect([folder], p)]

        start = time.perf_counter()
        decoded = np.stack([_decode(f, p) for f in files])
        decode_s = time.perf_counter() - start

        size = model.driver.runtime.eval_batch_size
        model.scores(decoded[:size])
        start = time.perf_counter()
        for i in range(0, len(decoded), size):
            model.scores(decoded[i: i + size])
        forward_s = time.perf_counter() - start

        start = time.perf_counter()
        predictions = model.predict(folder)
        predict_s = time.perf_counter() - start
        assert len(predictions) == args.images

        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cilkit", "predict", str(run), str(folder), "--out", str(root / "p.csv"),
                        "--device", "cpu", "--threads", str(args.threads)], check=True, capture_output=True)
        cli_s = time.perf_counter() - start
    n = args.images
    print(f"{n} images {p.width}x{p.height}x{p.channels}, {args.backbone}, {args.threads} torch thread(s), batch {size}")
    print(f"decode alone   {decode_s:7.2f} s  ({n / decode_s:8.0f} img/s)")
    print(f"forward alone  {forward_s:7.2f} s  ({n / forward_s:8.0f} img/s)")
    print(f"sum            {decode_s + forward_s:7.2f} s")
    print(f"model.predict  {predict_s:7.2f} s  ({n / predict_s:8.0f} img/s)  {predict_s / (decode_s + forward_s):.2f} x the sum")
    print(f"cilkit predict {cli_s:7.2f} s  (new process: start-up, load, table and CSV included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
