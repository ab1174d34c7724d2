"""The ``cilkit`` command: ``run``, ``methods``, ``configs``, ``report``, ``predict``, ``export`` and ``extend``.

Any configuration or data error prints one message naming the field and exits with code 2
before training starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cilkit import __version__
from cilkit.errors import CilkitError

log = logging.getLogger("cilkit")


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run a class-incremental experiment (no arguments: the embedded digits example)")
    p.add_argument("--config", help="YAML file or packaged preset (see `cilkit configs`)")
    p.add_argument("--method", help="method name (see `cilkit methods`)")
    p.add_argument("--dataset", help="digits, mnist, fashion-mnist (fmnist), cifar10, cifar100, tinyimagenet, imagefolder, numpy")
    p.add_argument("--data-root", help="where the dataset lives")
    p.add_argument("--download", action="store_true", help="download the dataset if missing (CIFAR)")
    p.add_argument("--scenario", help="B{base}-Inc{n}, e.g. B0-Inc10 or B50-Inc5")
    p.add_argument("--memory", type=int, help="total exemplar budget")
    p.add_argument("--epochs", type=int, help="epochs of every task (also the first)")
    p.add_argument("--seed", type=int, help="training seed (the class order has its own, 1993)")
    p.add_argument("--device", help="auto, cpu, cuda or mps")
    p.add_argument("--threads", type=int, help="CPU threads of torch (on a shared or busy machine, 1 or 2 is often fastest)")
    p.add_argument("--run-dir", help="run folder (default runs/<method>-<dataset>-<scenario>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR after its last finished task")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. train.lr=0.05")
    p.add_argument("--progress", choices=["auto", "bars", "plain", "off"], default="auto")


def _cli_layer(args) -> dict:
    from cilkit.presets import set_dotted

    layer: dict = {}
    direct = {
        "method": args.method, "data.dataset": args.dataset, "data.root": args.data_root,
        "scenario.name": args.scenario, "memory.size": args.memory, "seed": args.seed, "device": args.device,
        "threads": args.threads,
    }
    for key, value in direct.items():
        if value is not None:
            node = layer
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    if args.download:
        layer.setdefault("data", {})["download"] = True
    if args.epochs is not None:
        layer.setdefault("train", {}).update(epochs=args.epochs, first_epochs=args.epochs)
    for assignment in args.set:
        set_dotted(layer, assignment)
    return layer


def cmd_run(args) -> int:
    from cilkit.experiment import Experiment, resolve
    from cilkit.presets import load_yaml
    from cilkit.results.report import summary_text, task_table

    if args.resume:
        changes = [flag for flag, value in RESUME_REFUSED.items() if getattr(args, value) not in (None, False, [])]
        if changes:
            raise CilkitError(f"--resume continues {args.resume} as it was configured; refused: {', '.join(changes)} "
                              "(only --device, --threads and --progress may change; start a new run to change the rest)")
        exp = Experiment.resume(args.resume, progress=args.progress, device=args.device, threads=args.threads)
    else:
        layers = ([load_yaml(args.config)] if args.config else []) + [_cli_layer(args)]
        exp = Experiment(resolve(layers), args.run_dir, progress=args.progress)
    log.info(
        "%s on %s %s (%d tasks, %s) -> %s",
        exp.cfg.method, exp.cfg.data.dataset, exp.scenario.name, len(exp.scenario.tasks), exp.runtime.device, exp.run.path,
    )
    try:
        metrics = exp.execute()
    except KeyboardInterrupt:
        done = exp.driver.next_task
        print(f"\ncilkit: interrupted during task {done + 1}; {done} task(s) saved. Continue with: "
              f"cilkit run --resume {exp.run.path}", file=sys.stderr)
        return 130
    print(task_table(metrics))
    print(summary_text(metrics))
    print(f"results: {exp.run.path}")
    return 0


RESUME_REFUSED = {"--config": "config", "--method": "method", "--dataset": "dataset", "--data-root": "data_root",
                  "--download": "download", "--scenario": "scenario", "--memory": "memory", "--epochs": "epochs",
                  "--seed": "seed", "--run-dir": "run_dir", "--set": "set"}


def cmd_methods(args) -> int:
    from cilkit.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        print(f"{name:10s} {cls.paper}")
        for key, (tp, default) in cls.hyper_defaults().items():
            print(f"{'':12s}{key} = {default!r}")
    return 0


def cmd_configs(args) -> int:
    import yaml

    from cilkit.presets import load_yaml, preset_names

    if args.show:
        print(yaml.safe_dump(load_yaml(args.show), sort_keys=False).rstrip())
        return 0
    for name in preset_names():
        print(name)
    return 0


def cmd_report(args) -> int:
    from cilkit.results.plots import plot_comparison
    from cilkit.results.report import COMPARE_HEADER, comparison_notes, comparison_rows, format_table, load_runs, plot_label
    from cilkit.results.report import write_comparison_csv

    runs, skipped = load_runs(args.runs)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if not runs:
        raise CilkitError(f"no run folder with a readable metrics.json among: {' '.join(args.runs)}")
    rows = comparison_rows(runs)
    print(format_table(COMPARE_HEADER, rows))
    for note in comparison_notes(runs):
        print(f"note: {note}")
    plot_comparison([(plot_label(name, m, runs), m) for name, m in runs], Path(args.plot))
    write_comparison_csv(rows, Path(args.csv))
    print(f"plot: {args.plot}\ncsv: {args.csv}")
    return 0


def _model_parsers(sub) -> None:
    """``predict`` and ``export``: a finished task of a run as a model."""
    p = sub.add_parser("predict", help="class names and probabilities of images, from a run's model")
    p.add_argument("run", metavar="RUN", help="a run folder with at least one finished task")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders of them (recursively) or .npz files")
    p.add_argument("--head", choices=["cnn", "nme"], default="cnn",
                   help="the classifier (cnn) or the nearest mean of exemplars (nme, for a method with a memory)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--out", metavar="FILE", help="write every prediction to FILE (.csv or .json)")
    _model_options(p)
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: the run's eval.batch_size)")
    p = sub.add_parser("export", help="a run's model as one TorchScript or ONNX file and classes.json")
    p.add_argument("run", metavar="RUN", help="a run folder with at least one finished task")
    p.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    p.add_argument("--head", choices=["cnn", "nme"], default="cnn", help="nme: the class means go into the file")
    p.add_argument("--out", metavar="DIR", help="folder of model.pt / model.onnx (model-nme.* for --head nme) and classes.json "
                                                    "(default RUN/export)")
    _model_options(p, device=False)


def _model_options(p, device: bool = True) -> None:
    p.add_argument("--task", type=int, help="the model after task N (counted from 1; default: the last finished)")
    if device:
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--threads", type=int, help="CPU threads of torch")


def cmd_predict(args) -> int:
    from cilkit.results.rundir import atomic_write_text
    from cilkit.trained import load

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise CilkitError(f"--out {out}: give a .csv or .json file")
    if args.topk < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise CilkitError("--topk and --batch-size must be positive")
    model = load(args.run, task=args.task, device=args.device, threads=args.threads)
    model.check_head(args.head)
    predictions = model.predict(args.paths, head=args.head, topk=args.topk, batch_size=args.batch_size)
    shown = 20 if out is not None else None
    print(predictions.table(shown))
    if out is not None:
        about = {"run": str(model.run.path), "task": model.task + 1, "method": model.method.name}
        text = predictions.to_csv() if out.suffix.lower() == ".csv" else predictions.to_json(**about)
        try:
            atomic_write_text(out, text)
        except OSError as e:
            raise CilkitError(f"cannot write {out}: {e.strerror or e}") from None
        print(f"predictions: {out} ({len(predictions)} images)")
    return 0


def cmd_export(args) -> int:
    from cilkit.export import export
    from cilkit.trained import load

    model = load(args.run, task=args.task, device="cpu", threads=args.threads)
    written = export(model, args.format, args.out, head=args.head)
    print(f"{args.format} model: {written['model']} (uint8 images N x {model.prep.height} x {model.prep.width} x "
          f"{model.prep.channels} -> {model.n_seen} class scores; checked against cilkit, largest difference "
          f"{written['max_difference']:.2g})\nclasses: {written['classes']}")
    return 0


def _extend_parser(sub) -> None:
    p = sub.add_parser("extend", help="add the classes of a folder of images as the next task of a finished run (a new run)")
    p.add_argument("run", metavar="RUN", help="a finished run folder (it is not changed)")
    p.add_argument("--data", required=True, metavar="NEW_ROOT",
                   help="NEW_ROOT/train/<class>/ and NEW_ROOT/test/<class>/, or NEW_ROOT/<class>/ (split with the run's "
                        "data.split_fraction and data.split_seed), or an .npz (x_train, y_train, x_test, y_test, class_names)")
    p.add_argument("--run-dir", help="the new run folder (default RUN-ext1, RUN-ext2, ...)")
    p.add_argument("--device", help="auto, cpu, cuda or mps")
    p.add_argument("--threads", type=int, help="CPU threads of torch")
    p.add_argument("--progress", choices=["auto", "bars", "plain", "off"], default="auto")


def cmd_extend(args) -> int:
    from cilkit.extend import extend_run
    from cilkit.results.report import summary_text, task_table

    metrics = extend_run(args.run, args.data, args.run_dir, progress=args.progress, device=args.device, threads=args.threads)
    print(task_table(metrics))
    print(summary_text(metrics))
    print(f"results: {metrics['run_dir']} (extended from {args.run})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cilkit", description="Class-incremental learning experiments.")
    parser.add_argument("--version", action="version", version=f"cilkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    sub.add_parser("methods", help="list the methods, their papers and hyperparameters")
    p = sub.add_parser("configs", help="list the packaged presets")
    p.add_argument("--show", metavar="NAME", help="print preset (or file) NAME with what it extends merged in")
    p = sub.add_parser("report", help="compare run folders: a table, a CSV and a plot")
    p.add_argument("runs", nargs="+", help="run folders, e.g. runs/*")
    p.add_argument("--plot", default="cilkit-report.png")
    p.add_argument("--csv", default="cilkit-report.csv")
    _extend_parser(sub)
    _model_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Messages go to stderr for the duration of the command; the logger is left as it was found.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    commands = {"run": cmd_run, "methods": cmd_methods, "configs": cmd_configs, "report": cmd_report,
                "predict": cmd_predict, "export": cmd_export, "extend": cmd_extend}
    try:
        return commands[args.command](args)
    except CilkitError as e:
        print(f"cilkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncilkit: interrupted", file=sys.stderr)
        return 130
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
