"""Recurrent layers against independent NumPy loops: outputs, gradients, masks, stacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import recurrent_ops as ops
from models.recurrent import Recurrent, SequenceRegressor, StackedRecurrent
from tests import numpy_reference as ref

B, T, D, H = 3, 7, 2, 4
LENGTHS = np.array([7, 3, 5])
# every row shorter than T: the last steps are padding in all rows, which the
# recurrences skip (models.recurrent_ops._unless_all_padding)
SHORT_LENGTHS = np.array([4, 2, 3])
MASKS = [False, True, "short"]  # none, LENGTHS, SHORT_LENGTHS
IMPLS = [("fused", False), ("fused", True), ("scan", False), ("scan", True)]


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def random_case(gates: int, seed: int = 0, masked: bool = True):
    rng = np.random.default_rng(seed)
    w_x = rng.normal(0, 0.6, (D, gates * H))
    w_h = rng.normal(0, 0.6, (H, gates * H))
    b = rng.normal(0, 0.3, gates * H)
    x = rng.normal(size=(B, T, D))
    h0 = rng.normal(0, 0.5, (B, H))
    c0 = rng.normal(0, 0.5, (B, H))
    lengths = {False: np.full(B, T), True: LENGTHS, "short": SHORT_LENGTHS}[masked]
    mask = np.arange(T)[None] < lengths[:, None]
    return w_x, w_h, b, x, h0, c0, mask


def time_major(a):
    return jnp.swapaxes(jnp.asarray(a), 0, 1)


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("impl,hoist", IMPLS)
@pytest.mark.parametrize("masked", MASKS)
def test_rnn_outputs_and_gradients_match_numpy_bptt(activation, impl, hoist, masked):
    check_rnn_against_numpy(activation, impl, hoist, masked, residual=False)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("impl", ["fused", "scan"])
@pytest.mark.parametrize("masked", MASKS)
def test_residual_rnn_outputs_and_gradients_match_numpy_bptt(activation, impl, masked):
    check_rnn_against_numpy(activation, impl, False, masked, residual=True)


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("impl", ["fused", "scan"])
@pytest.mark.parametrize("residual", [False, True])
def test_an_activation_given_as_an_index_matches_numpy_bptt(activation, impl, residual):
    """The form packed trials use (an array indexing ACTIVATION_NAMES): the same values
    and gradients as the activation by name."""
    check_rnn_against_numpy(activation, impl, False, True, residual=residual, as_index=True)


@pytest.mark.parametrize("impl", ["fused", "scan"])
def test_replicas_with_different_activations_share_one_vmapped_program(impl):
    w_x, w_h, b, x, h0, _, mask = random_case(1)
    g_hs = jnp.asarray(np.random.default_rng(1).normal(size=(T, B, H)))

    def loss(activation, w_x, w_h):
        hs = ops.rnn_scan(w_x, w_h, b, time_major(x), h0, time_major(mask),
                          activation=activation, impl=impl)  # fmt: skip
        return jnp.sum(hs * g_hs)

    indices = jnp.arange(len(ops.ACTIVATION_NAMES), dtype=jnp.float32)  # as packing passes them
    packed = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(1, 2)), in_axes=(0, None, None)))
    values, grads = packed(indices, w_x, w_h)
    for i, name in enumerate(ops.ACTIVATION_NAMES):
        value, (g_x, g_h) = jax.value_and_grad(loss, argnums=(1, 2))(name, w_x, w_h)
        np.testing.assert_allclose(values[i], value, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(grads[0][i], g_x, rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(grads[1][i], g_h, rtol=1e-10, atol=1e-12, err_msg=name)


def check_rnn_against_numpy(activation, impl, hoist, masked, residual, as_index=False):
    w_x, w_h, b, x, h0, _, mask = random_case(1, masked=masked)
    g_hs = np.random.default_rng(1).normal(size=(B, T, H))
    given = jnp.asarray(ops.ACTIVATION_NAMES.index(activation)) if as_index else activation

    def f(w_x, w_h, b, x, h0):
        hs = ops.rnn_scan(
            w_x,
            w_h,
            b,
            time_major(x),
            h0,
            time_major(mask) if masked else None,
            activation=given,
            impl=impl,
            hoist=hoist,
            residual=residual,
        )
        return jnp.swapaxes(hs, 0, 1)

    hs, vjp = jax.vjp(f, w_x, w_h, b, x, h0)
    expected_hs, _ = ref.rnn_forward(w_x, w_h, b, x, h0, mask, activation, residual)
    np.testing.assert_allclose(hs, expected_hs, rtol=1e-10, atol=1e-12)
    grads = vjp(jnp.asarray(g_hs))
    expected = ref.rnn_backward(w_x, w_h, b, x, h0, mask, activation, g_hs, residual)
    for got, want, name in zip(grads, expected, ["w_x", "w_h", "b", "x", "h0"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("impl,hoist", IMPLS)
@pytest.mark.parametrize("masked", MASKS)
def test_lstm_outputs_and_gradients_match_numpy_bptt(impl, hoist, masked):
    w_x, w_h, b, x, h0, c0, mask = random_case(4, masked=masked)
    rng = np.random.default_rng(2)
    g_hs, g_cs = rng.normal(size=(B, T, H)), rng.normal(size=(B, T, H))

    def f(w_x, w_h, b, x, h0, c0):
        hs, cs = ops.lstm_scan(
            w_x,
            w_h,
            b,
            time_major(x),
            h0,
            c0,
            time_major(mask) if masked else None,
            impl=impl,
            hoist=hoist,
        )
        return jnp.swapaxes(hs, 0, 1), jnp.swapaxes(cs, 0, 1)

    (hs, cs), vjp = jax.vjp(f, w_x, w_h, b, x, h0, c0)
    expected_hs, expected_cs, _ = ref.lstm_forward(w_x, w_h, b, x, h0, c0, mask)
    np.testing.assert_allclose(hs, expected_hs, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cs, expected_cs, rtol=1e-10, atol=1e-12)
    grads = vjp((jnp.asarray(g_hs), jnp.asarray(g_cs)))
    expected = ref.lstm_backward(w_x, w_h, b, x, h0, c0, mask, g_hs, g_cs)
    names = ["w_x", "w_h", "b", "x", "h0", "c0"]
    for got, want, name in zip(grads, expected, names, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("masked", [True, "short"])
def test_gru_matches_numpy_forward_and_finite_differences(masked):
    w_x, w_h, b, x, h0, _, mask = random_case(3, masked=masked)
    b_hn = np.random.default_rng(3).normal(0, 0.3, H)
    g_hs = np.random.default_rng(4).normal(size=(B, T, H))

    def hs_of(w_h):
        hs = ops.gru_scan(w_x, w_h, b, b_hn, time_major(x), h0, time_major(mask))
        return jnp.swapaxes(hs, 0, 1)

    np.testing.assert_allclose(
        hs_of(w_h), ref.gru_forward(w_x, w_h, b, b_hn, x, h0, mask), rtol=1e-10, atol=1e-12
    )
    grad = jax.grad(lambda w: jnp.sum(hs_of(w) * g_hs))(jnp.asarray(w_h))
    numeric = ref.numerical_grad(
        lambda w: float(np.sum(ref.gru_forward(w_x, w, b, b_hn, x, h0, mask) * g_hs)), w_h.copy()
    )
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shared_skip", [False, True], ids=["vmap", "vmap_replicas"])
@pytest.mark.parametrize("impl", ["fused", "scan"])
@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_replicas_whose_last_steps_are_padding_in_only_some_batches(cell, impl, shared_skip):
    """Under a plain vmap the skip of all-padding steps is a select (its predicate differs
    per replica); under the trainer's vmap over replicas (training.loop.vmap_replicas)
    it stays a cond, taken where every replica's batch is padding. Either way values
    and gradients equal each replica's batch run alone."""
    from training.loop import vmap_replicas

    w_x, w_h, b, x, h0, c0, _ = random_case(4 if cell == "lstm" else 1)
    masks = jnp.stack([np.arange(T)[None] < lengths[:, None]
                       for lengths in (LENGTHS, SHORT_LENGTHS)])  # fmt: skip
    g_hs = jnp.asarray(np.random.default_rng(1).normal(size=(T, B, H)))

    def loss(mask, w_x, w_h):
        args = (w_x, w_h, b, time_major(x), h0)
        if cell == "lstm":
            hs, _ = ops.lstm_scan(*args, c0, time_major(mask), impl=impl)
        else:
            hs = ops.rnn_scan(*args, time_major(mask), impl=impl)
        return jnp.sum(hs * g_hs)

    vmap = vmap_replicas if shared_skip else jax.vmap
    vmapped = vmap(jax.value_and_grad(loss, argnums=(1, 2)), in_axes=(0, None, None))
    program = str(jax.make_jaxpr(vmapped)(masks, w_x, w_h))
    assert ("cond[" in program) == shared_skip
    values, grads = jax.jit(vmapped)(masks, w_x, w_h)
    for i, mask in enumerate(masks):
        value, (g_x, g_h) = jax.value_and_grad(loss, argnums=(1, 2))(mask, w_x, w_h)
        np.testing.assert_allclose(values[i], value, rtol=1e-12)
        np.testing.assert_allclose(grads[0][i], g_x, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(grads[1][i], g_h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_padded_steps_hold_the_state_and_carry_no_gradient(cell):
    layer = Recurrent(D, H, cell=cell, rngs=nnx.Rngs(0), dtype=jnp.float64)
    _, _, _, x, _, _, mask = random_case(1)
    x = jnp.asarray(x)
    out = layer(x, mask=jnp.asarray(mask))
    for i, length in enumerate(LENGTHS):
        held = out.hs[i, length - 1]
        np.testing.assert_array_equal(
            out.hs[i, length:], np.broadcast_to(held, out.hs[i, length:].shape)
        )
        np.testing.assert_array_equal(out.final[0][i], held)

    def loss(x):
        return jnp.sum(layer(x, mask=jnp.asarray(mask)).final[0] ** 2)

    grad_x = jax.grad(loss)(x)
    for i, length in enumerate(LENGTHS):
        assert np.all(grad_x[i, length:] == 0.0)
        assert np.any(grad_x[i, :length] != 0.0)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
@pytest.mark.parametrize("impl", ["fused", "scan"])
def test_stacked_layers_feed_hidden_states_upward(cell, impl):
    stack = StackedRecurrent(D, H, 2, cell=cell, impl=impl, rngs=nnx.Rngs(1), dtype=jnp.float64)
    _, _, _, x, _, _, mask = random_case(1)
    outs = stack(jnp.asarray(x), mask=jnp.asarray(mask))
    h_in, zeros = x, np.zeros((B, H))
    for layer, out in zip(stack.layers, outs, strict=True):
        w = [np.asarray(p[...]) for p in (layer.w_x, layer.w_h, layer.b)]
        if cell == "rnn":
            expected, _ = ref.rnn_forward(*w, h_in, zeros, mask, "tanh")
        else:
            expected, _, _ = ref.lstm_forward(*w, h_in, zeros, zeros, mask)
        np.testing.assert_allclose(out.hs, expected, rtol=1e-10, atol=1e-12)
        h_in = expected


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_float32_regressor_gradients_match_float64_finite_differences(cell):
    """End-to-end model gradients in float32 within 1e-4 of a float64 finite-difference check."""
    _, _, _, x, _, _, mask = random_case(1)
    y = np.cumsum(x[..., :1], axis=1)
    model = SequenceRegressor(D, H, 1, 2, cell=cell, rngs=nnx.Rngs(2))
    graphdef, params = nnx.split(model)

    def loss(params, x, y):
        return jnp.mean((nnx.merge(graphdef, params)(x, jnp.asarray(mask)) - y) ** 2)

    grads32 = jax.grad(loss)(params, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    w_h = np.asarray(params64["rnn"]["layers"][0]["w_h"][...])

    @jax.jit
    def loss64(w):
        p = jax.tree.map(lambda a: a, params64)
        p["rnn"]["layers"][0]["w_h"] = nnx.Param(w)
        return loss(p, jnp.asarray(x), jnp.asarray(y))

    def loss_of_w_h(w):
        return float(loss64(jnp.asarray(w)))

    numeric = ref.numerical_grad(loss_of_w_h, w_h.copy())
    np.testing.assert_allclose(
        grads32["rnn"]["layers"][0]["w_h"][...], numeric, rtol=1e-4, atol=1e-5
    )


def test_state_perturbation_gradient_is_dloss_dh():
    """d loss / d perturbation_t at zero equals the BPTT gradient flowing into h_t."""
    w_x, w_h, b, x, h0, _, _ = random_case(1, masked=False)
    g_hs = np.zeros((B, T, H))
    g_hs[:, -1] = np.random.default_rng(5).normal(size=(B, H))  # loss on the last state only

    def loss(perturb):
        hs = ops.rnn_scan(w_x, w_h, b, time_major(x), h0, impl="scan", perturb_TxBxH=perturb)
        return jnp.sum(jnp.swapaxes(hs, 0, 1) * g_hs)

    d_perturb = np.swapaxes(jax.grad(loss)(jnp.zeros((T, B, H))), 0, 1)
    _, pre = ref.rnn_forward(w_x, w_h, b, x, h0, np.ones((B, T), bool), "tanh")
    dh = g_hs[:, -1]
    for t in reversed(range(T)):
        np.testing.assert_allclose(d_perturb[:, t], dh, rtol=1e-10, atol=1e-12)
        dh = (dh * (1 - np.tanh(pre[:, t]) ** 2)) @ w_h.T
