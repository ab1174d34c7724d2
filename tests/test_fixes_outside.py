"""What broke when cilkit was tried from outside: each case failed before its fix."""

from __future__ import annotations

import json

import pytest

import cilkit
from cilkit.cli import main
from cilkit.results.report import metrics_csv, task_table

FAST = {"model": {"backbone": "mlp", "hidden": [32]}, "train": {"epochs": 1}, "scenario": {"name": "B6-Inc4"}}


def test_topk_1_runs_and_reports(tmp_path):
    metrics = cilkit.run({**FAST, "method": "replay", "memory": {"size": 40}, "eval": {"topk": 1}}, run_dir=tmp_path / "r")
    assert metrics["complete"] and metrics["topk"] == 1
    assert "top1" in task_table(metrics).splitlines()[0]
    rows = metrics_csv(metrics).strip().splitlines()
    assert rows[0].split(",")[2:4] == ["top1", "top1"] and len(rows) == 3


def test_a_full_disk_is_one_message_and_the_folder_stays_consistent(tmp_path, monkeypatch, capsys):
    import errno

    import cilkit.results.rundir as rundir

    original, calls = rundir.atomic_write_bytes, []

    def full_after_the_first_task(path, data):
        calls.append(path.name)
        if "task_001" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, data)

    monkeypatch.setattr(rundir, "atomic_write_bytes", full_after_the_first_task)
    run = tmp_path / "r"
    argv = ["run", "--method", "finetune", "--scenario", "B6-Inc4", "--epochs", "1", "--run-dir", str(run), "--progress", "off"]
    assert main(argv + ["--set", "model.backbone=mlp"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("cilkit: error:") and "No space left on device" in last and "--resume" in last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["task_000.pt"]
    assert json.loads((run / "metrics.json").read_text())["tasks"][0]["task"] == 0


def test_a_loss_that_diverges_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "r"
    argv = ["run", "--method", "finetune", "--scenario", "B6-Inc4", "--epochs", "2", "--run-dir", str(run), "--progress", "off",
            "--set", "model.backbone=mlp"]
    assert main(argv + ["--set", "train.lr=1e12", "--set", "train.first_lr=0.05"]) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "task 2/2" in last and ("nan" in last or "inf" in last) and "train.lr" in last and "task_000.pt" in last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["task_000.pt"]
    assert len(json.loads((run / "metrics.json").read_text())["tasks"]) == 1


def test_config_yaml_is_the_whole_resolved_config_and_resumes(tmp_path):
    import yaml

    exp = cilkit.Experiment(cilkit.resolve([{**FAST, "method": "lwf"}]), tmp_path / "r", progress="off")
    exp.start()
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["method_args"] == {"lambda_kd": 1.0, "T": 2.0, "t2": False, "ce_mask": "new", "warmup_epochs": 0}
    assert cilkit.resolve([saved]).method_args == saved["method_args"]


def test_a_users_own_arrays_get_plain_defaults_and_the_schedule_is_logged(tmp_path, caplog):
    import logging

    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 255, (40, 8, 8, 1), dtype=np.uint8), "y_train": np.repeat(np.arange(4), 10),
              "x_test": rng.integers(0, 255, (8, 8, 8, 1), dtype=np.uint8), "y_test": np.repeat(np.arange(4), 2)}
    np.savez(tmp_path / "mine.npz", **arrays)
    cfg = cilkit.resolve([{"data": {"dataset": "numpy", "root": str(tmp_path / "mine.npz")}, "train": {"epochs": 1},
                           "method": "finetune"}])
    assert cfg.train.first_epochs is None and cfg.train.augment == "none" and cfg.train.stage(0).epochs == 1
    with caplog.at_level(logging.INFO, logger="cilkit"):
        cilkit.Experiment(cfg, tmp_path / "r", progress="off").execute()
    assert any("schedule: every task: 1 epochs" in r.getMessage() for r in caplog.records)


