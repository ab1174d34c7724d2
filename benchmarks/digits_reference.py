"""Record, or check against the record, the full metrics of every method on the embedded digits.

Each method runs its default config (digits, B0-Inc2, convnet, seed 0) on the CPU with one thread,
where training is deterministic. ``--record`` writes ``benchmarks/reference/digits/<method>.json``;
the default ``--check`` reruns and compares the per-task figures, the summary and the accuracy
matrices (timings left out) with the record, so a refactoring that must change no behaviour can be
verified to leave every figure identical.

    python benchmarks/digits_reference.py --record            # before the change
    python benchmarks/digits_reference.py                     # after it: exit 1 on any difference
    python benchmarks/digits_reference.py --methods der bic   # a subset (a method or a VARIANTS name)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REFERENCE = Path(__file__).resolve().parent / "reference" / "digits"
TIMING = ("seconds", "time", "per_s")  # keys whose values are wall-clock measurements
COMPARED = ("tasks", "summary", "accuracy_matrix", "nme_accuracy_matrix", "class_order", "increments")
# Options that take other code paths (extra stages, masks, other batching or memory rules), recorded
# beside the defaults: name -> (method, method_args).
VARIANTS = {
    "lwf+warmup": ("lwf", {"warmup_epochs": 2}),
    "bic+pycil": ("bic", {"val_split": "pycil", "stage2_bn_train": True, "stage2_double_softmax": True, "bias_pairs": "all"}),
    "bic+all": ("bic", {"bias_pairs": "all"}),  # recorded as BiC's default before it became "newest" (issue 9)
    "der+mask": ("der", {"mask": True}),
    "der+memory": ("der", {"relearn_data": "memory", "warmup_epochs": 2}),
    "der+wa": ("der", {"classifier_stage": "weight_align"}),
    "ssil+paper": ("ssil", {"memory_rule": "paper", "epoch": "zip"}),
    "podnet+official": ("podnet", {"grad_clamp": 5.0, "nca_compat": True, "flat_loss": "cosine"}),
    "coil+pycil": ("coil", {"marginals": "pycil", "pt_old_prototypes": "data", "rt_every": 3}),
    "spb-i+instance": ("spb-i", {"ssl": "instance"}),
    "spb-m+all": ("spb-m", {"distill_views": "all", "inference": "upright"}),
    "icarl+kd": ("icarl", {"loss": "softmax_kd"}),
    "ucir+nocbf": ("ucir", {"cbf": False, "imprint": False}),
    "lwm+student": ("lwm", {"attention_class": "student", "distill": "bce"}),
    "finetune+new": ("finetune", {"ce_mask": "new"}),
}


def strip_timings(node):
    """``node`` without the wall-clock figures (and the device string), recursively."""
    if isinstance(node, dict):
        return {k: strip_timings(v) for k, v in node.items() if k != "device" and not any(t in k for t in TIMING)}
    if isinstance(node, list):
        return [strip_timings(v) for v in node]
    return node


def differences(a, b, path: str = "") -> list[str]:
    """Every place where ``a`` and ``b`` differ, as dotted paths with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'recorded' if k in a else 'current'}")
            else:
                out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: recorded {a!r}, current {b!r}"]


def run_method(name: str) -> dict:
    import cilkit

    method, args = VARIANTS.get(name, (name, {}))
    with tempfile.TemporaryDirectory() as tmp:
        # eval.batch_size pinned to the batch the reference was recorded with (the CPU default became 128)
        config = {"method": method, "method_args": args, "device": "cpu", "eval": {"batch_size": 1024}}
        metrics = cilkit.run(config, run_dir=Path(tmp) / "run", progress="off")
    return strip_timings(metrics)


def main(argv: list[str] | None = None) -> int:
    from cilkit.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", action="store_true", help="write the reference instead of checking against it")
    p.add_argument("--methods", nargs="*", default=sorted(METHODS) + sorted(VARIANTS), help="methods or variants")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    REFERENCE.mkdir(parents=True, exist_ok=True)
    failed = []
    for method in args.methods:
        start = time.perf_counter()
        try:
            current = run_method(method)
        except Exception as e:  # a run that fails is a difference, reported with the others
            print(f"{method:16s} failed: {type(e).__name__}: {e}", flush=True)
            failed.append(method)
            continue
        path = REFERENCE / f"{method}.json"
        if args.record:
            path.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
            status = "recorded"
        elif not path.exists():
            status = "no reference recorded (record it with --record --methods NAME)"
        else:
            recorded, now = json.loads(path.read_text()), json.loads(json.dumps(current))
            diffs = differences({k: recorded.get(k) for k in COMPARED}, {k: now.get(k) for k in COMPARED})
            status = "identical" if not diffs else f"{len(diffs)} differences: " + "; ".join(diffs[:5])
            if diffs:
                failed.append(method)
        last = current["summary"].get("last_accuracy")
        print(f"{method:16s} last {last:6.2f}  {time.perf_counter() - start:6.1f}s  {status}", flush=True)
    if failed:
        print(f"different: {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
