"""Per-step overhead in the online setting: cilkit's training throughput against the model's own step.

    python benchmarks/online_speed.py --data-root ../shared/data [--threads 1]

At batch 10 the step is so small that whatever runs beside the model's forward and backward (batch
gathering, the replay draw, the reservoir insertion, the schedule, the loop's bookkeeping) shows. For
the Seq-MNIST network (MLP 784-100-100-10, plain SGD) it times:

- the model's own step, a bare loop of forward + cross-entropy + backward + SGD step on one fixed
  batch already in memory, at batch 10 (finetune's step) and 20 (ER's step: 10 stream + 10 replayed);
- cilkit's first task of Seq-MNIST (12,665 images, one pass) with ``finetune`` and ``er`` (buffer 500,
  reservoir), from the run's own ``train_images_per_s`` (stream images per second, every cost of the
  loop included).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from cilkit.experiment import build_driver, build_scenario, resolve
from cilkit.presets import load_yaml


def bare_step_rate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3000) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()

    def step():
        loss = F.cross_entropy(net(x)["logits"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(200):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(y) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="each figure is the best of this many timings")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for name in ("finetune", "er-500"):
        cfg = resolve([load_yaml(f"papers/seq-mnist/{name}"), {"data": {"root": args.data_root}, "device": "cpu"}])
        scenario = build_scenario(cfg)
        best = 0.0
        for _ in range(args.repeats):
            driver = build_driver(cfg, scenario, progress="off")
            record = driver.run_task(scenario.tasks[0])
            best = max(best, record["train_images_per_s"])
        rows[name] = best
        if name == "finetune":
            x, y = driver.runtime.train_batch(torch.arange(20))
            for b in (10, 20):
                rows[f"bare step, batch {b}"] = max(bare_step_rate(driver.net, x[:b], y[:b]) for _ in range(args.repeats))
    print(f"{platform.machine()} CPU, {args.threads} thread(s), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| path | images/s |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:,.0f} |")
    print(f"\nfinetune / bare step at batch 10: {rows['finetune'] / rows['bare step, batch 10']:.2f}; "
          f"er-500 (stream images) / bare step at batch 20 (per stream image: x2): "
          f"{rows['er-500'] / (rows['bare step, batch 20'] / 2):.2f}")


if __name__ == "__main__":
    main()
