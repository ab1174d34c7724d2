"""Training throughput of ResNet-32 on 32x32 images, three ways on the same device.

(a) ceiling: forward + backward + SGD step on one fixed, pre-made batch already on the device;
(b) cilkit: its own loop (``cilkit.training.loop.fit``): uint8 images in the in-memory store, batches
    drawn by index, random crop (pad 4) + flip + normalisation on whole batches;
(c) per-sample: a PIL-style ``Dataset`` (PIL pad/crop/flip, to-tensor, normalise per image) with a
    ``DataLoader`` of 2 worker processes, then the same training step.

    python benchmarks/throughput.py                      # CPU
    python benchmarks/throughput.py --device cuda        # GPU (bf16 autocast, channels_last)

Prints images per second for each and the ratios (b)/(a) and (b)/(c).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from cilkit.data.datasets import Dataset, ImageSet
from cilkit.data.scenario import make_scenario
from cilkit.driver import TaskDriver
from cilkit.experiment import build_driver, resolve
from cilkit.training.stage import Stage

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def synthetic(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=n)
    return Dataset("synthetic32", ImageSet(x, y), ImageSet(x[:100], y[:100]), [str(i) for i in range(10)], MEAN, STD)


def make_engine(ds: Dataset, device: str, batch: int, compile: bool = False) -> TaskDriver:
    cfg = resolve([{
        "method": "finetune", "device": device, "data": {"dataset": "digits"},
        "model": {"backbone": "resnet32"},
        "train": {"batch_size": batch, "augment": "crop_flip", "epochs": 1, "schedule": "constant", "compile": compile},
    }])
    eng = build_driver(cfg, make_scenario(ds, [10], order="identity"), progress="off")
    task = eng.scenario.tasks[0]
    eng.method.task = task
    eng.method.grow(task)
    eng.runtime.place(eng.net)
    return eng


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_fn(eng: TaskDriver):
    opt = torch.optim.SGD(eng.net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        with eng.runtime.autocast():
            loss = F.cross_entropy(eng.net(x)["logits"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def ceiling(eng: TaskDriver, batch: int, steps: int, warmup: int) -> float:
    x, y = eng.runtime.train_batch(torch.arange(batch))
    step = step_fn(eng)
    eng.net.train()
    for _ in range(warmup):
        step(x, y)
    sync(eng.runtime.device)
    t = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync(eng.runtime.device)
    return steps * batch / (time.perf_counter() - t)


def cilkit_path(eng: TaskDriver, batch: int, steps: int, warmup: int) -> float:
    stage = Stage(epochs=1, lr=0.01, schedule="constant", batch_size=batch)
    m = eng.method
    groups = [{"params": list(eng.net.parameters())}]
    m.fit(groups, torch.arange(warmup * batch, device=eng.runtime.device), stage, m.loss)
    sync(eng.runtime.device)
    stats = m.fit(groups, torch.arange(steps * batch, device=eng.runtime.device), stage, m.loss)
    sync(eng.runtime.device)
    return stats["images_per_s"]


class PILDataset(torch.utils.data.Dataset):
    """The usual per-sample pipeline: PIL image -> pad/crop/flip -> tensor -> normalise."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        img = ImageOps.expand(Image.fromarray(self.images[i]), border=4, fill=0)
        dx, dy = np.random.randint(0, 9, size=2)
        img = img.crop((dx, dy, dx + 32, dy + 32))
        if np.random.rand() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std, int(self.labels[i])


def per_sample_path(eng: TaskDriver, ds: Dataset, batch: int, steps: int, warmup: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(
        PILDataset(ds.train.images, ds.train.labels), batch_size=batch, shuffle=True, num_workers=workers,
        drop_last=True, pin_memory=eng.runtime.device.type == "cuda", persistent_workers=False,
    )
    step = step_fn(eng)
    eng.net.train()
    it = iter(loader)
    for _ in range(warmup):
        x, y = next(it)
        step(eng.runtime.to_memory_format(x.to(eng.runtime.device, non_blocking=True)), y.to(eng.runtime.device, non_blocking=True))
    sync(eng.runtime.device)
    t = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        step(eng.runtime.to_memory_format(x.to(eng.runtime.device, non_blocking=True)), y.to(eng.runtime.device, non_blocking=True))
    sync(eng.runtime.device)
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="each figure is the best of this many timings")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (train.compile)")
    p.add_argument("--skip-per-sample", action="store_true", help="measure (a) and (b) only")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    n = (args.steps + args.warmup) * args.batch_size
    ds = synthetic(max(n, 5000))
    eng = make_engine(ds, args.device, args.batch_size, args.compile)
    a = b = c = 0.0
    for _ in range(args.repeats):  # interleaved, so that a slow moment of the machine hits all three
        a = max(a, ceiling(eng, args.batch_size, args.steps, args.warmup))
        b = max(b, cilkit_path(eng, args.batch_size, args.steps, args.warmup))
        if not args.skip_per_sample:
            c = max(c, per_sample_path(eng, ds, args.batch_size, args.steps, args.warmup, args.workers))
    device = torch.cuda.get_device_name(0) if eng.runtime.device.type == "cuda" else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    result = {
        "device": device, "torch": torch.__version__, "batch_size": args.batch_size, "steps": args.steps,
        "amp_bf16": eng.runtime.amp, "channels_last": eng.runtime.channels_last, "compile": args.compile,
        "a_ceiling_img_s": a, "b_cilkit_img_s": b, "c_per_sample_img_s": c or None, "b_over_a": b / a,
        "b_over_c": b / c if c else None,
    }
    print(f"device: {device}  torch {torch.__version__}  batch {args.batch_size}  bf16 {eng.runtime.amp}  "
          f"channels_last {eng.runtime.channels_last}  compile {args.compile}")
    print(f"(a) ceiling, fixed batch      {a:10.0f} img/s")
    print(f"(b) cilkit data path          {b:10.0f} img/s   (b)/(a) = {b / a:.3f}")
    if c:
        print(f"(c) PIL Dataset + DataLoader  {c:10.0f} img/s   (b)/(c) = {b / c:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
