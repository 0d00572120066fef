"""Many replicas in one program, compiled inner loops, several devices, mixed precision."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train
from tests.conftest import REPO, TINY_ARGS

TINY = ["--task=running_average", *TINY_ARGS["running_average"], "--steps=40", "--wandb=disabled"]


def final_params(workdir):
    """The last checkpoint's parameters, restored onto this process's first device."""
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
    step = manager.latest_step()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore = ocp.args.StandardRestore(fallback_sharding=device)
    restored = manager.restore(step, args=ocp.args.Composite(params=restore))
    manager.close()
    return jax.tree.map(np.asarray, restored["params"])


def test_replicas_in_one_program_equal_separate_runs(tmp_path):
    assert train.main([*TINY, "--num_seeds=3", f"--workdir={tmp_path / 'multi'}"]) == 0
    multi = final_params(tmp_path / "multi")
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert len(summary["eval_loss_per_seed"]) == 3 and summary["eval_loss_std"] > 0
    for seed in range(3):
        assert train.main([*TINY, f"--seed={seed}", f"--workdir={tmp_path / str(seed)}"]) == 0
        single = final_params(tmp_path / str(seed))
        jax.tree.map(
            lambda m, s, seed=seed: np.testing.assert_allclose(m[seed], s, atol=1e-6), multi, single
        )
        single_summary = json.loads((tmp_path / str(seed) / "summary.json").read_text())
        assert summary["eval_loss_per_seed"][seed] == pytest.approx(
            single_summary["eval_loss"], rel=1e-5
        )


def test_steps_per_call_does_not_change_the_result(tmp_path):
    for k in (1, 8):
        assert train.main([*TINY, f"--steps_per_call={k}", f"--workdir={tmp_path / str(k)}"]) == 0
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        final_params(tmp_path / "1"),
        final_params(tmp_path / "8"),
    )
    assert json.loads((tmp_path / "8" / "summary.json").read_text())["compilations"] == 1


def train_on_devices(devices: int, args: list[str]) -> subprocess.CompletedProcess:
    """train.py in a fresh process that sees `devices` emulated CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    code = f"import sys, train; sys.exit(train.main({args!r}))"
    command = [sys.executable, "-c", code]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def run_in_subprocess(workdir, devices: int):
    proc = train_on_devices(devices, [*TINY, "--steps_per_call=8", f"--workdir={workdir}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((workdir / "summary.json").read_text())


def test_four_emulated_devices_match_one_device_and_compile_once(tmp_path):
    one = run_in_subprocess(tmp_path / "one", 1)
    four = run_in_subprocess(tmp_path / "four", 4)
    assert (one["devices"], four["devices"]) == (1, 4)
    assert four["compilations"] == 1
    assert four["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        final_params(tmp_path / "one"),
        final_params(tmp_path / "four"),
    )


def test_bfloat16_compute_trains_close_to_float32(tmp_path):
    for dtype in ("float32", "bfloat16"):
        assert train.main([*TINY, f"--dtype={dtype}", f"--workdir={tmp_path / dtype}"]) == 0
    f32 = json.loads((tmp_path / "float32" / "summary.json").read_text())
    bf16 = json.loads((tmp_path / "bfloat16" / "summary.json").read_text())
    assert bf16["train_loss"] == pytest.approx(f32["train_loss"], rel=0.1)
    params = final_params(tmp_path / "bfloat16")
    assert all(
        leaf.dtype == np.float32 for leaf in jax.tree.leaves(params)
    )  # float32 master weights


def test_batch_not_divisible_by_devices_is_a_usage_error(tmp_path):
    proc = train_on_devices(3, [*TINY, f"--workdir={tmp_path}"])
    assert proc.returncode == 2 and "must be divisible by the number of devices (3)" in proc.stderr
