"""Recurrent layers as Flax NNX modules: vanilla RNN, LSTM, GRU, stacks, regression head.

The modules only hold parameters and pick an implementation; the recurrences
themselves are the pure functions of `models.recurrent_ops`. Inputs are
batch-major (B, T, D) like Flax's own layers; a stack transposes to time-major
once and back once, not per layer.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models import recurrent_ops as ops
from models.layers import symmetric_uniform, uniform_linear

Cell = Literal["rnn", "lstm", "gru"]
Activation = Literal["tanh", "relu", "identity"]
Init = Literal["uniform", "orthogonal"]
Impl = Literal["fused", "scan"]

GATES_PER_CELL = {"rnn": 1, "lstm": 4, "gru": 3}


class RecurrentOutput(NamedTuple):
    """All hidden states (and LSTM cell states) over time, plus the final state."""

    hs: jax.Array  # (B, T, H), or (T, B, H) when time_major
    cs: jax.Array | None  # LSTM cell states, same layout; None for RNN/GRU
    final: tuple[jax.Array, ...]  # (h_T,) or (h_T, C_T), each (B, H)


def blockwise_orthogonal(blocks: int):
    """An orthogonal (H, H) block per gate, side by side: Flax's recurrent default."""
    orthogonal = nnx.initializers.orthogonal()

    def init(key, shape, dtype=jnp.float32):
        hidden = shape[0]
        keys = jax.random.split(key, blocks)
        return jnp.concatenate([orthogonal(k, (hidden, hidden), dtype) for k in keys], axis=1)

    return init


class Recurrent(nnx.Module):
    """One recurrent layer run over time with `jax.lax.scan`.

    RNN:  h_t = act(x_t W_x + h_{t-1} W_h + b)   (+ h_{t-1} with residual=True)
    LSTM: f,i,o = sigmoid(x U + h W + b), g = tanh(.), C_t = f C_{t-1} + i g, h_t = tanh(C_t) o
    GRU:  PyTorch's formulation (reset gate applied to W_h h + b_hn).

    Weights are fused over gates: w_x (D, G*H), w_h (H, G*H), b (G*H).

    init="uniform": every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H)) (PyTorch's default;
    the default here because it reaches the running-average targets in fewer steps,
    see BENCHMARKS.md). init="orthogonal": Flax's default (LeCun-normal input
    kernel, orthogonal recurrent kernel per gate, zero bias). `forget_bias` is added
    to the LSTM forget gate's bias (1.0 is the usual remedy for a cell state that
    decays by half per step at initialisation).
    """

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        *,
        cell: Cell = "rnn",
        activation: Activation = "tanh",
        init: Init = "uniform",
        impl: Impl = "fused",
        hoist_input: bool = False,
        residual: bool = False,
        forget_bias: float = 0.0,
        unroll: int = 1,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if cell not in GATES_PER_CELL:
            raise ValueError(f"unknown cell {cell!r}; expected one of {list(GATES_PER_CELL)}")
        if residual and cell != "rnn":
            raise ValueError("residual=True is a vanilla-RNN option (h_t = act(...) + h_{t-1})")
        self.cell, self.activation, self.impl = cell, activation, impl
        self.residual = residual
        self.hoist_input, self.unroll = hoist_input, unroll
        self.hidden_size = hidden_size
        gates = GATES_PER_CELL[cell] * hidden_size
        if init == "uniform":
            w_x_init = w_h_init = b_init = symmetric_uniform(hidden_size**-0.5)
        elif init == "orthogonal":
            w_x_init = nnx.initializers.lecun_normal()
            w_h_init = blockwise_orthogonal(GATES_PER_CELL[cell])
            b_init = nnx.initializers.zeros_init()
        else:
            raise ValueError(f"unknown init {init!r}; expected 'uniform' or 'orthogonal'")
        self.w_x = nnx.Param(w_x_init(rngs.params(), (in_features, gates), dtype))
        self.w_h = nnx.Param(w_h_init(rngs.params(), (hidden_size, gates), dtype))
        b = b_init(rngs.params(), (gates,), dtype)
        if cell == "lstm" and forget_bias:
            b = b.at[:hidden_size].add(forget_bias)  # gate order [f, i, o, g]
        self.b = nnx.Param(b)
        if cell == "gru":  # the candidate's recurrent bias sits inside the reset gate
            self.b_hn = nnx.Param(b_init(rngs.params(), (hidden_size,), dtype))

    def zero_state(self, batch: int, dtype=jnp.float32) -> tuple[jax.Array, ...]:
        """The all-zeros initial state: (h0,) or (h0, c0)."""
        h0 = jnp.zeros((batch, self.hidden_size), dtype)
        return (h0, h0) if self.cell == "lstm" else (h0,)

    def __call__(
        self,
        x: jax.Array,
        initial_state: tuple[jax.Array, ...] | None = None,
        mask: jax.Array | None = None,
        *,
        time_major: bool = False,
        perturb_h: jax.Array | None = None,
        perturb_c: jax.Array | None = None,
        activation: str | jax.Array | None = None,
    ) -> RecurrentOutput:
        """Run over a sequence x (B, T, D) (or (T, B, D) with time_major).

        mask: booleans in the same batch/time layout as x's first two axes; padded
        steps hold the state and their outputs repeat the last valid state.
        perturb_h / perturb_c: additive state perturbations (for reading dL/dh_t).
        activation: this call's RNN activation instead of the layer's own: a name, or a
        traced index into ops.ACTIVATION_NAMES (replicas with different activations
        packed into one program). LSTM and GRU cells have none and ignore it.
        """
        xs = x if time_major else jnp.swapaxes(x, 0, 1)
        mask_TxB = None if mask is None else (mask if time_major else mask.T)
        state = initial_state or self.zero_state(xs.shape[1], xs.dtype)
        activation = self.activation if activation is None else activation
        hs, cs = self._run_time_major(xs, state, mask_TxB, perturb_h, perturb_c, activation)
        final = (hs[-1],) if cs is None else (hs[-1], cs[-1])
        if not time_major:
            hs = jnp.swapaxes(hs, 0, 1)
            cs = None if cs is None else jnp.swapaxes(cs, 0, 1)
        return RecurrentOutput(hs, cs, final)

    def _run_time_major(self, xs, state, mask, perturb_h, perturb_c, activation):
        weights = (self.w_x[...], self.w_h[...], self.b[...])
        common = dict(impl=self.impl, hoist=self.hoist_input, unroll=self.unroll)
        if self.cell == "rnn":
            hs = ops.rnn_scan(
                *weights,
                xs,
                state[0],
                mask,
                activation=activation,
                residual=self.residual,
                perturb_TxBxH=perturb_h,
                **common,
            )
            return hs, None
        if self.cell == "lstm":
            return ops.lstm_scan(
                *weights,
                xs,
                *state,
                mask,
                perturb_h_TxBxH=perturb_h,
                perturb_c_TxBxH=perturb_c,
                **common,
            )
        hs = ops.gru_scan(
            *weights, self.b_hn[...], xs, state[0], mask, perturb_TxBxH=perturb_h, **common
        )
        return hs, None


