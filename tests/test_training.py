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
    assert "non-finite loss, gradient or update at step" in err and "--clip_grad_norm" in err
    assert not (workdir / "summary.json").exists()
    assert json.loads((workdir / "failure.json").read_text())["exit_code"] == 1
    step, params, train_state = final_params(workdir)
    bad = int(err.split("at step ")[1].split(";")[0])
    assert 0 < step <= bad
    assert all(
        np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves((params, train_state))
    )
    assert f"the last good checkpoint (step {step}) is intact" in err


def test_evaluation_of_one_model_structure_compiles_once_for_every_run():
    """A module-level eval_fn is jitted once per structure (a study's worker reuses it);
    the task's options enter as arguments, so each run still gets its own numbers. The
    RNN's activation too: its model holds it, but evaluation runs the shared model's
    code (Problem.shared_model) with the activation as a value."""
    from flax import nnx

    from training.loop import FitResult, eval_graphdef, jitted_eval, make_evaluator

    results, programs = {}, []
    runs = [("tanh", False), ("tanh", True), ("relu", False), ("identity", True)]
    for activation, last_step_only in runs:
        cfg = running_average.Config(
            num_train=64, num_eval=16, hidden_size=8, seq_len=6,
            activation=activation, last_step_only=last_step_only,
        )  # fmt: skip
        problem = running_average.make_problem(cfg)
        graphdef, state = init_train_state(problem, make_optimizer(cfg), cfg)
        evaluate = make_evaluator(graphdef, problem, replicated=False)
        results[activation, last_step_only] = evaluate(state.params, problem.eval_data)
        shared = eval_graphdef(problem, graphdef)
        jitted = jitted_eval(shared, running_average.eval_fn, None)
        programs.append((id(jitted), jitted._cache_size()))
        # the plain function of the model itself: its own activation's code, the loss
        # choice as a Python bool
        model = nnx.merge(graphdef, state.params)
        expected = running_average.eval_fn(model, problem.eval_data, problem.hparams)
        for key, value in expected.items():
            np.testing.assert_allclose(results[activation, last_step_only][key], value,
                                       rtol=1e-6, err_msg=f"{activation} {key}")  # fmt: skip
        # the figures' predictions: the same shared code
        x = jnp.asarray(problem.eval_data["x"])
        predicted = running_average.predict(shared, state.params, x, problem.hparams)
        np.testing.assert_allclose(predicted, model(x), rtol=1e-6, atol=1e-7)
    # one jitted function for all four runs, and the later runs compiled nothing new
    assert programs == [programs[0]] * len(runs)
    assert results["tanh", True]["loss"] != results["tanh", False]["loss"]
    assert results["relu", False]["loss"] != results["tanh", False]["loss"]
    # a closure could capture anything: never shared
    closure = lambda model, data: {"n": data["x"].shape[0]}  # noqa: E731
    assert jitted_eval(graphdef, closure, None) is not jitted_eval(graphdef, closure, None)
    # chunked evaluation (equal chunks: one shape) equals one pass
    result = FitResult(graphdef, state.params, 1, [], {}, make_evaluator(graphdef, problem, False))
    whole = result.evaluate(problem.train_data)
    chunked = result.evaluate(problem.train_data, max_rows=20)  # 64 rows: chunks of 16
    for key in whole:
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-5)


@pytest.mark.parametrize(
    ("n", "max_rows", "size"),
    [(10_000, 4096, 2500), (60_000, 4096, 4000), (8192, 4096, 4096), (100, 4096, 100),
     (9973, 4096, 4096), (4097, 4096, 4096)],
)  # fmt: skip
def test_evaluation_chunks_have_one_size_where_a_divisor_allows(n, max_rows, size):
    from training.loop import chunk_size

    assert chunk_size(n, max_rows) == size


@pytest.mark.parametrize(
    ("n", "preferred", "size"),
    [(10_000, [2000], 2000),  # the held-out set's size divides the training set's
     (10_000, [3000], 2500),  # does not divide
     (10_000, [1], 2500),  # divides, but far more chunks than needed
     (10_000, [1, 2000], 2000),
     (2000, [2000], 2000), (2000, [1000], 1000), (6000, [6000], 3000)],
)  # fmt: skip
def test_evaluation_chunks_take_a_size_already_compiled_where_it_fits(n, preferred, size):
    from training.loop import chunk_size

    assert chunk_size(n, 4096, preferred) == size


