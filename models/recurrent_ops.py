"""Pure-JAX recurrences over time (time-major), with a fused backward pass.

Two implementations of each recurrence:

* `impl="scan"`: a `jax.lax.scan` over time, differentiated by JAX. It accepts
  additive perturbations of the states (used to read dL/dh_t, see
  `tasks/grad_flow.py`) and serves as the reference.
* `impl="fused"`: the same forward scan with a hand-written backward pass
  (`jax.custom_vjp`). The forward saves only what the backward needs (the
  states and, for the LSTM, the four gate activations); the reverse scan reads
  them by index (no shifted copies), accumulates the weight and bias gradients
  in its carry (no (T, B, G) buffer of pre-activation gradients), and skips the
  cell-state cotangent when the loss does not use C_t (symbolic zeros). On the
  CPUs measured here the step is bound by memory traffic rather than FLOPs, so
  this beats both autodiff and computing the weight gradients as one large
  matrix product after the loop (BENCHMARKS.md).

Shapes: T time, B batch, D input features, H hidden units, G = H (RNN) or 4H
(LSTM) gate pre-activations. Masks are booleans (T, B): at a padded step the
state is held (h_t = h_{t-1}, c_t = c_{t-1}).

LSTM gate order in the fused weight matrices is [f, i, o, g]:
f, i, o = sigmoid(x U + h W + b), g = tanh(...), C_t = f*C_{t-1} + i*g,
h_t = tanh(C_t) * o.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "identity": lambda z: z,
}


def activation_grad_from_output(activation: str, y: jax.Array) -> jax.Array:
    """act'(z) written in terms of y = act(z) (what the backward pass has stored)."""
    if activation == "tanh":
        return 1.0 - y * y
    if activation == "relu":
        return (y > 0).astype(y.dtype)
    if activation == "identity":
        return jnp.ones_like(y)
    raise ValueError(f"unknown activation {activation!r}")


def _input_projection(xs_TxBxD: jax.Array, w_x_DxG: jax.Array, b_G: jax.Array) -> jax.Array:
    """x_t W_x + b for all timesteps at once: one matrix product."""
    return jnp.einsum("tbd,dg->tbg", xs_TxBxD, w_x_DxG) + b_G


def _step_inputs(xs, w_x, b, hoist: bool):
    """What the scan body consumes: the projected inputs (hoisted) or raw inputs."""
    return _input_projection(xs, w_x, b) if hoist else xs


def _pre_activation(inp, h, w_x, w_h, b, hoist: bool):
    """z_t = x_t W_x + h_{t-1} W_h + b, projecting x_t here unless it was hoisted."""
    x_part = inp if hoist else inp @ w_x + b
    return x_part + h @ w_h


def _hold(mask_B, new, old):
    """Keep the old state where the step is padding."""
    return new if mask_B is None else jnp.where(mask_B[:, None], new, old)


def _at(seq_TxBx_, t):
    """seq[t] for a traced index t."""
    return lax.dynamic_index_in_dim(seq_TxBx_, t, keepdims=False)


def _before(seq_TxBxH, first_BxH, t):
    """The state before step t: seq[t-1], or the initial state at t = 0."""
    return jnp.where(t > 0, _at(seq_TxBxH, jnp.maximum(t - 1, 0)), first_BxH)


def _cotangent(g, t):
    """g[t], or None for a symbolic zero (an output the loss does not use)."""
    return None if g is None or isinstance(g, SymbolicZero) else _at(g, t)


def _plus(a, b):
    return b if a is None else a + b


def _values(*primals):
    """Unwrap the CustomVJPPrimal arguments a symbolic-zeros forward rule receives."""
    return tuple(getattr(p, "value", p) for p in primals)


def _accumulate(grads, x_t, h_prev, dz, w_x):
    """Add step t's contributions to (dW_x, dW_h, db) and return dx_t."""
    d_w_x, d_w_h, d_b = grads
    return (d_w_x + x_t.T @ dz, d_w_h + h_prev.T @ dz, d_b + dz.sum(axis=0)), dz @ w_x.T


def _zero_grads(w_x, w_h):
    return (jnp.zeros_like(w_x), jnp.zeros_like(w_h), jnp.zeros(w_h.shape[1], w_h.dtype))


