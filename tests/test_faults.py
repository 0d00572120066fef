"""Faults and bad input: every record a run leaves stays true.

Kills at random moments, Ctrl-C and SIGTERM, damaged checkpoints, a full disk, two
processes on one workdir, a changed config on resume, values that overflow, sizes that
cannot fit. Each test fails on the behaviour before these guards existed.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import train
from experiment.run import non_finite_keys
from experiment.workdir import WorkdirLock
from tests.conftest import REPO, TINY_ARGS
from training.checkpoints import Checkpoints

TINY = TINY_ARGS["running_average"]
RESUMABLE = [
    "--task=running_average",
    *TINY,
    "--steps=64",
    "--checkpoint_every=16",
    "--keep_checkpoints=10",
    "--steps_per_call=8",
    "--eval_every=16",
]


def replace_option(args: list[str], option: str) -> list[str]:
    """`args` with `option` (--key=value) instead of any earlier value of that key."""
    key = option.split("=")[0] + "="
    return [a for a in args if not a.startswith(key)] + [option]


def snapshot(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of every file: to prove a refused command changed nothing."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def checkpoint_arrays(checkpoint_dir: Path, step: int | None = None):
    """(step, params, train_state, progress) of a running-average checkpoint, as NumPy."""
    from tasks import running_average
    from training.loop import _train_state_dict, init_train_state
    from training.optim import make_optimizer

    workdir = checkpoint_dir.parent
    saved = json.loads((workdir / "config.json").read_text())["config"]
    cfg = running_average.Config(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    )
    _, state = init_train_state(running_average.make_problem(cfg), make_optimizer(cfg), cfg)
    ckpt = Checkpoints(checkpoint_dir)
    try:
        step = ckpt.latest_step() if step is None else step
        params, train_state, progress = ckpt.restore(
            step, state.params, _train_state_dict(state, None)
        )
    finally:
        ckpt.close()
    as_np = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    return step, as_np(params), as_np(train_state), progress


def assert_same_run(a: Path, b: Path) -> None:
    """Final parameters, optimizer state and evaluation history are bit-equal."""
    step_a, params_a, state_a, prog_a = checkpoint_arrays(a / "checkpoints")
    step_b, params_b, state_b, prog_b = checkpoint_arrays(b / "checkpoints")
    assert step_a == step_b
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
    assert prog_a["history"] == prog_b["history"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted run: the reference every faulty run must end equal to."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    assert train.main([*RESUMABLE, f"--workdir={workdir}"]) == 0
    return workdir


def spawn(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


# ------------------------------------------------------------------ bad input


LONG_DATA = ["--num_train=64", "--num_eval=8"]  # long sequences, few of them


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task=running_average", "--learning_rate=inf"], "must be a finite number"),
        (["--task=running_average", "--learning_rate=nan"], "must be a finite number"),
        (["--task=running_average", "--learning_rate=1e39"], "overflows float32"),
        (["--task=running_average", "--seed=9223372036854775808"], "integers must be within"),
        (["--task=running_average", "--seed=2147483647", "--num_seeds=2"], "--seed"),
        (["--task=running_average", "--hidden_size=1e10"], "integers must be within"),
        (["--task=running_average", "--hidden_size=1e9"], "of memory is available"),
        # a long sequence whose train step needs about 74 GiB (its data about 170 MB)
        (["--task=running_average", "--seq_len=3e5", "--hidden_size=512", *LONG_DATA], "memory"),
        (["--task=autoencoder", "--latent_dim=1e12"], "integers must be within"),
        (["--task=autoencoder", "--latent_dim=1e9"], "of memory is available"),
        (["--task=autoencoder", "--hidden_sizes=-1"], "--hidden_sizes=-1: must be >= 1"),
        (["--task=autoencoder", "--hidden_sizes=8,0"], "--hidden_sizes=8,0: must be >= 1"),
        (["--task=scalar_rnn", "--w=1e300"], "overflows float32"),
        (["--task=grad_flow", "--hidden_size=1e9"], "of memory is available"),  # used to abort
        (["--task=grad_flow", "--hidden_size=3000", "--probe_batch=1e5"], "--probe_batch"),
        (["--task=running_average", "--clip_grad_norm=inf"], "must be a finite number"),
    ],
)
def test_bad_values_exit_2_with_one_line(train_cli, tmp_path, args, message):
    code, _out, err = train_cli(*args, f"--workdir={tmp_path / 'w'}")
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    checkpoints = tmp_path / "w" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "is unreadable"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"task": 3}', "lacks a task name"),
        (b"\xff\xfe\x00", "is unreadable"),
    ],
)
def test_a_corrupt_config_json_is_refused_and_left_alone(train_cli, tmp_path, content, message):
    workdir = tmp_path / "run"
    workdir.mkdir()
    file = workdir / "config.json"
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = train_cli("--task=running_average", *TINY, "--steps=2", f"--workdir={workdir}")
    assert code == 2 and message in err and "Traceback" not in err
    assert file.read_bytes() == (content if isinstance(content, bytes) else content.encode())


def test_workdir_paths_expand_home_and_long_names_are_one_line(train_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    code, _, err = train_cli("--task=running_average", *TINY, "--steps=2", "--workdir=~/run")
    assert code == 0, err
    assert (tmp_path / "run" / "summary.json").exists() and not Path("~").exists()
    code, _, err = train_cli("--task=running_average", *TINY, f"--workdir={tmp_path / ('x' * 300)}")
    assert code == 2 and "File name too long" in err and len(err.strip().splitlines()) == 1


def test_files_written_are_readable_by_others_under_umask_022(train_cli, tmp_path):
    old = os.umask(0o022)
    try:
        assert (
            train_cli("--task=running_average", *TINY, "--steps=2", f"--workdir={tmp_path}")[0] == 0
        )
    finally:
        os.umask(old)
    for name in ["config.json", "summary.json", "predictions.png"]:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


# ------------------------------------------------------------ non-finite guard


def test_the_guard_covers_updated_parameters_and_optimizer_state():
    """A finite loss and gradient whose update overflows float32 (loss 10 w, SGD at lr
    1e38: an update of -1e39 = -inf): the update's norm flags the step, and neither the
    parameters nor the optimizer state take its values."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from training.loop import Problem, TrainState, make_train_step

    class Scalar(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jnp.ones(()))

    def loss_fn(model, batch, key):
        return 10.0 * model.w[...] + 0.0 * batch.sum(), {}

    problem = Problem(make_model=Scalar, loss_fn=loss_fn, train_data=jnp.zeros((4, 1)))
    graphdef, params = nnx.split(Scalar(nnx.Rngs(0)))
    tx = optax.sgd(1e38)
    state = TrainState(
        jnp.int32(0), params, tx.init(params), jnp.zeros(2, jnp.uint32), jnp.int32(-1)
    )
    new, metrics = jax.jit(make_train_step(graphdef, problem, tx))(
        state, problem.train_data, jnp.arange(2)
    )
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert int(new.bad_step) == 0  # flagged at the step that overflowed
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)  # the old kept


