"""Tables of results: the per-task table of one run, and the comparison of several runs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from cilkit.results.rundir import atomic_write_text


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def topk_key(metrics: dict) -> str:
    """The key of the top-k accuracy of a run (``top5`` by default, ``top1`` when ``eval.topk`` is 1)."""
    return f"top{metrics.get('topk', 5)}"


def task_table(metrics: dict) -> str:
    """One row per task: classes seen, CNN top-1/top-k, old/new, NME top-1, time."""
    has_nme = bool(metrics["tasks"]) and "nme" in metrics["tasks"][0]
    topk = topk_key(metrics)
    header = ["task", "classes", "top1", topk, "old", "new"] + (["nme_top1"] if has_nme else []) + ["time_s"]
    rows = []
    for t in metrics["tasks"]:
        cnn = t["cnn"]
        row = [t["task"] + 1, t["n_seen"], cnn["top1"], cnn.get(topk), cnn["old"], cnn["new"]]
        rows.append(row + ([t["nme"]["top1"]] if has_nme else []) + [t["wall_time_s"]])
    return format_table(header, rows)


def summary_text(metrics: dict) -> str:
    s = metrics["summary"]
    parts = [
        f"average incremental accuracy {s['avg_incremental_accuracy']:.2f}",
        f"last accuracy {s['last_accuracy']:.2f}" + (f" (task mean {s['last_task_mean_accuracy']:.2f})"
                                                     if "last_task_mean_accuracy" in s else ""),
        f"forgetting {s['avg_forgetting']:.2f}",
        f"BWT {s['bwt']:.2f}",
    ]
    if "nme_avg_incremental_accuracy" in s:
        parts.append(f"NME average {s['nme_avg_incremental_accuracy']:.2f} / last {s['nme_last_accuracy']:.2f}")
    parts.append(f"time {s['wall_time_s']:.1f}s")
    return "summary (CNN, %): " + ", ".join(parts)


def metrics_csv(metrics: dict) -> str:
    """Per-task figures as CSV rows (one per task; the NME columns are empty without a memory)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    topk = topk_key(metrics)
    w.writerow(["task", "n_seen", "top1", topk, "old", "new", "nme_top1", f"nme_{topk}", "wall_time_s", "train_images_per_s"])
    for t in metrics["tasks"]:
        cnn, nme = t["cnn"], t.get("nme", {})
        w.writerow([t["task"], t["n_seen"], cnn["top1"], cnn.get(topk), cnn["old"], cnn["new"],
                    nme.get("top1"), nme.get(topk), t["wall_time_s"], t["train_images_per_s"]])
    return buf.getvalue()


COMPARE_HEADER = ["run", "method", "dataset", "scenario", "backbone", "seed", "tasks", "avg_inc_acc", "last_acc",
                  "last_task_mean", "forgetting", "nme_avg", "nme_last", "time_s"]
SETTING = ("dataset", "scenario", "backbone", "n_classes")  # what must agree for runs to be compared


def load_runs(paths: list[str]) -> tuple[list[tuple[str, dict]], list[str]]:
    """``(name, metrics)`` of each run folder with a readable metrics.json, in the order given, and one
    line for each folder that was skipped (no metrics.json, not valid JSON, not a run's metrics)."""
    runs, skipped = [], []
    for p in paths:
        f = Path(p) / "metrics.json"
        if not f.is_file():
            skipped.append(f"{p}: no metrics.json")
            continue
        try:
            m = json.loads(f.read_text())
            if not isinstance(m, dict) or not isinstance(m.get("tasks"), list) or "method" not in m:
                raise ValueError("not the metrics of a cilkit run")
        except (ValueError, UnicodeDecodeError) as e:
            skipped.append(f"{f}: unreadable ({type(e).__name__}: {e})")
            continue
        if "backbone" not in m:  # runs written before metrics.json named the backbone
            try:
                import yaml

                m["backbone"] = (yaml.safe_load((Path(p) / "config.yaml").read_text()) or {})["model"]["backbone"]
            except Exception:
                m["backbone"] = None
        runs.append((Path(p).name, m))
    return runs, skipped


def setting_of(m: dict) -> tuple:
    n_classes = sum(m.get("increments") or []) or None
    return tuple(n_classes if k == "n_classes" else m.get(k) for k in SETTING)


def progress_of(m: dict) -> str:
    """``5/5``, or ``1/3 incomplete`` for a run that has not finished."""
    done, total = len(m.get("tasks") or []), len(m.get("increments") or []) or len(m.get("tasks") or [])
    return f"{done}/{total}" + ("" if m.get("complete") else " incomplete")


def comparison_rows(runs: list[tuple[str, dict]]) -> list[list]:
    rows = []
    for name, m in runs:
        s = m.get("summary") or {}
        rows.append([
            name, m["method"], m.get("dataset"), m.get("scenario"), m.get("backbone"), m.get("seed"), progress_of(m),
            s.get("avg_incremental_accuracy"), s.get("last_accuracy"), s.get("last_task_mean_accuracy"), s.get("avg_forgetting"),
            s.get("nme_avg_incremental_accuracy"), s.get("nme_last_accuracy"), s.get("wall_time_s"),
        ])
    return rows


def comparison_notes(runs: list[tuple[str, dict]]) -> list[str]:
    """Warnings for the reader of a comparison: unfinished runs, and runs of different settings."""
    notes = [f"{name} is not finished ({progress_of(m)}): its figures cover the tasks done so far" for name, m in runs
             if not m.get("complete")]
    settings = {setting_of(m) for _, m in runs}
    if len(settings) > 1:
        notes.append("these runs differ in " + ", ".join(k for i, k in enumerate(SETTING) if len({s[i] for s in settings}) > 1)
                     + ": their figures are not comparable; the plot labels each with its setting")
    return notes


def plot_label(name: str, m: dict, runs: list[tuple[str, dict]]) -> str:
    """The run's name, with its setting when the runs differ in it, and a mark when it is unfinished."""
    label = name
    if len({setting_of(r) for _, r in runs}) > 1:
        label += f" [{m.get('dataset')} {m.get('scenario')} {m.get('backbone')}]"
    return label if m.get("complete") else label + f" ({progress_of(m)})"


def write_comparison_csv(rows: list[list], path: Path) -> None:
    buf = io.StringIO()
    csv.writer(buf).writerows([COMPARE_HEADER] + rows)
    atomic_write_text(path, buf.getvalue())
