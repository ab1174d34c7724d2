"""Seq-MNIST in the online setting (Buzzega et al., NeurIPS 2020, Table 2, Class-IL), and the table of it.

    python benchmarks/online.py --data-root ../shared/data --seeds 0 1 2 \\
        --methods finetune lwf oewc si er-200 er-500 er-5120 agem-200 icarl-200 dark-er-200 ...

Every name is a preset under ``papers/seq-mnist/`` (the method and, for the rehearsal methods, the
buffer size). Each run goes to ``<runs-dir>/seq-mnist/<name>-s<seed>``; a finished run is read back, so
the script can be re-run until it is done. Prints a Markdown table: the paper's figure (the mean of
the accuracy matrix's last row, ``last_task_mean_accuracy``; the NME head's for iCaRL, which Mammoth
evaluates with NME), cilkit's mean and standard deviation over seeds, the distance, the class-weighted
last accuracy and the wall time, with the command, commit, device and date.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from cilkit.experiment import Experiment, resolve
from cilkit.presets import load_yaml
from cilkit.results.rundir import RunDir

# Buzzega et al., "Dark Experience for General Continual Learning", NeurIPS 2020, main table, S-MNIST,
# Class-IL (mean of 10 runs), as the authors' repository aimagelab/mammoth printed it in its README
# (commits 7ab9db9 to c66408f, 2020-10 to 2021-01; means only).
PUBLISHED: dict[str, float] = {
    "finetune": 19.60, "oewc": 20.46, "si": 19.27, "lwf": 19.62,
    "er-200": 80.43, "er-500": 86.12, "er-5120": 93.40,
    "gem-200": 80.11, "gem-500": 85.99, "gem-5120": 95.11,
    "agem-200": 45.72, "agem-500": 46.66, "agem-5120": 54.24,
    "icarl-200": 70.51, "icarl-500": 70.10, "icarl-5120": 70.60,
    "dark-er-200": 84.55, "dark-er-500": 90.54, "dark-er-5120": 94.90,
    "dark-er++-200": 85.61, "dark-er++-500": 91.00, "dark-er++-5120": 95.30,
}


def run_one(name: str, seed: int, root: str, runs_dir: Path, threads: int) -> dict:
    run_dir = runs_dir / "seq-mnist" / f"{name}-s{seed}"
    run = RunDir(run_dir)
    if run.metrics_path.exists() and run.read_metrics().get("complete"):
        return run.read_metrics()
    if run.exists():
        return Experiment.resume(run_dir, progress="off").execute()
    layers = [load_yaml(f"papers/seq-mnist/{name}"), {"seed": seed, "device": "cpu", "threads": threads, "data": {"root": root}}]
    return Experiment(resolve(layers), run_dir, progress="off").execute()


def figure(metrics: dict) -> float:
    s = metrics["summary"]
    if metrics["method"] == "icarl":
        return s["nme_last_task_mean_accuracy"]
    return s["last_task_mean_accuracy"]


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--methods", nargs="+", required=True, help="preset names under papers/seq-mnist/")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--runs-dir", default="runs/bench")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    rows = []
    for name in args.methods:
        results = [run_one(name, s, args.data_root, Path(args.runs_dir), args.threads) for s in args.seeds]
        ours = [figure(m) for m in results]
        pub = PUBLISHED.get(name)
        dist = f"{statistics.mean(ours) - pub:+.2f}" if pub is not None else "-"
        last = fmt([m["summary"]["last_accuracy"] for m in results])
        secs = statistics.mean(m["summary"]["wall_time_s"] for m in results)
        rows.append(f"| {name} | {pub if pub is not None else '-'} | {fmt(ours)} | {dist} | {last} | {secs:.0f} |")
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n`{' '.join([Path(sys.executable).name] + sys.argv)}` — commit {commit}, {platform.machine()} CPU, "
          f"{args.threads} thread(s), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, seeds {args.seeds}\n")
    print("| preset | paper | cilkit (last-row mean) | distance | class-weighted last | s/run |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