def test_a_run_evaluates_its_held_out_and_training_sets_with_one_chunk_shape():
    from training.loop import FitResult, make_evaluator

    cfg = running_average.Config(num_train=120, num_eval=40, hidden_size=8, seq_len=6)
    problem = running_average.make_problem(cfg)
    graphdef, state = init_train_state(problem, make_optimizer(cfg), cfg)
    evaluate = make_evaluator(graphdef, problem, replicated=False)
    result = FitResult(graphdef, state.params, 1, [], {}, evaluate)
    held_out = result.evaluate(problem.eval_data, max_rows=64)
    train = result.evaluate(problem.train_data, max_rows=64)  # 3 chunks of 40, not 2 of 60
    assert result._eval_rows == [40]
    whole = evaluate(state.params, problem.train_data)
    np.testing.assert_allclose(train["loss"], whole["loss"], rtol=1e-5)
    assert held_out["loss"] != train["loss"]


def test_rarely_run_programs_get_their_compile_options_and_compute_the_same(monkeypatch):
    """Initialisation, evaluation and the probe's fits compile as rarely run programs
    (training.compile_options: on the CPU without XLA's fusion emitters, about half
    the compile time); the probe's program gives what the same fit compiled with
    XLA's defaults gives. (The evaluation's equality to the plain eval_fn is checked
    in test_evaluation_of_one_model_structure_compiles_once_for_every_run.)"""
    from training import compile_options, loop, probe
    from training.compile_options import rarely_run

    options = rarely_run(xla_backend_optimization_level=0)
    assert options["xla_backend_optimization_level"] == 0
    if jax.default_backend() == "cpu":
        assert options["xla_cpu_use_fusion_emitters"] is False
    # the initialisation and a fresh evaluation ask for the options
    asked: list[dict] = []

    def spy(**extra):
        asked.append(compile_options.rarely_run(**extra))
        return asked[-1]

    monkeypatch.setattr(loop, "rarely_run", spy)
    problem, _, _ = tiny_problem()
    graphdef = loop.abstract_graphdef(problem.make_model)
    loop._build_eval(graphdef, lambda model, data: {"n": data["x"].shape[0]}, None)
    assert [a.get("xla_backend_optimization_level") for a in asked] == [0, None]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((300, 12)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 300))
    weights = jnp.ones(300, jnp.float32)
    fast, fast_loss, _ = probe._fit_program()(x, y, weights, 1e-3, 3, 60)
    default_program = jax.jit(probe._fit_softmax, static_argnums=(4, 5))
    plain, plain_loss, _ = default_program(x, y, weights, 1e-3, 3, 60)
    np.testing.assert_allclose(fast_loss, plain_loss, rtol=1e-5)
    for key in ("w", "b"):
        np.testing.assert_allclose(fast[key], plain[key], rtol=1e-3, atol=1e-5)


def _softmax_objective_gradient(x, y, l2, w, b):
    """NumPy reference: the gradient of mean cross-entropy + l2 ||W||^2 (float64)."""
    logits = x @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y) + 2 * l2 * w, p.mean(axis=0)


def test_probe_fit_stops_once_converged_and_equals_the_fit_run_to_its_cap():
    """A probe fit stops when its gradient norm is below GRAD_TOL (checked against a
    NumPy gradient), and gives what the same fit run for every iteration gives; a fit
    that does not converge runs exactly `iterations`."""
    from training import probe

    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    y = rng.integers(0, 4, 400)
    weights = jnp.ones(400, jnp.float32)
    args = (jnp.asarray(x), jnp.asarray(y), weights, jnp.float32(1e-2), 4, 100)
    params, loss, count = jax.jit(probe._fit_softmax, static_argnums=(4, 5))(*args)
    assert 0 < int(count) < 100
    w, b = (np.asarray(params[k], np.float64) for k in ("w", "b"))
    grad_w, grad_b = _softmax_objective_gradient(x.astype(np.float64), y, 1e-2, w, b)
    assert np.sqrt(np.sum(grad_w**2) + np.sum(grad_b**2)) < 2 * probe.GRAD_TOL
    # a tolerance of 0 is never met: the fit runs to its cap
    full, full_loss, full_count = jax.jit(probe._fit_softmax, static_argnums=(4, 5))(
        *args, grad_tol=0.0
    )
    assert int(full_count) == 100
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    for key in ("w", "b"):
        np.testing.assert_allclose(params[key], full[key], atol=1e-4)
    np.testing.assert_array_equal(
        probe._accuracy(params, args[0], args[1]), probe._accuracy(full, args[0], args[1])
    )