def test_threads_option(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["run", "--threads", "1", "--method", "finetune", "--scenario", "B6-Inc4", "--epochs", "1",
                     "--set", "model.backbone=mlp", "--run-dir", str(tmp_path / "r"), "--progress", "off"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["run", "--threads", "0", "--run-dir", str(tmp_path / "x")]) == 2


# -- run folders a user can trust ---------------------------------------------------------------

RUN = ["--method", "finetune", "--scenario", "B6-Inc4", "--epochs", "1", "--set", "model.backbone=mlp", "--progress", "off"]


def _run(tmp_path, name="r"):
    assert main(["run", "--run-dir", str(tmp_path / name)] + RUN) == 0
    return tmp_path / name


def _figures(metrics):
    return [{k: v for k, v in t.items() if "time" not in k and "seconds" not in k and "per_s" not in k} for t in metrics["tasks"]]


def test_a_checkpoint_holding_code_is_refused(tmp_path, capsys):
    import os

    import torch

    run = _run(tmp_path)
    torch.save({"next_task": 1, "payload": os.getcwd}, run / "checkpoints" / "task_001.pt")
    assert main(["run", "--resume", str(run), "--progress", "off"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "task_001.pt" in err and "not data" in err


def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path):
    run = _run(tmp_path)
    full = json.loads((run / "metrics.json").read_text())
    (run / "checkpoints" / "task_001.pt").write_bytes(b"\x80garbage")
    assert main(["run", "--resume", str(run), "--progress", "off"]) == 0
    assert _figures(json.loads((run / "metrics.json").read_text())) == _figures(full)


def test_resume_refuses_an_edited_config_and_flags_that_change_the_run(tmp_path, capsys):
    run = _run(tmp_path)
    (run / "checkpoints" / "task_001.pt").unlink()
    assert main(["run", "--resume", str(run), "--epochs", "3"]) == 2
    assert "--epochs" in capsys.readouterr().err
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("lr: 0.05", "lr: 0.5"))
    assert main(["run", "--resume", str(run), "--progress", "off"]) == 2
    assert "is not the config" in capsys.readouterr().err


def test_stale_temporaries_are_removed_and_a_second_process_is_refused(tmp_path):
    from cilkit.results.rundir import RunDir, RunFolderError

    run = _run(tmp_path)
    (run / "checkpoints" / "task_001.pt").unlink()
    stale = run / "checkpoints" / ".task_001.pt.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    holder = RunDir(run)
    holder.lock()
    try:
        with pytest.raises(RunFolderError, match="in use by another cilkit process"):
            cilkit.Experiment.resume(run, progress="off").execute()
    finally:
        holder.unlock()
    assert not stale.exists()  # the holder cleaned it up
    assert main(["run", "--resume", str(run), "--progress", "off"]) == 0


def test_ctrl_c_prints_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys):
    from cilkit.driver import TaskDriver

    original = TaskDriver.run_task

    def interrupted(self, task):
        if task.index == 1:
            raise KeyboardInterrupt
        return original(self, task)

    monkeypatch.setattr(TaskDriver, "run_task", interrupted)
    assert main(["run", "--run-dir", str(tmp_path / "r")] + RUN) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"cilkit run --resume {tmp_path / 'r'}" in err.strip().splitlines()[-1]


def test_report_marks_unfinished_runs_labels_different_settings_and_skips_a_bad_metrics_file(tmp_path, capsys):
    done = _run(tmp_path, "done")
    other = tmp_path / "other"
    assert main(["run", "--run-dir", str(other), "--method", "finetune", "--scenario", "B4-Inc3", "--epochs", "1",
                 "--set", "model.backbone=mlp", "--progress", "off"]) == 0
    unfinished = tmp_path / "unfinished"
    (unfinished).mkdir()
    m = json.loads((done / "metrics.json").read_text())
    m.update(complete=False, tasks=m["tasks"][:1])
    (unfinished / "metrics.json").write_text(json.dumps(m))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    capsys.readouterr()
    plot, table = tmp_path / "cmp.png", tmp_path / "cmp.csv"
    assert main(["report", str(done), str(other), str(unfinished), str(broken), "--plot", str(plot), "--csv", str(table)]) == 0
    out, err = capsys.readouterr()
    assert "1/2 incomplete" in out and "unfinished is not finished" in out
    assert "differ in scenario" in out and "skipped" in err and "broken" in err
    assert plot.stat().st_size > 1000 and len(table.read_text().strip().splitlines()) == 4


