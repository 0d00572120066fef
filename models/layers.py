"""Small shared building blocks: PyTorch-style uniform initialisation and dense layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def symmetric_uniform(scale: float):
    """An initializer drawing from U(-scale, scale)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def uniform_linear(fan_in: int, fan_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    """A dense layer with PyTorch's default init: weights and bias ~ U(+-1/sqrt(fan_in))."""
    init = symmetric_uniform(fan_in**-0.5)
    return nnx.Linear(fan_in, fan_out, kernel_init=init, bias_init=init, rngs=rngs)