# ----------------------------------------------------------------------------- RNN


def _rnn_forward(
    w_x,
    w_h,
    b,
    xs,
    h0,
    mask,
    perturb,
    *,
    activation: str,
    hoist: bool,
    residual=False,
    unroll=1,
    keep_updates=False,
):
    """hs (T, B, H); with keep_updates also act(z_t) for every step: (hs, updates)."""
    act = ACTIVATIONS[activation]

    def step(h, per_step):
        inp, m, p = per_step
        update = act(_pre_activation(inp, h, w_x, w_h, b, hoist))
        h_new = _hold(m, update + h if residual else update, h)
        if p is not None:
            h_new = h_new + p
        return h_new, (h_new, update) if keep_updates else h_new

    inputs = _step_inputs(xs, w_x, b, hoist)
    _, outs = lax.scan(step, h0, (inputs, mask, perturb), unroll=unroll)
    return outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _rnn_fused(w_x, w_h, b, xs, h0, mask, activation, hoist, residual, unroll):
    return _rnn_forward(
        w_x, w_h, b, xs, h0, mask, None,
        activation=activation, hoist=hoist, residual=residual, unroll=unroll,
    )  # fmt: skip


def _rnn_fused_fwd(w_x, w_h, b, xs, h0, mask, activation, hoist, residual, unroll):
    w_x, w_h, b, xs, h0, mask = _values(w_x, w_h, b, xs, h0, mask)
    kwargs = dict(activation=activation, hoist=hoist, residual=residual, unroll=unroll)
    if residual:
        # act(z_t) is stored: rebuilding it as h_t - h_{t-1} cancels catastrophically
        # once |h| >> |act(z)| (relative error 5.8e10 in bfloat16 at T = 300)
        hs, updates = _rnn_forward(w_x, w_h, b, xs, h0, mask, None, keep_updates=True, **kwargs)
    else:
        # without the skip, h_t itself is act(z_t) wherever the step is not padding
        hs = _rnn_forward(w_x, w_h, b, xs, h0, mask, None, **kwargs)
        updates = None
    return hs, (w_x, w_h, xs, h0, mask, hs, updates)


def _rnn_fused_bwd(activation, hoist, residual, unroll, residuals, g_hs):
    w_x, w_h, xs, h0, mask, hs, updates = residuals
    w_h_T = w_h.T

    def step(carry, t):
        dh_next, grads = carry
        dh = _plus(_cotangent(g_hs, t), dh_next)
        h_t, h_prev = _at(hs, t), _before(hs, h0, t)
        update = _at(updates, t) if residual else h_t  # act(z_t)
        dz = dh * activation_grad_from_output(activation, update)
        if mask is None:
            passthrough = dh if residual else 0.0
        else:
            keep = _at(mask, t)[:, None]
            dz = jnp.where(keep, dz, 0.0)
            passthrough = dh if residual else jnp.where(keep, 0.0, dh)
        grads, dx_t = _accumulate(grads, _at(xs, t), h_prev, dz, w_x)
        return (passthrough + dz @ w_h_T, grads), dx_t

    init = (jnp.zeros_like(h0), _zero_grads(w_x, w_h))
    steps = jnp.arange(xs.shape[0])
    (dh0, (d_w_x, d_w_h, d_b)), d_xs = lax.scan(step, init, steps, reverse=True, unroll=unroll)
    return d_w_x, d_w_h, d_b, d_xs, dh0, None


_rnn_fused.defvjp(_rnn_fused_fwd, _rnn_fused_bwd, symbolic_zeros=True)


