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
state is held (h_t = h_{t-1}, c_t = c_{t-1}). A step that is padding in every
row is skipped, forward and backward (`_unless_all_padding`), so a batch of
short sequences padded to a long T costs its own longest sequence.

LSTM gate order in the fused weight matrices is [f, i, o, g]:
f, i, o = sigmoid(x U + h W + b), g = tanh(...), C_t = f*C_{t-1} + i*g,
h_t = tanh(C_t) * o.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from models.replicas import any_replica


class Activation(NamedTuple):
    """An activation and its derivative written in terms of its output y = act(z) (what
    the fused backward has stored)."""

    fn: Callable[[jax.Array], jax.Array]
    grad_from_output: Callable[[jax.Array], jax.Array]


ACTIVATION_TABLE: dict[str, Activation] = {
    "tanh": Activation(jnp.tanh, lambda y: 1.0 - y * y),  # tanh' = 1 - tanh^2
    "relu": Activation(jax.nn.relu, lambda y: (y > 0).astype(y.dtype)),  # 1 where z > 0
    "identity": Activation(lambda z: z, jnp.ones_like),
}
# A traced activation is an index into this tuple (see `activation_of`).
ACTIVATION_NAMES: tuple[str, ...] = tuple(ACTIVATION_TABLE)


def activation_of(activation: str | jax.Array) -> Activation:
    """The Activation named, or for an array, the one at that index of ACTIVATION_NAMES.

    An array (a traced scalar) lets replicas with different activations share one
    compiled program (training.packing): every candidate is computed and the chosen
    one's value kept (a select, not a branch, so it vectorises under vmap); the values
    equal the named activation's."""
    if isinstance(activation, str):
        if activation not in ACTIVATION_TABLE:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of {ACTIVATION_NAMES}"
            )
        return ACTIVATION_TABLE[activation]
    index = activation

    def pick(candidates: list[jax.Array]) -> jax.Array:
        chosen = candidates[-1]
        for i in range(len(candidates) - 2, -1, -1):
            chosen = jnp.where(index == i, candidates[i], chosen)
        return chosen

    table = ACTIVATION_TABLE.values()
    return Activation(
        lambda z: pick([a.fn(z) for a in table]),
        lambda y: pick([a.grad_from_output(y) for a in table]),
    )


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


def _unless_all_padding(mask_B, advance, held):
    """advance(), or held() at a step where every row is padding.

    Padded steps sit at the end of shorter sequences, so the steps past a batch's
    longest sequence hold every state: `held` returns what `advance` would (the
    states unchanged, zeros for the per-step values the mask discards) without its
    matrix products. Under the trainer's vmap over replicas the step is skipped
    when it is padding in every replica (models.replicas); under any other vmap
    with a batched mask lax.cond becomes a select: both run, the result is the
    same."""
    if mask_B is None:
        return advance()
    return lax.cond(any_replica(jnp.any(mask_B)), advance, held)


def _zeros_like_output(fn, index):
    """Zeros shaped like output `index` of fn() (traced for its shapes only)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn)[index])


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
    activation: str | jax.Array,
    hoist: bool,
    residual=False,
    unroll=1,
    keep_updates=False,
):
    """hs (T, B, H); with keep_updates also act(z_t) for every step: (hs, updates).
    activation: a name, or a traced index into ACTIVATION_NAMES (`activation_of`)."""
    act = activation_of(activation).fn

    def step(h, per_step):
        inp, m, p = per_step

        def advance():
            update = act(_pre_activation(inp, h, w_x, w_h, b, hoist))
            return _hold(m, update + h if residual else update, h), update

        h_new, update = _unless_all_padding(m, advance, lambda: (h, _zeros_like_output(advance, 1)))
        if p is not None:
            h_new = h_new + p
        return h_new, (h_new, update) if keep_updates else h_new

    inputs = _step_inputs(xs, w_x, b, hoist)
    _, outs = lax.scan(step, h0, (inputs, mask, perturb), unroll=unroll)
    return outs


class RNNOptions(NamedTuple):
    """The static (non-differentiable) settings of a fused RNN: one hashable argument."""

    activation: str | None  # None: a traced index, passed to _rnn_fused as `act_index`
    hoist: bool
    residual: bool
    unroll: int


class RNNResiduals(NamedTuple):
    """What the fused RNN's forward keeps for its backward."""

    w_x: jax.Array  # (D, H)
    w_h: jax.Array  # (H, H)
    xs: jax.Array  # (T, B, D)
    h0: jax.Array  # (B, H)
    mask: jax.Array | None  # (T, B) bool
    hs: jax.Array  # (T, B, H): h_1..h_T
    updates: jax.Array | None  # (T, B, H): act(z_t), residual RNN only
    act_index: jax.Array | None  # the traced activation, when options.activation is None


