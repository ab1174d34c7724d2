"""Run a benchmark protocol (docs/protocols.md) for several methods and seeds, and tabulate it.

    python benchmarks/protocol.py fmnist --methods finetune replay joint --seeds 0 1 2 \\
        --data-root ../shared/data
    python benchmarks/protocol.py tin32-cpu --methods replay --data-root ../shared/data/tiny-imagenet-32.tar.gz

Each run goes to ``<runs-dir>/<protocol>/<method>-s<seed>``; a finished run is read back, not
trained again, and an interrupted one is resumed, so the script can be re-run until it is done.
Prints a Markdown table (mean and sample standard deviation over seeds) with the command, commit,
device and date, ready for docs/results.md, and writes the same figures as JSON next to the runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from cilkit.experiment import Experiment, resolve
from cilkit.presets import load_yaml, set_dotted
from cilkit.results.rundir import RunDir, atomic_write_text

KEYS = [
    ("avg_incremental_accuracy", "avg inc. acc"),
    ("last_accuracy", "last acc"),
    ("last_task_mean_accuracy", "last task-mean"),
    ("avg_forgetting", "forgetting"),
    ("nme_avg_incremental_accuracy", "NME avg inc."),
    ("nme_last_accuracy", "NME last"),
    ("nme_avg_forgetting", "NME forgetting"),
]


def run_one(protocol: str, method: str, seed: int, root: str | None, device: str, runs_dir: Path, extra: list[dict],
            tag: str = "") -> dict:
    run_dir = runs_dir / protocol / f"{method}{'-' + tag if tag else ''}-s{seed}"
    run = RunDir(run_dir)
    if run.metrics_path.exists() and run.read_metrics().get("complete"):
        return run.read_metrics()
    if run.exists():
        return Experiment.resume(run_dir, progress="off").execute()
    layers = [load_yaml(f"protocols/{protocol}/{method}"), {"seed": seed, "device": device}] + extra
    if root:
        layers.append({"data": {"root": root}})
    return Experiment(resolve(layers), run_dir, progress="off").execute()


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol")
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--data-root")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs-dir", default="benchmarks/runs")
    p.add_argument("--set", action="append", default=[], help="extra config keys for every run, e.g. train.epochs=1")
    p.add_argument("--tag", default="", help="a name for runs with --set changes (run folders <method>-<tag>-s<seed>)")
    p.add_argument("--time-budget", type=float, help="seconds after which no new run is started")
    p.add_argument("--summary", help="where to write the JSON summary (default: next to the runs)")
    args = p.parse_args()

    log = logging.getLogger("cilkit")
    log.addHandler(logging.StreamHandler(sys.stderr))
    log.setLevel(logging.INFO)
    extra = [set_dotted({}, s) for s in args.set]
    rows, record = [], {"protocol": args.protocol, "command": " ".join(sys.argv), "commit": commit(),
                        "device": device_name(args.device), "date": time.strftime("%Y-%m-%d"), "methods": {}}
    name = "-".join(args.methods) + (f"-{args.tag}" if args.tag else "")
    out = Path(args.summary or Path(args.runs_dir) / args.protocol / f"summary-{name}.json")
    start = time.monotonic()
    for method in args.methods:
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            print(f"time budget spent: {method} and later methods not run", file=sys.stderr)
            break
        runs = [run_one(args.protocol, method, s, args.data_root, args.device, Path(args.runs_dir), extra, args.tag)
                for s in args.seeds]
        figures = {key: [r["summary"][key] for r in runs if key in r["summary"]] for key, _ in KEYS}
        minutes = [r["summary"]["wall_time_s"] / 60 for r in runs]
        first = [r["tasks"][0]["cnn"]["top1"] for r in runs]
        record["methods"][method] = {"seeds": args.seeds, "figures": figures, "wall_time_min": minutes, "first_task_top1": first}
        rows.append([method, str(len(runs))] + [fmt(figures[key]) for key, _ in KEYS] + [f"{statistics.mean(minutes):.1f}"])
        atomic_write_text(out, json.dumps(record, indent=2))  # after every method: an interrupted sweep keeps its figures

    header = ["method", "seeds"] + [label for _, label in KEYS] + ["min/run"]
    print(f"\n`{record['command']}` — commit {record['commit']}, {record['device']}, {record['date']}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