def rnn_scan(
    w_x_DxH,
    w_h_HxH,
    b_H,
    xs_TxBxD,
    h0_BxH,
    mask_TxB=None,
    *,
    activation: str = "tanh",
    impl: str = "fused",
    hoist: bool = False,
    residual: bool = False,
    unroll: int = 1,
    perturb_TxBxH=None,
):
    """All hidden states h_1..h_T of h_t = act(x_t W_x + h_{t-1} W_h + b), shape (T, B, H).

    residual=True adds a skip connection: h_t = act(...) + h_{t-1}.
    `perturb_TxBxH` (scan impl only) is added to each h_t inside the recurrence;
    the gradient of a loss with respect to it at zero is dL/dh_t.
    """
    if impl == "fused" and perturb_TxBxH is None:
        return _rnn_fused(
            w_x_DxH, w_h_HxH, b_H, xs_TxBxD, h0_BxH, mask_TxB, activation, hoist, residual, unroll
        )
    if impl not in ("fused", "scan"):
        raise ValueError(f"unknown impl {impl!r}; expected 'fused' or 'scan'")
    return _rnn_forward(
        w_x_DxH,
        w_h_HxH,
        b_H,
        xs_TxBxD,
        h0_BxH,
        mask_TxB,
        perturb_TxBxH,
        activation=activation,
        hoist=hoist,
        residual=residual,
        unroll=unroll,
    )


# ---------------------------------------------------------------------------- LSTM


def _lstm_cell(z_BxG, c_BxH, perturb_c=None):
    """One LSTM update from pre-activations [f, i, o, g] and the previous cell state.

    perturb_c is added to C_t before h_t = tanh(C_t) o is computed, so that its
    gradient is the total dL/dC_t.

    Returns (h, C, gates) with gates = (f, i, o, g) kept as four arrays: splitting
    then activating each piece (not activating a 3H slice and re-slicing) and never
    concatenating them is measurably faster on CPU at small sizes (BENCHMARKS.md).
    """
    f, i, o, g = jnp.split(z_BxG, 4, axis=-1)
    f, i, o, g = jax.nn.sigmoid(f), jax.nn.sigmoid(i), jax.nn.sigmoid(o), jnp.tanh(g)
    c_new = f * c_BxH + i * g
    if perturb_c is not None:
        c_new = c_new + perturb_c
    return jnp.tanh(c_new) * o, c_new, (f, i, o, g)


def _lstm_forward(
    w_x, w_h, b, xs, h0, c0, mask, perturb_h, perturb_c, *, hoist: bool, unroll=1, keep_gates=False
):
    def step(carry, per_step):
        h, c = carry
        inp, m, p_h, p_c = per_step
        h_new, c_new, gates = _lstm_cell(_pre_activation(inp, h, w_x, w_h, b, hoist), c, p_c)
        h_new, c_new = _hold(m, h_new, h), _hold(m, c_new, c)
        if p_h is not None:
            h_new = h_new + p_h
        out = (h_new, c_new, gates) if keep_gates else (h_new, c_new)
        return (h_new, c_new), out

    inputs = _step_inputs(xs, w_x, b, hoist)
    _, outs = lax.scan(step, (h0, c0), (inputs, mask, perturb_h, perturb_c), unroll=unroll)
    return outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _lstm_fused(w_x, w_h, b, xs, h0, c0, mask, hoist, unroll):
    return _lstm_forward(w_x, w_h, b, xs, h0, c0, mask, None, None, hoist=hoist, unroll=unroll)


def _lstm_fused_fwd(w_x, w_h, b, xs, h0, c0, mask, hoist, unroll):
    w_x, w_h, b, xs, h0, c0, mask = _values(w_x, w_h, b, xs, h0, c0, mask)
    hs, cs, gates = _lstm_forward(
        w_x, w_h, b, xs, h0, c0, mask, None, None, hoist=hoist, unroll=unroll, keep_gates=True
    )
    return (hs, cs), (w_x, w_h, xs, h0, c0, mask, hs, cs, gates)