def test_an_update_with_a_finite_norm_cannot_overflow_finite_parameters():
    """Why the step's guard need not read the new parameters: a finite update norm (a
    plain sum of squares) bounds each update below 1.9e19, and no finite float32 plus
    such an update rounds to infinity (the gap from the largest float32 to it is 1e31)."""
    import jax.numpy as jnp
    import optax

    top = float(np.finfo(np.float32).max)
    for sign in (1.0, -1.0):  # the largest update a finite norm allows, at either limit
        params = jnp.array([sign * top, 1.0], jnp.float32)
        updates = jnp.array([sign * 1.8e19, 0.0], jnp.float32)
        assert np.isfinite(optax.tree.norm(updates))
        assert np.isfinite(np.asarray(optax.apply_updates(params, updates))).all()
    assert not np.isfinite(optax.tree.norm(jnp.float32(1.9e19)))  # a larger one is flagged


def test_non_finite_replicas_names_the_replicas_with_a_non_finite_value():
    import jax.numpy as jnp

    from training.loop import TrainState, non_finite_replicas

    params = {"w": jnp.ones((3, 2, 2)), "b": jnp.zeros((3, 2))}
    opt_state = {"nu": jnp.ones((3, 2, 2)).at[2, 1, 0].set(jnp.inf), "count": jnp.zeros(3, int)}
    state = TrainState(jnp.zeros(3, int), params, opt_state, jnp.zeros((3, 2), jnp.uint32),
                       jnp.full(3, -1))  # fmt: skip
    assert non_finite_replicas(state) == [2]
    state = state._replace(params={**params, "b": params["b"].at[0, 1].set(jnp.nan)})
    assert non_finite_replicas(state) == [0, 2]
    one = jax.tree.map(lambda a: a[1], state)
    assert non_finite_replicas(one) == []
    assert non_finite_replicas(jax.tree.map(lambda a: a[2], state)) == [0]