class StackedRecurrent(nnx.Module):
    """Recurrent layers where layer l's hidden states are layer l+1's inputs."""

    def __init__(
        self, in_features: int, hidden_size: int, num_layers: int, *, rngs: nnx.Rngs, **layer_kw
    ):
        sizes = [in_features] + [hidden_size] * num_layers
        self.layers = nnx.List(
            [Recurrent(sizes[i], hidden_size, rngs=rngs, **layer_kw) for i in range(num_layers)]
        )

    def __call__(
        self,
        x: jax.Array,
        initial_states: list[tuple[jax.Array, ...]] | None = None,
        mask: jax.Array | None = None,
        *,
        time_major: bool = False,
        perturb_h: list[jax.Array] | None = None,
        perturb_c: list[jax.Array] | None = None,
        activation: str | jax.Array | None = None,
    ) -> list[RecurrentOutput]:
        """Outputs of every layer (time-major inside; returned in x's layout).
        activation: every layer's, for this call (Recurrent.__call__)."""
        h = x if time_major else jnp.swapaxes(x, 0, 1)
        mask_TxB = None if mask is None else (mask if time_major else mask.T)
        outputs = []
        for index, layer in enumerate(self.layers):
            out = layer(
                h,
                None if initial_states is None else initial_states[index],
                mask_TxB,
                time_major=True,
                perturb_h=None if perturb_h is None else perturb_h[index],
                perturb_c=None if perturb_c is None else perturb_c[index],
                activation=activation,
            )
            outputs.append(out)
            h = out.hs
        if time_major:
            return outputs
        return [
            RecurrentOutput(
                jnp.swapaxes(o.hs, 0, 1),
                None if o.cs is None else jnp.swapaxes(o.cs, 0, 1),
                o.final,
            )
            for o in outputs
        ]


class SequenceRegressor(nnx.Module):
    """Recurrent stack + linear head at every timestep: y_hat_t = W_f h_t + b_f."""

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        out_features: int,
        num_layers: int = 1,
        *,
        rngs: nnx.Rngs,
        **layer_kw,
    ):
        self.rnn = StackedRecurrent(in_features, hidden_size, num_layers, rngs=rngs, **layer_kw)
        self.head = uniform_linear(hidden_size, out_features, rngs)

    def __call__(
        self,
        x_BxTxD: jax.Array,
        mask_BxT: jax.Array | None = None,
        *,
        activation: str | jax.Array | None = None,
        **perturbations,
    ):
        """Predictions (B, T, out_features) for every timestep.
        activation: the RNN layers' activation for this call (Recurrent.__call__)."""
        predictions, _ = self.predict_with_states(
            x_BxTxD, mask_BxT, activation=activation, **perturbations
        )
        return predictions

    def predict_with_states(self, x_BxTxD, mask_BxT=None, *, activation=None, **perturbations):
        """(predictions (B, T, O), every layer's outputs time-major): for gradient-flow studies.

        Perturbations, if given, are per-layer lists of time-major (T, B, H) arrays.
        """
        xs_TxBxD = jnp.swapaxes(x_BxTxD, 0, 1)
        mask_TxB = None if mask_BxT is None else mask_BxT.T
        outputs = self.rnn(
            xs_TxBxD, mask=mask_TxB, time_major=True, activation=activation, **perturbations
        )
        y_TxBxO = self.head(outputs[-1].hs)
        return jnp.swapaxes(y_TxBxO, 0, 1), outputs
