"""Export every method's model in both formats and both heads, and check each file against cilkit's scores.

Each method trains its smoke run (the embedded digits, two tasks of five classes, a small convnet, one epoch,
one thread); the model after the last task is exported with ``cilkit.export.export`` (TorchScript, and ONNX
when onnx and onnxruntime are installed) for the classifier and, where the method keeps exemplars, for NME.
Every export is checked on random images against ``model.scores``; the table gives the largest difference,
or why the export was refused.

    python benchmarks/export_all.py                     # every method
    python benchmarks/export_all.py --methods bic der   # some
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import cilkit
from cilkit.export import export, onnx_available
from cilkit.methods import METHODS

SMOKE = {"scenario": {"name": "B0-Inc5"}, "model": {"backbone": "convnet", "widths": [8, 16]},
         "train": {"epochs": 1, "batch_size": 32}, "threads": 1, "device": "cpu"}
ARGS = {"acil": {"buffer_size": 512}, "ds-al": {"buffer_size": 512}, "gdumb": {"epochs": 2}}  # the defaults cost minutes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=sorted(METHODS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    formats = ["torchscript", "onnx"] if onnx_available() else ["torchscript"]
    print("| method | " + " | ".join(f"{f} {h}" for f in formats for h in ("cnn", "nme")) + " |")
    print("|---" * (1 + 2 * len(formats)) + "|")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            layer = {**SMOKE, "method": name, "method_args": ARGS.get(name, {})}
            if METHODS[name].memory_use == "required":
                layer["memory"] = {"size": 60}
            cilkit.run(layer, run_dir=Path(tmp) / name)
            model = cilkit.load(Path(tmp) / name, device="cpu")
            cells = []
            for fmt in formats:
                for head in ("cnn", "nme"):
                    if head not in model.heads:
                        cells.append("-")
                        continue
                    try:
                        cells.append(f"{export(model, fmt, Path(tmp) / f'{name}-out', head)['max_difference']:.2g}")
                    except cilkit.errors.CilkitError as e:
                        failed += 1
                        cells.append(f"refused: {e}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