def test_an_optimizer_state_that_overflows_is_never_written(train_cli, tmp_path):
    """An L2 penalty of 1e30 squared by Adam overflows its second moment while the loss,
    the gradient and the update (0 where the moment is infinite) stay finite: the step's
    guard passes, and the check before every checkpoint stops the run instead."""
    code, _, err = train_cli(
        "--task=running_average",
        *TINY,
        "--weight_decay=1e30",
        "--steps=40",
        "--steps_per_call=4",
        "--checkpoint_every=8",
        f"--workdir={tmp_path}",
    )
    assert code == 1 and "Traceback" not in err
    assert "non-finite parameters or optimizer state by step 8" in err
    assert "no checkpoint was written" in err
    assert Checkpoints(tmp_path / "checkpoints").all_steps() == []
    assert not (tmp_path / "summary.json").exists()
    assert json.loads((tmp_path / "failure.json").read_text())["exit_code"] == 1


def test_an_overflowing_one_step_run_never_exits_0(train_cli, tmp_path):
    """`--steps=1` with an overflowing learning rate used to print `done:`, exit 0 and
    write `"train_loss": null`."""
    code, _, err = train_cli(
        "--task=running_average",
        *TINY,
        "--optimizer=sgd",
        "--momentum=0",
        "--learning_rate=3e38",
        "--steps=1",
        f"--workdir={tmp_path}",
    )
    assert code == 1 and "non-finite" in err and "Traceback" not in err
    assert not (tmp_path / "summary.json").exists()
    assert json.loads((tmp_path / "failure.json").read_text())["exit_code"] == 1


def test_every_checkpoint_of_a_diverging_run_is_finite(train_cli, tmp_path):
    code, _, err = train_cli(
        "--task=running_average",
        *TINY,
        "--optimizer=sgd",
        "--learning_rate=1e37",
        "--warmup_steps=20",
        "--steps=40",
        "--steps_per_call=1",
        "--checkpoint_every=1",
        "--keep_checkpoints=100",
        f"--workdir={tmp_path}",
    )
    assert code == 1 and "last good checkpoint" in err
    for step in Checkpoints(tmp_path / "checkpoints").all_steps():
        _, params, state, _ = checkpoint_arrays(tmp_path / "checkpoints", step)
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves((params, state)))


def test_a_summary_with_a_non_finite_value_is_never_written():
    assert non_finite_keys({"a": 1.0, "b": float("nan"), "c": [1.0, float("inf")], "d": None}) == [
        "b",
        "c",
        "d",
    ]
    assert non_finite_keys({"a": 1, "b": "text", "c": [0.5], "d": True, "e": np.float32(2)}) == []


# ------------------------------------------------------------- resume identity


@pytest.mark.parametrize(
    "change", ["--learning_rate=0.05", "--steps=80", "--hidden_size=9", "--lr_schedule=constant"]
)
def test_a_changed_config_is_refused_and_the_workdir_is_untouched(train_cli, tmp_path, change):
    args = [*RESUMABLE, f"--workdir={tmp_path}"]
    assert train_cli(*args)[0] == 0
    before = snapshot(tmp_path)
    key = change.split("=")[0]
    code, _, err = train_cli(*replace_option(args, change))
    assert code == 2 and "different config" in err and key.lstrip("-") in err
    assert snapshot(tmp_path) == before
    assert train_cli(*args)[0] == 0  # the original command still resumes


