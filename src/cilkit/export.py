"""``cilkit export``: a trained run as one self-contained model file (TorchScript or ONNX) and ``classes.json``.

The exported model takes uint8 images (N, H, W, C) of the run's stored size (what ``cilkit predict``
decodes files to: resized and centre-cropped when the run's ``data.image_size`` did so) and returns the
scores over all seen classes, as the run's evaluation computes them: the padding (``data.pad``) and the
normalisation are inside, then the method's own ``inference`` (BiC's bias layers, DER's concatenated
extractors, PODNet's local similarity classifier, FeCAM's Mahalanobis distances, ...) or, for the NME head,
minus the squared distance to the class means, which are constants of the file. Column ``j`` is class
``classes[j]`` of ``classes.json``.

Both formats record the method's inference by tracing it on an example batch: whatever Python decides
(which blocks exist, which classifier a hyperparameter picks) is fixed at export time, which is right for
a finished task. Every export is checked on random images of another batch size against the scores
cilkit computes, so a method whose inference a trace cannot record (one that branches on the values of
its input) is refused instead of written wrong.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cilkit.errors import CilkitError
from cilkit.results.rundir import atomic_write_bytes, atomic_write_text
from cilkit.trained import TrainedModel, classes_json

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}  # model.pt, model-nme.pt, model.onnx, model-nme.onnx


def file_name(fmt: str, head: str) -> str:
    return f"model{'-nme' if head == 'nme' else ''}{FORMATS[fmt]}"
TOLERANCE = 1e-4  # on the scores (float32 through another graph runtime: sums in another order)


class ExportError(CilkitError):
    """The model cannot be exported as asked (format, head, missing package, an inference a trace cannot record)."""


class ExportedModel(torch.nn.Module):
    """uint8 (N, H, W, C) images -> scores over the seen classes, the run's preprocessing inside."""

    def __init__(self, model: TrainedModel, head: str = "cnn"):
        super().__init__()
        model.check_head(head)
        self.parts = torch.nn.ModuleDict(model.modules())  # the method's modules: their parameters are the file's
        object.__setattr__(self, "_method", model.method)  # called, not registered (a method is not a module)
        prep = model.prep
        std = torch.tensor(prep.std, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, -1, 1, 1))  # as BatchAugment.normalize
        self.register_buffer("shift", (-torch.tensor(prep.mean, dtype=torch.float32) / std).view(1, -1, 1, 1))
        self.pad = prep.pad
        self.n_seen = model.n_seen
        self.nme = head == "nme"
        if self.nme:
            means = model.class_means.float().cpu()
            self.register_buffer("means", means.nan_to_num(0.0))
            self.register_buffer("absent", means.isnan().any(1)[None])  # a class without a mean: -inf
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        if self.pad:
            x = F.pad(x, [self.pad] * 4)  # zeros, as data.pad gave the stored images
        x = torch.addcmul(self.shift, x, self.scale)
        out = self._method.inference(x)
        if not self.nme:
            return out["logits"][:, : self.n_seen].float()
        f = F.normalize(out["features"].float(), dim=1)
        d2 = (f * f).sum(1, keepdim=True) - 2.0 * f @ self.means.T + (self.means * self.means).sum(1)[None]
        return (-d2).masked_fill(self.absent, float("-inf"))


def example_images(model: TrainedModel, n: int, seed: int = 0) -> torch.Tensor:
    p = model.prep
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, p.height, p.width, p.channels), dtype=np.uint8))


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _on_cpu(model: TrainedModel) -> None:
    if model.device.type != "cpu" or model.driver.runtime.amp:
        raise ExportError("export from a model loaded on the CPU (cilkit.load(run, device='cpu')): a traced graph keeps "
                          "the device it was traced on")


