"""``nas-split train``: a real run writes its records; each kind of bad input exits 2 with one line and no output."""
import json
import subprocess
import sys

import pytest

from nas_split.cli import main

TINY = ["--epochs", "1", "--no-progress", "--no-latency"]


def _refused(capsys, tmp_path, argv, message):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), *TINY, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("nas-split: error:") and message in err[0], err
    assert not out.exists() and not any(p.name.startswith(".run") for p in tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "digitz"], "unknown dataset 'digitz'"),
    (["--backbone", "mobilenetv9"], "unknown backbone 'mobilenetv9'"),
    (["--dataset", "fashion-mnist", "--data-dir", "/no/such/dir"], "/no/such/dir"),
    (["--set", "train.lrr=0.1"], "config key 'train.lrr' does not exist"),
    (["--set", "train.epochs=many"], "config value train.epochs='many'"),
    (["--set", "train.optimizer=adam"], "config value train.optimizer='adam'"),
    (["--backbone", "pointnet_lite"], "takes points inputs but dataset 'digits' gives image samples"),
    (["--set", "backbone_options.in_chans=3"], "in_chans=3 does not fit dataset 'digits'"),
    (["--set", "backbone_options.widths=[8, 8]"], "widths must list 14"),
    (["--set", "backbone_options.depth=3"], "backbone_options for 'mobilenetv1_cifar_050'"),
    (["--set", "train"], "not of the form key=value"),
])
def test_bad_input_exits_2(capsys, tmp_path, argv, message):
    _refused(capsys, tmp_path, argv, message)


def test_bad_config_file(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: digits\nbackbone_options: {width_mult: 0.5}\nsurprise: 1\n")
    _refused(capsys, tmp_path, ["--config", str(cfg)], "config key 'surprise' does not exist")
    _refused(capsys, tmp_path, ["--config", str(tmp_path / "none.yaml")], "not found")


def test_existing_output_is_left_alone(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main(["train", "--out", str(out), *TINY]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "{}"


def test_train_writes_events_and_results(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {lr: 0.05, batch_size: 32}\n")
    assert main(["train", "--config", str(cfg), "--dataset", "digits", "--backbone", "test_mobilenetv1",
                 "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["schema_version"] == 1 and res["status"] == "done"
    assert res["config"]["train"]["lr"] == 0.05 and res["config"]["train"]["batch_size"] == 32
    stage = res["stages"][0]
    assert len(stage["history"]) == 2 and 0 <= stage["test_acc"] <= 1
    cost = stage["cost"]
    assert cost["macs"] > 0 and cost["params"] > 0 and cost["latency_ms"] > 0 and cost["energy_uj_est"] > 0
    assert sum(lc["energy_pj"] for lc in cost["layers"]) / 1e6 == pytest.approx(cost["energy_uj_est"])
    assert stage["widths"]["conv_stem"] == 8
    ea = EventAccumulator(str(out))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"acc/top1", "loss/train", "cost/mmacs", "cost/params", "cost/energy_uj_est", "cost/latency_ms"} <= tags
    assert ea.Scalars("cost/mmacs")[0].value == pytest.approx(cost["mmacs"], rel=1e-6)


def test_console_script_exit_code(tmp_path):
    exe = [sys.executable, "-m", "nas_split.cli"]
    p = subprocess.run([*exe, "train", "--dataset", "nope", "--out", str(tmp_path / "r")], capture_output=True,
                       text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("nas-split: error: unknown dataset 'nope'")
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("argv, message", [
    (["grow", "--target-mmacs", "3", "--budget-mmacs", "3"], "(--budget-mmacs was renamed --target-mmacs)"),
    (["grow", "--set", "growth.budget_mmacs=3"], "config key 'growth.budget_mmacs' was renamed: use "
                                                 "'growth.target_mmacs'"),
    (["compare", "--set", "targets_mmacs=[3]"], "config key 'targets_mmacs' was renamed: use 'target_mmacs'"),
    (["compare", "--targets", "3"], "(--targets was renamed --target-mmacs)"),
])
def test_an_old_name_of_the_mac_target_gets_a_one_line_hint(capsys, tmp_path, argv, message):
    try:
        code = main([*argv, "--out", str(tmp_path / "o")])
    except SystemExit as e:  # argparse's errors leave through SystemExit
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].endswith(message), err
    assert not (tmp_path / "o").exists()