def test_checkpoints_are_checked_even_without_config_json(train_cli, tmp_path):
    args = [*RESUMABLE, f"--workdir={tmp_path}"]
    assert train_cli(*args)[0] == 0
    (tmp_path / "config.json").unlink()
    before = snapshot(tmp_path)
    code, _, err = train_cli(*replace_option(args, "--learning_rate=0.5"))
    assert code == 2 and "learning_rate: 0.01 -> 0.5" in err and "checkpoints" in err
    assert snapshot(tmp_path) == before


def test_rerunning_a_finished_command_keeps_its_summary(train_cli, tmp_path):
    args = [*RESUMABLE, f"--workdir={tmp_path}"]
    assert train_cli(*args)[0] == 0
    summary = (tmp_path / "summary.json").read_text()
    assert train_cli(*args)[0] == 0
    assert (tmp_path / "summary.json").read_text() == summary


# ------------------------------------------------------------------ the lock


def test_a_second_process_on_a_locked_workdir_exits_2_naming_the_holder(train_cli, tmp_path):
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    try:
        before = snapshot(tmp_path)
        code, _, err = train_cli("--task=running_average", *TINY, f"--workdir={tmp_path}")
        after = snapshot(tmp_path)
    finally:
        lock.release()
    assert code == 2 and f"pid {os.getpid()}" in err and "in use by another run" in err
    assert after == before


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from experiment.workdir import WorkdirLock; "
            f"WorkdirLock(__import__('pathlib').Path({str(tmp_path)!r})).acquire(); "
            "print('locked', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.communicate()  # reaps it and closes its pipe
    proc = spawn(["--task=running_average", *TINY, "--steps=2", f"--workdir={tmp_path}"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"took over the lock of a run that is gone (pid {holder.pid}" in out


# ------------------------------------------------------- damaged checkpoints


def damage(step_dir: Path, how: str) -> None:
    if how == "truncated arrays":
        for f in step_dir.glob("params/**/d/*"):
            f.write_bytes(b"")
    elif how == "garbage metadata":
        for f in step_dir.glob("train_state/**/manifest.ocdbt"):
            f.write_bytes(b"garbage")
    elif how == "empty directory":
        for child in step_dir.iterdir():
            if child.is_dir():
                import shutil

                shutil.rmtree(child)
            else:
                child.unlink()


@pytest.mark.parametrize("how", ["truncated arrays", "garbage metadata", "empty directory"])
def test_a_damaged_latest_checkpoint_resumes_from_the_newest_readable(
    train_cli, tmp_path, straight, how
):
    args = [*RESUMABLE, f"--workdir={tmp_path}"]
    assert train_cli(*args)[0] == 0
    damage(tmp_path / "checkpoints" / "64", how)
    code, out, err = train_cli(*args)
    assert code == 0, err
    assert "checkpoint step 64" in out and "unreadable" in out
    assert "resuming from checkpoint step 48" in out
    assert (tmp_path / "checkpoints" / "64.unreadable").is_dir()  # kept, not deleted
    assert_same_run(straight, tmp_path)


def test_no_readable_checkpoint_exits_2_naming_the_directory(train_cli, tmp_path):
    args = [*RESUMABLE, f"--workdir={tmp_path}"]
    assert train_cli(*args)[0] == 0
    for step_dir in (tmp_path / "checkpoints").iterdir():
        damage(step_dir, "truncated arrays")
    code, _, err = train_cli(*args)
    assert code == 2 and f"no readable checkpoint in {tmp_path / 'checkpoints'}" in err
    assert "Traceback" not in err and "Event loop is closed" not in err
    code, _, err = train_cli(*args)  # still refused: it never silently starts over
    assert code == 2


# ------------------------------------------------------------- signals, kills


def wait_for_checkpoint(proc: subprocess.Popen, checkpoint_dir: Path, timeout: float = 120):
    start = time.monotonic()
    while time.monotonic() - start < timeout and proc.poll() is None:
        if checkpoint_dir.is_dir() and any(d.name.isdigit() for d in checkpoint_dir.iterdir()):
            return
        time.sleep(0.05)


SLOW_RUN = ["--task=running_average", *TINY, "--steps=4000", "--checkpoint_every=50",
            "--steps_per_call=1", "--log_every=1"]  # fmt: skip


@pytest.mark.parametrize(
    "sig,code,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")]
)
def test_a_signal_during_training_is_one_line_and_resumable(tmp_path, sig, code, name):
    proc = spawn([*SLOW_RUN, f"--workdir={tmp_path}"])
    wait_for_checkpoint(proc, tmp_path / "checkpoints")
    time.sleep(random.uniform(0.0, 0.5))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len([ln for ln in lines if not ln.startswith("[")]) == 1
    assert (
        f"interrupted ({name}); checkpoints are intact; resume with: python train.py" in lines[-1]
    )
    assert f"--workdir={tmp_path}" in lines[-1]
    assert json.loads((tmp_path / "failure.json").read_text())["exit_code"] == code


