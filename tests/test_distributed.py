"""`train.py --distributed=true` as two local processes (CPU collectives), the cluster
emulated with Slurm's variables: the same result as one process with two emulated
devices, and only process 0 writes logs and run files."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_ARGS

ARGS = [
    "--task=running_average",
    *TINY_ARGS["running_average"],
    *("--steps=48", "--log_every=16", "--eval_every=24", "--checkpoint_every=24"),
    "--wandb=disabled",
    "--compilation_cache=false",
]


def env_for(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("XLA_FLAGS", None)
    return dict(env, PYTHONPATH=str(REPO), **extra)


def train(workdir, env, *extra):
    command = [sys.executable, str(REPO / "train.py"), *ARGS, f"--workdir={workdir}", *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def test_two_processes_equal_two_devices_in_one_and_only_process_0_writes(tmp_path):
    one = train(tmp_path / "one", env_for(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    output, _ = one.communicate(timeout=300)
    assert one.returncode == 0, output
    for attempt in range(2):  # a second coordinator port if the first one was taken
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        job = str(random.randrange(1, 4000))  # Slurm's job id picks the coordinator's port
        procs = [
            train(tmp_path / "two", env_for(SLURM_JOB_ID=job, SLURM_NTASKS="2",
                                            SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                                            SLURM_STEP_NODELIST="localhost"),
                  "--distributed=true")
            for i in range(2)
        ]  # fmt: skip
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        if all(p.returncode == 0 for p in procs) or attempt == 1:
            break
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    reference = json.loads((tmp_path / "one" / "summary.json").read_text())
    result = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert result["devices"] == reference["devices"] == 2
    for key in ("train_loss", "eval_loss", "eval_mse_last_step"):
        assert result[key] == pytest.approx(reference[key], rel=1e-5), key
    # one writer: one event file, one config; process 1 printed no workdir of its own
    assert len(list((tmp_path / "two").glob("events.out.tfevents.*"))) == 1
    assert "workdir:" in outputs[0]
    steps = [
        sorted(p.name for p in (tmp_path / d / "checkpoints").iterdir()) for d in ("one", "two")
    ]
    assert steps[0] == steps[1] == ["32", "48"]  # every 24 steps, at 16-step chunk boundaries
