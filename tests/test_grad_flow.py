"""Scalar-RNN backprop and the gradient-flow measurements against closed forms and NumPy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tasks import grad_flow, scalar_rnn


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scalar_rnn_autodiff_equals_closed_form_equals_edge_sum(steps, seed):
    rng = np.random.default_rng(seed + 10 * steps)
    w, u = float(rng.uniform(-1.3, 1.3)), rng.normal(size=steps)
    result = scalar_rnn.backprop(w, u)
    exact = sum((steps - j + 1) * w ** (steps - j) * u[j - 1] for j in range(1, steps + 1))
    for key in ("dy_dw_autodiff", "dy_dw_closed_form", "dy_dw_edge_sum"):
        np.testing.assert_allclose(result[key], exact, rtol=1e-10, atol=1e-12, err_msg=key)
    assert len(result["edge_contributions"]) == steps


def test_scalar_rnn_t3_intermediates_match_the_graph_by_hand():
    w, (u1, u2, u3) = 0.7, (1.5, -2.0, 0.25)
    nodes = scalar_rnn.graph_nodes(scalar_rnn.backprop(w, np.array([u1, u2, u3])))
    p = u1
    q = w * p
    r = u2 + q
    s = w * r
    t = u3 + s
    y = w * t
    np.testing.assert_allclose([nodes[k] for k in "pqrsty"], [p, q, r, s, t, y], rtol=1e-14)
    result = scalar_rnn.backprop(w, np.array([u1, u2, u3]))
    np.testing.assert_allclose(
        result["dy_dw_autodiff"], u3 + 2 * w * u2 + 3 * w**2 * u1, rtol=1e-12
    )
    # the three edges leaving w: p * w^2, r * w, t * 1
    np.testing.assert_allclose(result["edge_contributions"], [p * w**2, r * w, t], rtol=1e-12)


def orthogonal_identity_config(rho: float, seq_len: int = 40) -> grad_flow.Config:
    return grad_flow.Config(
        activation="identity",
        init="orthogonal",
        spectral_radius=rho,
        seq_len=seq_len,
        hidden_size=6,
        probe_batch=1,
        last_step_only=True,
    )


@pytest.mark.parametrize("rho", [0.8, 1.15])
def test_identity_rnn_gradient_is_rho_to_the_power_of_distance(rho):
    cfg = orthogonal_identity_config(rho)
    with jax.enable_x64(True):
        model = grad_flow.make_model(cfg, nnx.Rngs(3))
        model = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model)
        x, y = (jnp.asarray(a, jnp.float64) for a in grad_flow.probe_batch(cfg))
        flow = grad_flow.measure(model, x, y, last_step_only=True)
        layer = model.rnn.layers[0]
        w_h, w_f = np.asarray(layer.w_h[...]), np.asarray(model.head.kernel[...])
        y_hat = np.asarray(model(x))[0, -1, 0]
    np.testing.assert_allclose(np.max(np.abs(np.linalg.eigvals(w_h))), rho, rtol=1e-6)
    steps = cfg.seq_len
    # closed form: dL/dh_t = 2 (y_hat - y) W_f^T (W_h^T)^(T-t)  (row-vector convention)
    grad = 2 * (y_hat - float(y[0, -1, 0])) * w_f[:, 0]
    expected = np.zeros(steps)
    for t in reversed(range(steps)):
        expected[t] = np.linalg.norm(grad)
        grad = grad @ w_h.T
    np.testing.assert_allclose(flow.grad_h[0], expected, rtol=1e-9)
    # Q is orthogonal to float32 precision, so the power law holds to ~1e-7 per step
    power_law = expected[-1] * rho ** (steps - 1 - np.arange(steps))
    np.testing.assert_allclose(flow.grad_h[0], power_law, rtol=1e-5)
    summary = grad_flow.flow_summary(flow)
    assert abs(summary["log_grad_slope"] - (-np.log(rho))) < 1e-3
    assert summary["vanishing" if rho < 1 else "exploding"] == (
        1 if abs(np.log(rho)) * steps > 6.9 else 0
    )


def test_regime_flags_on_long_sequences():
    vanish = grad_flow.flow_summary(
        grad_flow.measure(*model_and_batch(orthogonal_identity_config(0.8, 60)), True)
    )
    explode = grad_flow.flow_summary(
        grad_flow.measure(*model_and_batch(orthogonal_identity_config(1.2, 60)), True)
    )
    assert (vanish["vanishing"], vanish["exploding"]) == (1, 0)
    assert (explode["vanishing"], explode["exploding"]) == (0, 1)


def model_and_batch(cfg):
    return (grad_flow.make_model(cfg, nnx.Rngs(0)), *grad_flow.probe_batch(cfg))


def test_lstm_cell_path_does_not_decay_when_the_forget_gate_is_open():
    cfg = grad_flow.Config(cell="lstm", seq_len=100, hidden_size=4, probe_batch=2)
    model = grad_flow.make_model(cfg, nnx.Rngs(0))
    layer = model.rnn.layers[0]
    hidden = cfg.hidden_size
    bias = np.zeros(4 * hidden, np.float32)
    bias[:hidden] = 30.0  # forget gate = sigmoid(30) = 1 - 1e-13
    bias[hidden : 2 * hidden] = -30.0  # input gate closed: the cell path carries everything
    layer.b[...] = jnp.asarray(bias)
    layer.w_h[...] = jnp.zeros_like(layer.w_h[...])
    layer.w_x[...] = jnp.zeros_like(layer.w_x[...])
    flow = grad_flow.measure(model, *grad_flow.probe_batch(cfg), last_step_only=True)
    cell = flow.grad_c[0]
    assert cell[-1] > 0
    np.testing.assert_allclose(cell / cell[-1], 1.0, rtol=1e-6)
    assert abs(grad_flow.log_slope(cell)) < 1e-6


@pytest.mark.parametrize("last_step_only", [True, False])
def test_perturbation_trick_equals_numpy_backward(last_step_only):
    cfg = grad_flow.Config(seq_len=6, hidden_size=3, probe_batch=2, init="uniform")
    model = grad_flow.make_model(cfg, nnx.Rngs(5))
    x, y = grad_flow.probe_batch(cfg)
    flow = grad_flow.measure(model, x, y, last_step_only)
    layer = model.rnn.layers[0]
    w_x, w_h, b = (np.asarray(p[...], np.float64) for p in (layer.w_x, layer.w_h, layer.b))
    w_f, b_f = np.asarray(model.head.kernel[...], np.float64), np.asarray(model.head.bias[...])
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    batch, steps = x64.shape[:2]
    h = np.zeros((batch, 3))
    hs = []
    for t in range(steps):
        h = np.tanh(x64[:, t] @ w_x + h @ w_h + b)
        hs.append(h)
    y_hat = np.stack(hs, 1) @ w_f + b_f
    residual = (y_hat - y64)[..., 0]
    if last_step_only:
        d_out = np.zeros_like(residual)
        d_out[:, -1] = 2 * residual[:, -1] / batch
    else:
        d_out = 2 * residual / (batch * steps)
    expected, dh_next = np.zeros(steps), np.zeros((batch, 3))
    for t in reversed(range(steps)):
        dh = d_out[:, t : t + 1] * w_f[:, 0] + dh_next
        expected[t] = np.linalg.norm(dh)
        dh_next = (dh * (1 - hs[t] ** 2)) @ w_h.T
    np.testing.assert_allclose(flow.grad_h[0], expected, rtol=2e-5)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task=scalar_rnn", "--inputs="], "--inputs is empty"),
        (["--task=scalar_rnn", "--inputs=1,two,3"], "expected comma-separated floats"),
        (["--task=scalar_rnn", "--w=inf"], "--w=inf: must be a finite number"),
        (["--task=scalar_rnn", "--w=nan"], "must be a finite number"),
        (["--task=grad_flow", "--spectral_radius=0"], "--spectral_radius=0.0: must be > 0"),
        (["--task=grad_flow", "--spectral_radius=-1"], "must be > 0"),
        (["--task=grad_flow", "--seq_len=1"], "--seq_len=1: must be >= 2"),
        (
            ["--task=grad_flow", "--cell=lstm", "--residual"],
            "--residual applies to --cell=rnn only",
        ),
        (["--task=grad_flow_compare", "--variants=tanh,gelu"], "choose from tanh, relu"),
    ],
)
def test_bad_input_exits_2(train_cli, tmp_path, args, message):
    code, _, err = train_cli(*args, f"--workdir={tmp_path / 'w'}")
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_scalar_rnn_run_writes_summary_and_plot(train_cli, tmp_path):
    code, out, _ = train_cli(
        "--task=scalar_rnn", "--w=0.5", "--inputs=1,2,3", f"--workdir={tmp_path}"
    )
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dy_dw_autodiff"] == pytest.approx(3 + 2 * 0.5 * 2 + 3 * 0.25 * 1)
    assert summary["edge_contributions"] == pytest.approx([0.25, 1.25, 4.25])
    assert summary["node_y"] == pytest.approx(2.125)
    assert "dy/dw closed form" in out
    assert (tmp_path / "edge_contributions.png").exists()


def test_grad_flow_compare_draws_every_variant(train_cli, tmp_path):
    code, _, err = train_cli(
        "--task=grad_flow_compare",
        "--seq_len=12",
        "--hidden_size=4",
        "--probe_batch=4",
        f"--workdir={tmp_path}",
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    for variant in ("tanh", "relu", "identity", "residual", "lstm"):
        for loss in ("last", "all"):
            assert f"{variant}_{loss}_log_grad_slope" in summary
    assert "lstm_last_log_cell_grad_slope" in summary
    assert (tmp_path / "grad_flow_compare.png").stat().st_size > 10_000


def test_grad_flow_after_training_runs_the_training_loop(train_cli, tmp_path):
    code, _, err = train_cli(
        "--task=grad_flow",
        "--seq_len=8",
        "--hidden_size=4",
        "--steps=20",
        "--num_train=256",
        "--batch_size=32",
        "--num_layers=2",
        f"--workdir={tmp_path}",
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"log_grad_slope", "log_grad_slope_layer1", "log_grad_slope_layer2"} <= set(summary)
    assert (tmp_path / "checkpoints" / "20").is_dir() and (tmp_path / "grad_flow.png").exists()