def _lstm_fused_bwd(hoist, unroll, residuals, cotangents):
    w_x, w_h, xs, h0, c0, mask, hs, cs, gates = residuals
    g_hs, g_cs = cotangents
    w_h_T = w_h.T

    def step(carry, t):
        dh_next, dc_next, grads = carry
        f, i, o, g = (_at(gate, t) for gate in gates)
        dh = _plus(_cotangent(g_hs, t), dh_next)
        dc_in = _plus(_cotangent(g_cs, t), dc_next)
        tanh_c = jnp.tanh(_at(cs, t))
        dc = dc_in + dh * o * (1.0 - tanh_c * tanh_c)
        dz = jnp.concatenate(
            [
                dc * _before(cs, c0, t) * f * (1.0 - f),
                dc * g * i * (1.0 - i),
                dh * tanh_c * o * (1.0 - o),
                dc * i * (1.0 - g * g),
            ],
            axis=-1,
        )
        if mask is None:
            dh_prev, dc_prev = dz @ w_h_T, dc * f
        else:
            keep = _at(mask, t)[:, None]
            dz = jnp.where(keep, dz, 0.0)
            dh_prev = jnp.where(keep, 0.0, dh) + dz @ w_h_T
            dc_prev = jnp.where(keep, dc * f, dc_in)
        grads, dx_t = _accumulate(grads, _at(xs, t), _before(hs, h0, t), dz, w_x)
        return (dh_prev, dc_prev, grads), dx_t

    init = (jnp.zeros_like(h0), jnp.zeros_like(c0), _zero_grads(w_x, w_h))
    steps = jnp.arange(xs.shape[0])
    (dh0, dc0, (d_w_x, d_w_h, d_b)), d_xs = lax.scan(step, init, steps, reverse=True, unroll=unroll)
    return d_w_x, d_w_h, d_b, d_xs, dh0, dc0, None


_lstm_fused.defvjp(_lstm_fused_fwd, _lstm_fused_bwd, symbolic_zeros=True)


def lstm_scan(
    w_x_Dx4H,
    w_h_Hx4H,
    b_4H,
    xs_TxBxD,
    h0_BxH,
    c0_BxH,
    mask_TxB=None,
    *,
    impl: str = "fused",
    hoist: bool = False,
    unroll: int = 1,
    perturb_h_TxBxH=None,
    perturb_c_TxBxH=None,
):
    """All (h_t, c_t) of the LSTM, each of shape (T, B, H).

    Perturbations (scan impl only) are added to h_t / C_t inside the recurrence.
    """
    perturbed = perturb_h_TxBxH is not None or perturb_c_TxBxH is not None
    if impl == "fused" and not perturbed:
        return _lstm_fused(
            w_x_Dx4H, w_h_Hx4H, b_4H, xs_TxBxD, h0_BxH, c0_BxH, mask_TxB, hoist, unroll
        )
    if impl not in ("fused", "scan"):
        raise ValueError(f"unknown impl {impl!r}; expected 'fused' or 'scan'")
    return _lstm_forward(
        w_x_Dx4H,
        w_h_Hx4H,
        b_4H,
        xs_TxBxD,
        h0_BxH,
        c0_BxH,
        mask_TxB,
        perturb_h_TxBxH,
        perturb_c_TxBxH,
        hoist=hoist,
        unroll=unroll,
    )


# ----------------------------------------------------------------------------- GRU


def gru_scan(
    w_x_Dx3H,
    w_h_Hx3H,
    b_3H,
    b_hn_H,
    xs_TxBxD,
    h0_BxH,
    mask_TxB=None,
    *,
    impl: str = "scan",
    hoist: bool = False,
    unroll: int = 1,
    perturb_TxBxH=None,
):
    """All hidden states of a GRU (PyTorch's formulation, gate order [r, z, n]), (T, B, H).

    r, z = sigmoid(x W_x + h W_h + b); n = tanh(x W_xn + b_n + r * (h W_hn + b_hn));
    h_t = (1 - z) * n + z * h_{t-1}. Differentiated by JAX (`impl` is accepted for
    a uniform interface; there is no fused backward for the GRU).
    """
    del impl
    hidden = h0_BxH.shape[-1]

    def step(h, per_step):
        inp, m, p = per_step
        x_part = inp if hoist else inp @ w_x_Dx3H + b_3H
        h_part = h @ w_h_Hx3H
        rz = jax.nn.sigmoid(x_part[:, : 2 * hidden] + h_part[:, : 2 * hidden])
        r, z = rz[:, :hidden], rz[:, hidden:]
        n = jnp.tanh(x_part[:, 2 * hidden :] + r * (h_part[:, 2 * hidden :] + b_hn_H))
        h_new = _hold(m, (1.0 - z) * n + z * h, h)
        if p is not None:
            h_new = h_new + p
        return h_new, h_new

    inputs = _step_inputs(xs_TxBxD, w_x_Dx3H, b_3H, hoist)
    _, hs = lax.scan(step, h0_BxH, (inputs, mask_TxB, perturb_TxBxH), unroll=unroll)
    return hs
