"""Every bad configuration exits with code 2 and one message naming the field, before training."""

import pytest

from cilkit.cli import main


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--method", "nope"], "'method'"),
        (["--dataset", "imagenet-9000"], "'data.dataset'"),
        (["--set", "train.foo=1"], "'train.foo'"),
        (["--set", "colour=blue"], "'colour'"),
        (["--set", "method_args.ce_mask=sideways", "--method", "finetune"], "'method_args.ce_mask'"),
        (["--set", "method_args.lambda=3", "--method", "replay"], "'method_args.lambda'"),
        (["--set", "scenario.name=[4,4]"], "'scenario.name'"),
        (["--scenario", "B12-Inc2"], "'scenario.name'"),
        (["--scenario", "Inc2"], "'scenario.name'"),
        (["--memory", "5"], "'memory.size'"),
        (["--memory", "0"], "'memory.size'"),
        (["--epochs", "0"], "'train.epochs'"),
        (["--set", "train.batch_size=-8"], "'train.batch_size'"),
        (["--set", "train.lr=fast"], "'train.lr'"),
        (["--set", "train.schedule=sawtooth"], "'train.schedule'"),
        (["--dataset", "mnist"], "'data.root'"),
        (["--dataset", "cifar100", "--data-root", "/nonexistent/cifar"], "'data.root'"),
        (["--device", "tpu"], "'device'"),
        (["--config", "no/such/preset"], "'--config'"),
        (["--method", "finetune", "--memory", "100"], "'memory.size'"),
        (["--method", "lwf", "--set", "memory.per_class=5"], "'memory.per_class'"),
        (["--method", "lwf", "--set", "method_args.T=0"], "'method_args.T'"),
        (["--method", "ssil", "--set", "method_args.replay_batch_size=0"], "'method_args.replay_batch_size'"),
        (["--method", "coil", "--set", "method_args.rt_every=0"], "'method_args.rt_every'"),
        (["--method", "spb", "--set", "method_args.clip_weights=0.5"], "'method_args.clip_weights'"),
        (["--method", "lwm", "--set", "model.backbone=mlp"], "'model.backbone'"),
        (["--set", "train.amp=sometimes"], "'train.amp'"),
        (["--set", "train.momentum=-0.1"], "'train.momentum'"),
        (["--set", "train.gamma=-0.5"], "'train.gamma'"),
        (["--set", "train.crop_pad=-1"], "'train.crop_pad'"),
        (["--set", "train.first_weight_decay=-1"], "'train.first_weight_decay'"),
        (["--set", "train=[]"], "'train'"),
        (["--seed", "-1"], "'seed'"),
        (["--seed", "4294967296"], "'seed'"),
        (["--set", "name=../../escape"], "'name'"),
        (["--set", "data.n_classes=0"], "'data.n_classes'"),
        (["--set", "model.backbone=resnet32", "--set", "model.widths=[8,16]"], "'model.widths'"),
        (["--set", "model.hidden=[64]"], "'model.hidden'"),
    ],
)
def test_bad_config_exits_2_naming_the_field(argv, field, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", "--run-dir", str(run_dir), "--progress", "off"] + argv)
    err = capsys.readouterr().err
    assert code == 2
    assert field in err and err.count("\n") == 1, err
    assert not run_dir.exists()  # nothing half-written


def test_bad_yaml_file(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epochs: [1, 2\n")
    assert main(["run", "--config", str(cfg), "--run-dir", str(tmp_path / "r")]) == 2
    assert "'--config'" in capsys.readouterr().err


def test_missing_idx_files_name_the_expected_path(tmp_path, capsys):
    code = main(["run", "--dataset", "fmnist", "--data-root", str(tmp_path), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path) in err and "idx" in err.lower()
    assert not (tmp_path / "r").exists()


def test_tri_state_settings_take_auto_true_and_false():
    from cilkit import resolve

    cfg = resolve([{"train": {"amp": "auto", "channels_last": False}, "memory": {"nme_flip": "true"}}])
    assert (cfg.train.amp, cfg.train.channels_last, cfg.memory.nme_flip) == (None, False, True)


def test_mps_where_there_is_none(tmp_path, capsys):
    import torch

    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert main(["run", "--device", "mps", "--run-dir", str(tmp_path / "r")]) == 2
    assert "'device'" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_scientific_notation_for_float_fields(tmp_path):
    from cilkit import resolve
    from cilkit.presets import load_yaml

    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 5e-4\n  weight_decay: 1E-5\n")
    cfg = resolve([load_yaml(str(f)), {"train": {"first_lr": "1e-3"}}])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.first_lr) == (5e-4, 1e-5, 1e-3)


def test_config_that_is_not_text(tmp_path, capsys):
    f = tmp_path / "bin.yaml"
    f.write_bytes(bytes(range(256)) * 4)
    assert main(["run", "--config", str(f), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "'--config'" in err and "not a text file" in err and err.count("\n") == 1


@pytest.mark.parametrize("where", ["proc", "file"])
def test_run_folder_that_cannot_be_created_is_refused_before_data(where, tmp_path, capsys):
    if where == "proc":
        run_dir = "/proc/cilkit-run"
    else:
        (tmp_path / "afile").write_text("x")
        run_dir = str(tmp_path / "afile" / "run")
    assert main(["run", "--dataset", "fmnist", "--data-root", str(tmp_path), "--run-dir", run_dir]) == 2
    err = capsys.readouterr().err
    assert "run folder" in err and "idx" not in err.lower()  # refused before the (missing) data was looked at
    assert err.count("\n") == 1