def _activation(options: RNNOptions, act_index) -> str | jax.Array:
    """The fused RNN's activation: the static name, or else the traced index."""
    return act_index if options.activation is None else options.activation


def _forward_options(options: RNNOptions, act_index) -> dict:
    """_rnn_forward's keyword arguments: the options, with the traced activation if any."""
    return {**options._asdict(), "activation": _activation(options, act_index)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _rnn_fused(w_x, w_h, b, xs, h0, mask, act_index, options: RNNOptions):
    return _rnn_forward(w_x, w_h, b, xs, h0, mask, None, **_forward_options(options, act_index))


def _rnn_fused_fwd(w_x, w_h, b, xs, h0, mask, act_index, options: RNNOptions):
    w_x, w_h, b, xs, h0, mask, act_index = _values(w_x, w_h, b, xs, h0, mask, act_index)
    kw = _forward_options(options, act_index)
    if options.residual:
        # act(z_t) is stored: rebuilding it as h_t - h_{t-1} cancels catastrophically
        # once |h| >> |act(z)| (relative error 1.8e4 in bfloat16 at T = 300, against
        # autodiff's 0.15; tests/test_precision.py)
        hs, updates = _rnn_forward(w_x, w_h, b, xs, h0, mask, None, keep_updates=True, **kw)
    else:
        # without the skip, h_t itself is act(z_t) wherever the step is not padding
        hs = _rnn_forward(w_x, w_h, b, xs, h0, mask, None, **kw)
        updates = None
    return hs, RNNResiduals(w_x, w_h, xs, h0, mask, hs, updates, act_index)


def _rnn_fused_bwd(options: RNNOptions, saved: RNNResiduals, g_hs):
    """Reverse scan over t = T..1 carrying dL/dh_t (B, H) and the weight gradients."""
    w_h_T = saved.w_h.T
    act_grad = activation_of(_activation(options, saved.act_index)).grad_from_output

    def step(carry, t):
        dh_next, grads = carry
        # dL/dh_t = the loss's own gradient at step t + what flows back from step t+1
        dh = _plus(_cotangent(g_hs, t), dh_next)

        def advance():
            return _rnn_step_back(dh, grads, t)

        def held():  # every row padding: all of dL/dh_t passes to h_{t-1}, dx_t = 0
            return (dh, grads), _zeros_like_output(advance, 1)

        mask_t = None if saved.mask is None else _at(saved.mask, t)
        return _unless_all_padding(mask_t, advance, held)

    def _rnn_step_back(dh, grads, t):
        h_t, h_prev = _at(saved.hs, t), _before(saved.hs, saved.h0, t)
        update = _at(saved.updates, t) if options.residual else h_t  # act(z_t), (B, H)
        dz = dh * act_grad(update)  # dL/dz_t = dL/dh_t * act'(z_t), (B, H)
        # what reaches h_{t-1} directly, not through z_t: the skip connection's identity,
        # and at a padded step (h_t = h_{t-1}) all of dL/dh_t
        if saved.mask is None:
            passthrough = dh if options.residual else 0.0
        else:
            keep = _at(saved.mask, t)[:, None]
            dz = jnp.where(keep, dz, 0.0)
            passthrough = dh if options.residual else jnp.where(keep, 0.0, dh)
        # dW_x += x_t^T dz, dW_h += h_{t-1}^T dz, db += sum_b dz; dx_t = dz W_x^T
        grads, dx_t = _accumulate(grads, _at(saved.xs, t), h_prev, dz, saved.w_x)
        # dL/dh_{t-1} = passthrough + dz W_h^T
        return (passthrough + dz @ w_h_T, grads), dx_t

    init = (jnp.zeros_like(saved.h0), _zero_grads(saved.w_x, saved.w_h))
    steps = jnp.arange(saved.xs.shape[0])
    (dh0, (d_w_x, d_w_h, d_b)), d_xs = lax.scan(
        step, init, steps, reverse=True, unroll=options.unroll
    )
    return d_w_x, d_w_h, d_b, d_xs, dh0, None, None  # no gradient: the mask, the activation


_rnn_fused.defvjp(_rnn_fused_fwd, _rnn_fused_bwd, symbolic_zeros=True)


def rnn_scan(
    w_x_DxH,
    w_h_HxH,
    b_H,
    xs_TxBxD,
    h0_BxH,
    mask_TxB=None,
    *,
    activation: str | jax.Array = "tanh",
    impl: str = "fused",
    hoist: bool = False,
    residual: bool = False,
    unroll: int = 1,
    perturb_TxBxH=None,
):
    """All hidden states h_1..h_T of h_t = act(x_t W_x + h_{t-1} W_h + b), shape (T, B, H).

    activation: a name, or a traced index into ACTIVATION_NAMES (`activation_of`).
    residual=True adds a skip connection: h_t = act(...) + h_{t-1}.
    `perturb_TxBxH` (scan impl only) is added to each h_t inside the recurrence;
    the gradient of a loss with respect to it at zero is dL/dh_t.
    """
    if impl == "fused" and perturb_TxBxH is None:
        if isinstance(activation, str):
            options, act_index = RNNOptions(activation, hoist, residual, unroll), None
        else:
            options, act_index = RNNOptions(None, hoist, residual, unroll), jnp.asarray(activation)
        return _rnn_fused(w_x_DxH, w_h_HxH, b_H, xs_TxBxD, h0_BxH, mask_TxB, act_index, options)
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

        def advance():
            h_new, c_new, gates = _lstm_cell(_pre_activation(inp, h, w_x, w_h, b, hoist), c, p_c)
            return _hold(m, h_new, h), _hold(m, c_new, c), gates

        h_new, c_new, gates = _unless_all_padding(
            m, advance, lambda: (h, c, _zeros_like_output(advance, 2))
        )
        if p_h is not None:
            h_new = h_new + p_h
        out = (h_new, c_new, gates) if keep_gates else (h_new, c_new)
        return (h_new, c_new), out

    inputs = _step_inputs(xs, w_x, b, hoist)
    _, outs = lax.scan(step, (h0, c0), (inputs, mask, perturb_h, perturb_c), unroll=unroll)
    return outs


class LSTMOptions(NamedTuple):
    """The static settings of a fused LSTM."""

    hoist: bool
    unroll: int


class LSTMResiduals(NamedTuple):
    """What the fused LSTM's forward keeps for its backward."""

    w_x: jax.Array  # (D, 4H)
    w_h: jax.Array  # (H, 4H)
    xs: jax.Array  # (T, B, D)
    h0: jax.Array  # (B, H)
    c0: jax.Array  # (B, H)
    mask: jax.Array | None  # (T, B) bool
    hs: jax.Array  # (T, B, H)
    cs: jax.Array  # (T, B, H)
    gates: tuple[jax.Array, ...]  # f, i, o, g after their activations, each (T, B, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _lstm_fused(w_x, w_h, b, xs, h0, c0, mask, options: LSTMOptions):
    return _lstm_forward(w_x, w_h, b, xs, h0, c0, mask, None, None, **options._asdict())


def _lstm_fused_fwd(w_x, w_h, b, xs, h0, c0, mask, options: LSTMOptions):
    w_x, w_h, b, xs, h0, c0, mask = _values(w_x, w_h, b, xs, h0, c0, mask)
    hs, cs, gates = _lstm_forward(
        w_x, w_h, b, xs, h0, c0, mask, None, None, keep_gates=True, **options._asdict()
    )
    return (hs, cs), LSTMResiduals(w_x, w_h, xs, h0, c0, mask, hs, cs, gates)


def _lstm_fused_bwd(options: LSTMOptions, saved: LSTMResiduals, cotangents):
    """Reverse scan carrying dL/dh_t, dL/dC_t (B, H) and the weight gradients."""
    g_hs, g_cs = cotangents
    w_h_T = saved.w_h.T

    def step(carry, t):
        dh_next, dc_next, grads = carry
        dh = _plus(_cotangent(g_hs, t), dh_next)  # dL/dh_t
        dc_in = _plus(_cotangent(g_cs, t), dc_next)  # dL/dC_t from the loss and step t+1

        def advance():
            return _lstm_step_back(dh, dc_in, grads, t)

        def held():  # every row padding: dL/dh_t and dL/dC_t pass to step t-1, dx_t = 0
            return (dh, dc_in, grads), _zeros_like_output(advance, 1)

        mask_t = None if saved.mask is None else _at(saved.mask, t)
        return _unless_all_padding(mask_t, advance, held)

    def _lstm_step_back(dh, dc_in, grads, t):
        f, i, o, g = (_at(gate, t) for gate in saved.gates)
        tanh_c = jnp.tanh(_at(saved.cs, t))
        # h_t = tanh(C_t) o  =>  dL/dC_t += dL/dh_t * o * (1 - tanh^2 C_t)
        dc = dc_in + dh * o * (1.0 - tanh_c * tanh_c)
        # pre-activation gradients, gate order [f, i, o, g], (B, 4H):
        # C_t = f C_{t-1} + i g; sigmoid' = s (1 - s); tanh' = 1 - g^2
        dz = jnp.concatenate(
            [
                dc * _before(saved.cs, saved.c0, t) * f * (1.0 - f),
                dc * g * i * (1.0 - i),
                dh * tanh_c * o * (1.0 - o),
                dc * i * (1.0 - g * g),
            ],
            axis=-1,
        )
        # to step t-1: dL/dh_{t-1} = dz W_h^T and dL/dC_{t-1} = dL/dC_t * f; a padded step
        # (state held) passes both through unchanged instead
        if saved.mask is None:
            dh_prev, dc_prev = dz @ w_h_T, dc * f
        else:
            keep = _at(saved.mask, t)[:, None]
            dz = jnp.where(keep, dz, 0.0)
            dh_prev = jnp.where(keep, 0.0, dh) + dz @ w_h_T
            dc_prev = jnp.where(keep, dc * f, dc_in)
        h_prev = _before(saved.hs, saved.h0, t)
        grads, dx_t = _accumulate(grads, _at(saved.xs, t), h_prev, dz, saved.w_x)
        return (dh_prev, dc_prev, grads), dx_t

    init = (jnp.zeros_like(saved.h0), jnp.zeros_like(saved.c0), _zero_grads(saved.w_x, saved.w_h))
    steps = jnp.arange(saved.xs.shape[0])
    (dh0, dc0, (d_w_x, d_w_h, d_b)), d_xs = lax.scan(
        step, init, steps, reverse=True, unroll=options.unroll
    )
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
        options = LSTMOptions(hoist, unroll)
        return _lstm_fused(w_x_Dx4H, w_h_Hx4H, b_4H, xs_TxBxD, h0_BxH, c0_BxH, mask_TxB, options)
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

        def advance():
            x_part = inp if hoist else inp @ w_x_Dx3H + b_3H
            h_part = h @ w_h_Hx3H
            rz = jax.nn.sigmoid(x_part[:, : 2 * hidden] + h_part[:, : 2 * hidden])
            r, z = rz[:, :hidden], rz[:, hidden:]
            n = jnp.tanh(x_part[:, 2 * hidden :] + r * (h_part[:, 2 * hidden :] + b_hn_H))
            return _hold(m, (1.0 - z) * n + z * h, h)

        h_new = _unless_all_padding(m, advance, lambda: h)
        if p is not None:
            h_new = h_new + p
        return h_new, h_new

    inputs = _step_inputs(xs_TxBxD, w_x_Dx3H, b_3H, hoist)
    _, hs = lax.scan(step, h0_BxH, (inputs, mask_TxB, perturb_TxBxH), unroll=unroll)
    return hs