def test_normalization_is_recorded_and_a_given_one_is_used(tmp_path):
    import yaml

    run = _run(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["normalization"] == metrics["normalization"] and len(metrics["normalization"]["mean"]) == 1
    assert metrics["backbone"] == "mlp"
    cfg = cilkit.resolve([{**FAST, "method": "finetune", "data": {"normalization": {"mean": [0.5], "std": [0.25]}}}])
    exp = cilkit.Experiment(cfg, tmp_path / "given", progress="off")
    assert exp.runtime.augment.mean == (0.5,) and exp.runtime.augment.std == (0.25,)
    with pytest.raises(cilkit.errors.ConfigError, match="data.normalization.mean"):
        cilkit.Experiment(cilkit.resolve([{**FAST, "method": "finetune", "data": {"normalization": {"mean": [0.5, 0.5], "std": [1, 1]}}}]),
                          tmp_path / "bad", progress="off")


@pytest.mark.parametrize("method, args, stage_desc, lr", [
    ("ucir", {"cbf_epochs": 1}, "balanced finetuning", 0.01),
    ("der", {"relearn_epochs": 1}, "classifier re-learning", 0.1),
])
def test_extra_stages_keep_their_own_optimizer_under_a_main_adam(method, args, stage_desc, lr, tmp_path, monkeypatch):
    from cilkit.training.context import TrainingContext

    seen, original = [], TrainingContext.fit

    def record(self, groups, indices, stage, loss, **hooks):
        seen.append((hooks.get("desc"), stage.optimizer, stage.lr))
        return original(self, groups, indices, stage, loss, **hooks)

    monkeypatch.setattr(TrainingContext, "fit", record)
    layer = {**FAST, "method": method, "method_args": args, "memory": {"size": 40}, "train": {"epochs": 1, "optimizer": "adam", "lr": 1e-3}}
    cilkit.run(layer, run_dir=tmp_path / "r")
    assert ("task 2/2", "adam", 1e-3) in seen and (stage_desc, "sgd", lr) in seen


@pytest.mark.parametrize("method, field", [("ucir", "cbf"), ("der", "relearn")])
def test_an_sgd_scale_rate_for_an_adam_stage_is_refused(method, field):
    with pytest.raises(cilkit.errors.ConfigError, match=f"method_args.{field}_lr"):
        cilkit.resolve([{"method": method, "method_args": {f"{field}_optimizer": "adam", f"{field}_lr": 0.05}}])


def test_ucir_paper_presets_run_what_the_authors_ran():
    from cilkit.presets import load_yaml, preset_names

    names = [n for n in preset_names() if n.startswith("papers/ucir-")]
    assert len(names) >= 6
    assert all(load_yaml(n)["method_args"]["cbf"] is False for n in names)  # the official scripts: no CBF


def test_phase_times_are_recorded_and_the_cpu_evaluates_in_cache_sized_batches(tmp_path):
    metrics = cilkit.run({**FAST, "method": "replay", "memory": {"size": 40}}, run_dir=tmp_path / "r")
    phases = metrics["tasks"][1]["phase_seconds"]
    assert set(phases) == {"before_task", "train", "after_task", "class_means", "evaluate"}
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= metrics["tasks"][1]["wall_time_s"] + 1e-6
    exp = cilkit.Experiment(cilkit.resolve([{**FAST, "method": "finetune"}]), tmp_path / "x", progress="off")
    assert exp.runtime.eval_batch_size == 128
    exp = cilkit.Experiment(cilkit.resolve([{**FAST, "method": "finetune", "eval": {"batch_size": 512}}]), tmp_path / "y", progress="off")
    assert exp.runtime.eval_batch_size == 512


def test_configs_show_prints_a_preset_with_what_it_extends(capsys):
    import yaml

    assert main(["configs", "--show", "protocols/fmnist/bic"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["method"] == "bic" and shown["data"]["dataset"] == "fashion-mnist" and shown["memory"]["size"] == 2000
    assert main(["configs", "--show", "no/such"]) == 2


def test_the_python_api_logs_progress_when_asked(tmp_path, capfd):
    import logging

    log = logging.getLogger("cilkit")
    saved, propagate = log.handlers[:], log.propagate
    log.handlers = [h for h in saved if not isinstance(h, logging.StreamHandler)]
    log.propagate = False  # as in a plain Python session: nothing shows the records (pytest's root handlers would)
    try:
        cilkit.run({**FAST, "method": "finetune"}, run_dir=tmp_path / "quiet")
        assert "epoch 1/1" not in capfd.readouterr().err
        cilkit.run({**FAST, "method": "finetune"}, run_dir=tmp_path / "loud", progress="plain")
        err = capfd.readouterr().err
        assert "epoch 1/1" in err and "task 2/2" in err
    finally:
        log.handlers, log.propagate = saved, propagate


def test_device_and_disk_are_checked_before_the_data(tmp_path, monkeypatch, capsys):
    import shutil

    import torch

    if not torch.cuda.is_available():  # the data root holds no dataset: only the device may be named
        assert main(["run", "--device", "cuda", "--dataset", "fmnist", "--data-root", str(tmp_path),
                     "--run-dir", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert "'device'" in err and "idx" not in err.lower()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    assert main(["run", "--dataset", "fmnist", "--data-root", str(tmp_path), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "MiB free" in err and "idx" not in err.lower() and not (tmp_path / "r").exists()


def test_no_preset_gives_a_budget_to_an_exemplar_free_method():
    from cilkit.methods import METHODS
    from cilkit.presets import load_yaml, preset_names

    for name in preset_names():
        data = load_yaml(name)
        method = METHODS[data.get("method", "replay")]
        if method.memory_use == "none":
            memory = data.get("memory") or {}
            assert not any(memory.get(k) for k in ("size", "per_class")), name
    cilkit.resolve([load_yaml("protocols/digits/lwf")])  # and such a preset resolves
