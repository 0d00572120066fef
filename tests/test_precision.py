"""The fused backward is no less accurate than JAX autodiff in low precision.

Both implementations run in float32 and bfloat16 on the same (rounded) inputs; the
reference is float64 autodiff of the same inputs (itself checked against NumPy BPTT
in test_recurrent.py). For every gradient, the fused path's relative error must stay
within a small factor of autodiff's: a backward that reconstructs a value by
subtraction (as the residual RNN's once did: 5.8e10 against autodiff's 0.77 in
bfloat16 at T = 300) fails here.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import recurrent_ops as ops

B, D, H = 4, 3, 8
# fused may be this much worse than autodiff (summation order differs), plus a floor
# below which both are at the dtype's resolution
SLACK = 2.0
FLOOR = {jnp.float32: 1e-5, jnp.bfloat16: 5e-2}


def make_case(cell: str, steps: int, seed: int = 0):
    gates = 4 if cell == "lstm" else 1
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(H)
    arrays = dict(
        w_x=rng.uniform(-scale, scale, (D, gates * H)),
        w_h=rng.uniform(-scale, scale, (H, gates * H)),
        b=rng.uniform(-scale, scale, gates * H),
        xs=rng.normal(size=(steps, B, D)),
        h0=rng.normal(0, 0.5, (B, H)),
        c0=rng.normal(0, 0.5, (B, H)),
        g=rng.normal(size=(steps, B, H)),  # the cotangent of hs
    )
    lengths = rng.integers(steps // 2, steps + 1, B)
    mask = np.arange(steps)[:, None] < lengths[None, :]
    return arrays, mask


def gradients(cell, arrays, mask, dtype, impl, hoist, unroll, residual):
    """d(sum(hs * g)) / d(w_x, w_h, b, xs), computed in `dtype`, returned as float64."""
    a = {k: jnp.asarray(v, dtype) for k, v in arrays.items()}

    def loss(w_x, w_h, b, xs):
        if cell == "lstm":
            hs, _ = ops.lstm_scan(
                w_x, w_h, b, xs, a["h0"], a["c0"], mask, impl=impl, hoist=hoist, unroll=unroll
            )
        else:
            hs = ops.rnn_scan(
                w_x, w_h, b, xs, a["h0"], mask,
                activation="tanh", impl=impl, hoist=hoist, residual=residual, unroll=unroll,
            )  # fmt: skip
        return jnp.sum((hs * a["g"]).astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(a["w_x"], a["w_h"], a["b"], a["xs"])
    return [np.asarray(g, np.float64) for g in grads]


def rounded(arrays, dtype):
    """The inputs as the low-precision run sees them, in float64 (for the reference)."""
    return {k: np.asarray(jnp.asarray(v, dtype), np.float64) for k, v in arrays.items()}


def relative_errors(grads, reference):
    pairs = zip(grads, reference, strict=True)
    return [np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30) for g, r in pairs]


CELLS = ["rnn", "residual", "lstm"]
# every combination (cell, steps, masked, hoist, unroll); the fast suite runs each
# option at least once on short sequences, and the long ones (where errors build up)
# plain and masked; `make test-slow` runs the rest
ALL_CASES = list(itertools.product(CELLS, [6, 300], [False, True], [False, True], [1, 2]))
FAST_OPTIONS = {
    6: [(False, False, 1), (True, False, 1), (True, True, 1), (True, True, 2)],
    300: [(False, False, 1), (True, False, 1)],
}
FAST_CASES = [c for c in ALL_CASES if tuple(c[2:]) in FAST_OPTIONS[c[1]]]
SLOW_CASES = [c for c in ALL_CASES if c not in FAST_CASES]
DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])


@DTYPES
@pytest.mark.parametrize("cell,steps,masked,hoist,unroll", FAST_CASES)
def test_fused_backward_is_as_accurate_as_autodiff(dtype, cell, steps, masked, hoist, unroll):
    check_against_autodiff(dtype, cell, steps, masked, hoist, unroll)


@pytest.mark.slow
@DTYPES
@pytest.mark.parametrize("cell,steps,masked,hoist,unroll", SLOW_CASES)
def test_fused_backward_is_as_accurate_as_autodiff_long(dtype, cell, steps, masked, hoist, unroll):
    check_against_autodiff(dtype, cell, steps, masked, hoist, unroll)


def check_against_autodiff(dtype, cell, steps, masked, hoist, unroll):
    residual = cell == "residual"
    kind = "lstm" if cell == "lstm" else "rnn"
    arrays, mask = make_case(kind, steps)
    mask = mask if masked else None
    with jax.enable_x64(True):
        reference = gradients(
            kind, rounded(arrays, dtype), mask, jnp.float64, "scan", False, 1, residual
        )
    fused = gradients(kind, arrays, mask, dtype, "fused", hoist, unroll, residual)
    autodiff = gradients(kind, arrays, mask, dtype, "scan", hoist, unroll, residual)
    for name, e_fused, e_auto in zip(
        ["w_x", "w_h", "b", "xs"],
        relative_errors(fused, reference),
        relative_errors(autodiff, reference),
        strict=True,
    ):
        assert e_fused <= SLACK * e_auto + FLOOR[dtype], (name, e_fused, e_auto)