def trace(model: TrainedModel, head: str = "cnn") -> torch.jit.ScriptModule:
    """The TorchScript module of the model's inference (traced on an example batch)."""
    _on_cpu(model)
    module = ExportedModel(model, head)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on Python values that the trace fixes (checked after)
        try:
            return torch.jit.trace(module, (example_images(model, 2),), check_trace=False)
        except Exception as e:  # noqa: BLE001 - what torch refuses to trace
            raise ExportError(f"method '{model.method.name}': its inference cannot be traced to TorchScript "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def to_torchscript(model: TrainedModel, head: str = "cnn") -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 points to torch.export; the format still loads
        torch.jit.save(trace(model, head), buf, _extra_files={"classes.json": classes_json(model, head)})
    return buf.getvalue()


def _rot90_symbolic(g, x, k, dims):
    """``torch.rot90`` for the ONNX exporter (it has none; SPB-M's perspectives rotate the batch): a quarter
    turn over (a, b) is a flip of b then a swap of a and b; two are flips of both; three, the swap then the flip."""
    from torch.onnx import symbolic_helper as helper

    k = helper._maybe_get_const(k, "i") % 4
    a, b = helper._maybe_get_const(dims, "is")
    rank = helper._get_tensor_rank(x)

    def const(v: int):
        return g.op("Constant", value_t=torch.tensor([v]))

    def flip(t, d: int):
        return g.op("Slice", t, const(-1), const(-(2**63) + 1), const(d), const(-1))

    def swap(t):
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return g.op("Transpose", t, perm_i=perm)

    if k == 0:
        return x
    return swap(flip(x, b)) if k == 1 else flip(flip(x, a), b) if k == 2 else flip(swap(x), b)


@contextlib.contextmanager
def _quiet():
    """File descriptors 1 and 2 sent to /dev/null for the block (what C++ code prints there, too)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def to_onnx(model: TrainedModel, head: str = "cnn", opset: int = 17) -> bytes:
    """The ONNX model (the TorchScript-based exporter, so no onnxscript): input ``images`` uint8 (N, H, W, C),
    output ``scores`` (N, seen classes), the batch size dynamic."""
    if not onnx_available():
        raise ExportError("ONNX export needs the packages onnx and onnxruntime: pip install onnx onnxruntime, or the extra: pip install -e '.[export]'")
    _on_cpu(model)
    module = ExportedModel(model, head)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation note, TracerWarnings (checked after)
        torch.onnx.register_custom_op_symbolic("aten::rot90", _rot90_symbolic, 9)
        try:
            with _quiet():  # a refused operator makes the exporter print the whole graph
                torch.onnx.export(module, (example_images(model, 2),), buf, dynamo=False, opset_version=opset,
                                  input_names=["images"], output_names=["scores"],
                                  dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}})
        except Exception as e:  # noqa: BLE001 - an operator ONNX has no form for, ...
            raise ExportError(f"method '{model.method.name}': its inference cannot be exported to ONNX "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    import onnx

    graph = onnx.load_from_string(buf.getvalue())
    entry = graph.metadata_props.add()  # the class names travel inside the file too
    entry.key, entry.value = "classes.json", classes_json(model, head)
    return graph.SerializeToString()


def run_torchscript(data: bytes | str | Path, images: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(io.BytesIO(data) if isinstance(data, bytes) else str(data), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(images))).numpy()


def run_onnx(data: bytes | str | Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(data if isinstance(data, bytes) else str(data), providers=["CPUExecutionProvider"])
    return session.run(["scores"], {"images": np.ascontiguousarray(images)})[0]


RUNNERS = {"torchscript": run_torchscript, "onnx": run_onnx}


def check_export(model: TrainedModel, fmt: str, data: bytes, head: str, n: int = 5) -> float:
    """The largest difference between the exported model's scores and cilkit's on ``n`` random images (another
    batch size than the trace's); ExportError above the tolerance."""
    x = example_images(model, n, seed=1).numpy()
    ours = model.scores(x, head).cpu().numpy()
    try:
        theirs = RUNNERS[fmt](data, x)
    except Exception as e:  # noqa: BLE001 - the graph fails on another batch size than the trace's
        raise ExportError(f"method '{model.method.name}': the exported {fmt} model fails on a batch of {n} images "
                          f"({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}): its "
                          "inference depends on the batch size in a way a trace cannot record") from None
    if theirs.shape != ours.shape:
        raise ExportError(f"method '{model.method.name}': the exported {fmt} model gives scores of shape {theirs.shape} "
                          f"on {n} images, cilkit {ours.shape}: its inference depends on the batch size in a way a "
                          "trace cannot record")
    finite = np.isfinite(ours)
    if not np.array_equal(finite, np.isfinite(theirs)):
        raise ExportError(f"method '{model.method.name}': the exported {fmt} model's scores differ from cilkit's "
                          "(infinite in other places)")
    diff = float(np.abs(ours[finite] - theirs[finite]).max()) if finite.any() else 0.0
    scale = max(1.0, float(np.abs(ours[finite]).max()) if finite.any() else 1.0)
    if diff > TOLERANCE * scale:
        raise ExportError(f"method '{model.method.name}': the exported {fmt} model's scores differ from cilkit's by "
                          f"{diff:.3g} (more than {TOLERANCE:g} x {scale:.3g}); its inference is not one a trace records")
    return diff


def export(model: TrainedModel, fmt: str, out_dir: str | Path | None = None, head: str = "cnn") -> dict:
    """Write ``model.pt`` (TorchScript) or ``model.onnx`` (``model-nme.*`` for the NME head) and ``classes.json``
    into ``out_dir`` (default: ``<run>/export``), after checking the file against cilkit's scores; returns the
    paths and the largest difference seen. The class names are inside the file too (TorchScript: the extra file
    ``classes.json``; ONNX: the metadata entry ``classes.json``, which also says the head)."""
    if fmt not in FORMATS:
        raise ExportError(f"format '{fmt}' is not allowed; choose one of: {', '.join(FORMATS)}")
    model.check_head(head)
    data = to_torchscript(model, head) if fmt == "torchscript" else to_onnx(model, head)
    diff = check_export(model, fmt, data, head)
    out = Path(out_dir) if out_dir is not None else model.run.path / "export"
    try:
        atomic_write_bytes(out / file_name(fmt, head), data)
        atomic_write_text(out / "classes.json", classes_json(model))
    except OSError as e:
        raise ExportError(f"cannot write to {out}: {e.strerror or e}") from None
    return {"model": out / file_name(fmt, head), "classes": out / "classes.json", "max_difference": diff}
