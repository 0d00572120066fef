"""The shared training loop: updates, resume, NaN guard, checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from tasks import running_average
from tests.conftest import TINY_ARGS
from training.checkpoints import Checkpoints
from training.loop import init_train_state, make_train_step
from training.optim import make_optimizer

TINY = TINY_ARGS["running_average"]


def tiny_problem(**overrides):
    cfg = running_average.Config(
        num_train=128, num_eval=32, batch_size=32, hidden_size=8, seq_len=6, **overrides
    )
    problem = running_average.make_problem(cfg)
    tx = make_optimizer(cfg)
    graphdef, state = init_train_state(problem, tx, cfg)
    step = jax.jit(make_train_step(graphdef, problem, tx))
    return problem, state, step


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_one_train_step_changes_every_parameter(cell):
    problem, state, step = tiny_problem(cell=cell, num_layers=2)
    new_state, metrics = step(state, problem.train_data, jnp.arange(32))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
    assert all(jax.tree.leaves(changed)), changed
    assert int(new_state.step) == 1 and int(new_state.bad_step) == -1
    assert np.isfinite(float(metrics["loss"]))


def test_loss_decreases_on_a_tiny_config():
    problem, state, step = tiny_problem(learning_rate=1e-2)
    data = jax.device_put(problem.train_data)
    losses = []
    for i in range(60):
        state, metrics = step(state, data, jnp.arange(32) + 32 * (i % 4))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def final_params(workdir):
    ckpt = Checkpoints(workdir / "checkpoints")
    step = ckpt.latest_step()
    cfg = running_average.Config(**{**json.loads((workdir / "config.json").read_text())["config"]})
    problem = running_average.make_problem(cfg)
    _, state = init_train_state(problem, make_optimizer(cfg), cfg)
    params, train_state, _ = ckpt.restore(
        step,
        state.params,
        dict(opt_state=state.opt_state, step=state.step, key=state.key, bad_step=state.bad_step),
    )
    ckpt.close()
    return step, params, train_state


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path, monkeypatch, capsys):
    args = [
        "--task=running_average",
        *TINY,
        "--steps=40",
        "--checkpoint_every=10",
        "--log_every=5",
        "--steps_per_call=5",
        "--lr_schedule=cosine",
    ]
    assert train.main([*args, f"--workdir={tmp_path / 'straight'}"]) == 0

    from training import progress

    original = progress.Progress.update

    def interrupt_at_25(self, step, *a, **k):
        if step >= 25:
            raise KeyboardInterrupt
        return original(self, step, *a, **k)

    monkeypatch.setattr(progress.Progress, "update", interrupt_at_25)
    assert train.main([*args, f"--workdir={tmp_path / 'resumed'}"]) == 130
    assert Checkpoints(tmp_path / "resumed" / "checkpoints").latest_step() == 20
    monkeypatch.setattr(progress.Progress, "update", original)
    assert train.main([*args, f"--workdir={tmp_path / 'resumed'}"]) == 0
    assert "resuming from checkpoint step 20" in capsys.readouterr().out

    step_a, params_a, state_a = final_params(tmp_path / "straight")
    step_b, params_b, state_b = final_params(tmp_path / "resumed")
    assert step_a == step_b == 40
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)


def test_non_finite_loss_stops_with_exit_1_and_keeps_good_checkpoints(tmp_path, capsys):
    workdir = tmp_path / "run"
    code = train.main(
        [
            "--task=running_average",
            *TINY,
            f"--workdir={workdir}",
            "--activation=relu",
            "--init=orthogonal",
            "--learning_rate=1e8",
            "--warmup_steps=30",
            "--steps=60",
            "--checkpoint_every=2",
            "--log_every=1",
            "--steps_per_call=1",
            "--optimizer=sgd",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite loss, gradient or parameters at step" in err and "--clip_grad_norm" in err
    assert not (workdir / "summary.json").exists()
    assert json.loads((workdir / "failure.json").read_text())["exit_code"] == 1
    step, params, train_state = final_params(workdir)
    bad = int(err.split("at step ")[1].split(";")[0])
    assert 0 < step <= bad
    assert all(
        np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves((params, train_state))
    )
    assert f"the last good checkpoint (step {step}) is intact" in err
