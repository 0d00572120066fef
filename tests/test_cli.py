"""train.py's command line: help, and one-line errors with exit code 2 for bad usage."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_ARGS

TINY = [*TINY_ARGS["running_average"], "--steps=4"]


def test_help_lists_tasks_and_task_help_lists_options(train_cli):
    code, out, _ = train_cli("--help")
    assert code == 0 and "running_average" in out and "--workdir" in out
    code, out, _ = train_cli("--task=running_average", "--help")
    assert code == 0
    assert "--hidden_size=int  (default: 32)" in out
    assert "--cell={rnn,lstm,gru}  (default: rnn)" in out
    assert "--wandb" in out


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "--task is required"),
        (["--task=running_averag"], "did you mean --task=running_average?"),
        (["--task=nope"], "available: running_average"),
        (["--task=running_average", "--hiden_size=3"], "did you mean --hidden_size?"),
        (["--task=running_average", "--hidden_size=0"], "--hidden_size=0: must be >= 1"),
        (["--task=running_average", "--num_layers=-1"], "--num_layers=-1: must be >= 1"),
        (["--task=running_average", "--hidden_size=big"], "--hidden_size='big': expected int"),
        (["--task=running_average", "--cell=transformer"], "choose one of rnn, lstm, gru"),
        (["--task=running_average", "--learning_rate=0"], "must be > 0"),
        (["--task=running_average", "--wandb=maybe"], "--wandb='maybe' is not accepted; choose"),
        (
            ["--task=running_average", "--batch_size=100", "--num_train=10"],
            "larger than the training set",
        ),
    ],
)
def test_bad_usage_exits_2_with_one_line_message(train_cli, tmp_path, args, message):
    code, _, err = train_cli(*args, f"--workdir={tmp_path / 'w'}")
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_unwritable_workdir_exits_2(train_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = train_cli("--task=running_average", f"--workdir={blocker / 'run'}", *TINY)
    assert code == 2 and "--workdir=" in err and "not writable" in err


def test_workdir_with_a_different_config_is_refused(train_cli, tmp_path):
    workdir = tmp_path / "run"
    assert train_cli("--task=running_average", f"--workdir={workdir}", *TINY)[0] == 0
    code, _, err = train_cli("--task=running_average", f"--workdir={workdir}", *TINY, "--seed=3")
    assert code == 2 and "different config (seed: 0 -> 3)" in err


def test_real_entry_point_bad_option_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--task=running_average",
            "--num_layers=0",
            f"--workdir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --num_layers=0: must be >= 1"]


def test_a_run_writes_config_summary_plots_checkpoints_and_events(train_cli, tmp_path):
    workdir = tmp_path / "run"
    code, out, _ = train_cli(
        "--task=running_average", f"--workdir={workdir}", *TINY, "--last_step_only"
    )
    assert code == 0, out
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["task"] == "running_average" and saved["config"]["last_step_only"] is True
    summary = json.loads((workdir / "summary.json").read_text())
    assert {"train_loss", "eval_loss", "steps"} <= set(summary) and summary["steps"] == 4
    assert all(isinstance(v, int | float | list | bool) for v in summary.values())
    for name in ["predictions.png", "error_by_step.png", "eval_curve.png"]:
        assert (workdir / name).stat().st_size > 1000
    assert (workdir / "checkpoints" / "4").is_dir()
    assert list(workdir.glob("events.out.tfevents.*"))


def test_config_reruns_a_saved_run_with_overrides(train_cli, tmp_path):
    first = tmp_path / "first"
    assert train_cli("--task=running_average", *TINY, "--cell=lstm", f"--workdir={first}")[0] == 0
    second = tmp_path / "second"
    code, _, err = train_cli(f"--config={first}", "--learning_rate=0.05", f"--workdir={second}")
    assert code == 0, err
    old = json.loads((first / "config.json").read_text())
    new = json.loads((second / "config.json").read_text())
    assert new["task"] == old["task"] == "running_average"
    assert new["config"] == {**old["config"], "learning_rate": 0.05}
    # the same file as a path, resuming the second run unchanged
    code, out, _ = train_cli(
        f"--config={second / 'config.json'}", "--learning_rate=0.05", f"--workdir={second}"
    )
    assert code == 0 and "resuming from checkpoint step 4" in out


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p, "no config.json there"),
        (lambda p: p / "config.json", "no config.json there"),
        (lambda p: (p / "other.json").write_text("{}") and p / "other.json", "expected a config"),
    ],
)
def test_config_of_nothing_is_one_line(train_cli, tmp_path, make, message):
    code, _, err = train_cli(f"--config={make(tmp_path)}", f"--workdir={tmp_path / 'w'}")
    assert code == 2 and message in err and "Traceback" not in err


def test_config_of_another_task_is_refused(train_cli, tmp_path):
    assert train_cli("--task=running_average", *TINY, f"--workdir={tmp_path / 'a'}")[0] == 0
    code, _, err = train_cli("--task=autoencoder", f"--config={tmp_path / 'a'}")
    assert code == 2 and "is a 'running_average' run" in err