@pytest.mark.parametrize("delay", [0.25, 0.6, 1.2])
def test_ctrl_c_during_start_up_exits_130_without_traceback(tmp_path, delay):
    proc = spawn([*SLOW_RUN, f"--workdir={tmp_path}"])
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted (Ctrl-C)" in err


def test_kill_9_and_ctrl_c_at_random_moments_then_rerun_equals_a_straight_run(tmp_path, straight):
    rng = random.Random(0)
    args = [*RESUMABLE, f"--workdir={tmp_path}"]
    for sig in (signal.SIGKILL, signal.SIGINT, signal.SIGKILL):
        proc = spawn(args)
        wait_for_checkpoint(proc, tmp_path / "checkpoints")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(sig)
        proc.communicate(timeout=120)
    proc = spawn(args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert_same_run(straight, tmp_path)


def test_a_resumed_run_keeps_its_history_and_timings(train_cli, tmp_path, straight, monkeypatch):
    from training import progress

    original = progress.Progress.update

    def stop_at_40(self, step, *a, **k):
        if step >= 40:
            raise KeyboardInterrupt
        return original(self, step, *a, **k)

    args = [*RESUMABLE, "--log_every=8", f"--workdir={tmp_path}"]
    monkeypatch.setattr(progress.Progress, "update", stop_at_40)
    assert train_cli(*args)[0] == 130
    monkeypatch.setattr(progress.Progress, "update", original)
    assert train_cli(*args)[0] == 0
    _, _, _, prog = checkpoint_arrays(tmp_path / "checkpoints")
    _, _, _, reference = checkpoint_arrays(straight / "checkpoints")
    assert [h["step"] for h in prog["history"]] == [16, 32, 48, 64]
    assert prog["history"] == reference["history"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    # two segments, each compiled its chunk once; the time of both is counted
    assert summary["compilations"] == 2 and summary["train_seconds"] > 0
    assert (
        summary["compile_seconds"]
        >= 0.5 * json.loads((straight / "summary.json").read_text())["compile_seconds"]
    )


# ------------------------------------------------------------------ full disk


@pytest.fixture
def tiny_disk(tmp_path):
    """A 600 KiB tmpfs (root only): enough to start a run, too little to finish it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_exit_1_and_resumes_once_space_is_freed(tiny_disk, straight):
    workdir = tiny_disk / "run"
    args = [*replace_option(RESUMABLE, "--checkpoint_every=8"), f"--workdir={workdir}"]
    proc = spawn([*args, "--wandb=disabled"])
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: no space left on device writing ")
    assert "free space and resume with: python train.py" in lines[0]
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    proc = spawn([*args, "--wandb=disabled"])
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    final = checkpoint_arrays(workdir / "checkpoints")
    reference = checkpoint_arrays(straight / "checkpoints")
    jax.tree.map(np.testing.assert_array_equal, final[1], reference[1])


# ------------------------------------------- every file the project reads


def names_dir(root: Path, per_language: int = 20) -> Path:
    """A small surnames directory: English and Russian, with a BOM in front of each file."""
    root.mkdir()
    for language in ("English", "Russian"):
        names = "\n".join(f"{language}{i}" for i in range(per_language)) + "\n"
        (root / f"{language}.txt").write_bytes(b"\xef\xbb\xbf" + names.encode())
    return root


def test_surname_files_drop_a_bom_and_skip_entries_that_are_not_files(tmp_path):
    from data.surnames import read_directory

    directory = names_dir(tmp_path / "names")
    (directory / "Folder.txt").mkdir()
    (directory / "Dangling.txt").symlink_to(tmp_path / "nowhere")
    data = read_directory(directory)
    assert data.languages == ["English", "Russian"]
    assert "English0" in data.names and "Russian0" in data.names  # no '\ufeff' in front
    assert not any(n.startswith("\ufeff") for n in data.names)
    assert any("Folder.txt" in n for n in data.notes) and any("Dangling" in n for n in data.notes)


def test_too_few_names_to_split_is_one_line(train_cli, tmp_path):
    directory = names_dir(tmp_path / "names", per_language=2)
    code, _, err = train_cli(
        "--task=surnames", f"--data_dir={directory}", f"--workdir={tmp_path / 'w'}"
    )
    assert code == 2 and "too few names to split" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_surnames(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("surnames")
    directory = names_dir(root / "names")
    workdir = root / "run"
    args = ["--task=surnames", f"--data_dir={directory}", "--steps=4", "--eval_every=2"]
    assert train.main([*args, "--batch_size=8", f"--workdir={workdir}", "--wandb=disabled"]) == 0
    return workdir


def surnames_cli(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.surnames", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_evaluate_reads_a_tsv_with_a_bom(tiny_surnames, tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_bytes(b"\xef\xbb\xbfRussian1\tRussian\nEnglish2\tEnglish\n")
    code, out, err = surnames_cli("evaluate", "--workdir", str(tiny_surnames), "--tsv", str(tsv))
    assert code == 0, err
    assert "(n=2)" in out


@pytest.mark.parametrize(
    "content,message",
    [("{x", "is unreadable"), ("[]", "holds a JSON list"), ('{"languages": 3}', "lacks its")],
)
def test_a_damaged_label_file_is_one_line(tiny_surnames, tmp_path, content, message):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(tiny_surnames, workdir)
    (workdir / "labels.json").write_text(content)
    code, _, err = surnames_cli("predict", "--workdir", str(workdir), "Smith")
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_predict_says_when_it_falls_back_from_the_best_parameters(tiny_surnames, tmp_path):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(tiny_surnames, workdir)
    shutil.rmtree(workdir / "best")
    code, out, err = surnames_cli("predict", "--workdir", str(workdir), "Smith")
    assert code == 0 and "Smith:" in out
    assert "best is missing; using the last checkpoint" in err


SWEEP = """method: grid
metric: {metric}
parameters:
  hidden_size: {param}
command: [python, train.py, --task=running_average, --steps=2]
"""


@pytest.mark.parametrize(
    "content,message",
    [
        (SWEEP.format(metric="eval_loss", param="{values: [4]}"), "metric: expected a mapping"),
        (
            SWEEP.format(metric="{name: eval_loss}", param="{values: 4}"),
            "expected a non-empty list",
        ),
        (SWEEP.format(metric="{name: eval_loss}", param="{values: []}"), "non-empty list"),
        (b"\xff\xfe\x00method", "is not UTF-8 text"),
        (None, "cannot be read (Is a directory)"),
    ],
)
def test_bad_sweep_files_are_one_line(tmp_path, capsys, content, message):
    import sweep

    path = tmp_path / "s.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = sweep.main([str(path), "--sweep_dir", str(tmp_path / "out"), "--wandb=disabled"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("content", ["{bad", '{"sweep": 1}', '{"sweep": {}, "trials": 3}', "[]"])
def test_a_damaged_sweep_state_is_one_line_on_resume_and_report(tmp_path, capsys, content):
    import sweep

    spec = tmp_path / "s.yaml"
    spec.write_text(SWEEP.format(metric="{name: eval_loss}", param="{values: [4]}"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep_state.json").write_text(content)
    for args in ([str(spec), "--sweep_dir", str(out)], ["--report", str(out)]):
        code = sweep.main([*args, "--wandb=disabled"])
        err = capsys.readouterr().err
        assert code == 2 and "sweep state" in err and "Traceback" not in err
    assert (out / "sweep_state.json").read_text() == content  # left for the user to restore


def test_wandb_online_without_a_login_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_SILENT="true", NETRC=str(tmp_path / "netrc"))
    proc = subprocess.run(
        [sys.executable, "train.py", "--task=running_average", *TINY, "--steps=2",
         f"--workdir={tmp_path / 'w'}", "--wandb=online"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--wandb=online: W&B could not start" in proc.stderr and "wandb login" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "config.json").exists()
