"""MLP autoencoders and the input corruptions of denoising and masked autoencoders.

Encoder: input -> hidden_sizes... -> latent (linear latent layer); decoder mirrors
it back to the input size, with an optional sigmoid output for [0, 1] data.
Corruptions are pure functions of a PRNG key:

* `add_noise`: x + N(0, std^2) (denoising; the target stays the clean x);
* `random_mask` / `apply_mask`: hide each unit independently with probability
  `ratio` (a fraction `ratio` of every example on average), where a unit is a
  coordinate or, for images, a p x p patch. (Hiding an exact count per example
  needs a sort per row: on CPU that alone took 25 ms per 128 x 784 batch, five
  times a whole train step.) Hidden
  inputs are replaced by 0 ("zero"), by 0 with the visible ones scaled by
  1 / (1 - ratio) ("scaled", inverted dropout, so the input's expected value is
  unchanged), or by a learned per-coordinate mask token ("token").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import uniform_linear

Activation = Literal["relu", "tanh", "gelu", "identity"]
Init = Literal["pytorch", "lecun"]
MaskFill = Literal["zero", "scaled", "token"]
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu, "identity": lambda z: z}


def dense(fan_in: int, fan_out: int, init: Init, rngs: nnx.Rngs) -> nnx.Linear:
    """A dense layer. init="pytorch": weights and bias ~ U(+-1/sqrt(fan_in)) (PyTorch's
    nn.Linear default); init="lecun": Flax's default (LeCun-normal weights, zero bias)."""
    if init == "lecun":
        return nnx.Linear(fan_in, fan_out, rngs=rngs)
    return uniform_linear(fan_in, fan_out, rngs)


class MLP(nnx.Module):
    """Dense layers with an activation between them (none after the last)."""

    def __init__(self, sizes: Sequence[int], activation: Activation, init: Init, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [dense(sizes[i], sizes[i + 1], init, rngs) for i in range(len(sizes) - 1)]
        )
        self.activation = activation

    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = act(x)
        return x


class Autoencoder(nnx.Module):
    """encode: x -> z (latent_dim); decode: z -> x_hat; a mask token when mask_fill='token'."""

    def __init__(
        self,
        input_dim: int,
        hidden_sizes: Sequence[int],
        latent_dim: int,
        *,
        activation: Activation = "relu",
        init: Init = "pytorch",
        sigmoid_output: bool = False,
        mask_token: bool = False,
        rngs: nnx.Rngs,
    ):
        hidden = list(hidden_sizes)
        self.encoder = MLP([input_dim, *hidden, latent_dim], activation, init, rngs=rngs)
        self.decoder = MLP([latent_dim, *reversed(hidden), input_dim], activation, init, rngs=rngs)
        self.sigmoid_output = sigmoid_output
        self.mask_token = nnx.Param(jnp.zeros((input_dim,))) if mask_token else None

    def encode(self, x_BxD):
        return self.encoder(x_BxD)

    def decode(self, z_BxK):
        out = self.decoder(z_BxK)
        return jax.nn.sigmoid(out) if self.sigmoid_output else out

    def __call__(self, x_BxD):
        return self.decode(self.encode(x_BxD))


def add_noise(key: jax.Array, x: jax.Array, std: float, clip: tuple[float, float] | None = None):
    """x + N(0, std^2), independently per coordinate; optionally clipped to a range."""
    noisy = x + std * jax.random.normal(key, x.shape, x.dtype)
    return noisy if clip is None else jnp.clip(noisy, *clip)


def random_mask(
    key: jax.Array,
    batch: int,
    dim: int,
    ratio: float,
    patch_size: int = 0,
    image_shape: tuple[int, int] | None = None,
) -> jax.Array:
    """Booleans (batch, dim), True where hidden: each unit with probability `ratio`.

    With patch_size > 0 the units are non-overlapping patch_size x patch_size
    patches of an image of `image_shape` (flattened row-major).
    """
    if patch_size:
        if image_shape is None:
            raise ValueError("patch masks need the image_shape")
        height, width = image_shape
        grid = (height // patch_size, width // patch_size)
        units = grid[0] * grid[1]
    else:
        units = dim
    hidden_units = jax.random.bernoulli(key, ratio, (batch, units))
    if not patch_size:
        return hidden_units
    patches = hidden_units.reshape(batch, grid[0], 1, grid[1], 1)
    pixels = jnp.broadcast_to(patches, (batch, grid[0], patch_size, grid[1], patch_size))
    return pixels.reshape(batch, dim)


def apply_mask(
    x: jax.Array, hidden: jax.Array, fill: MaskFill, ratio: float, token: jax.Array | None = None
) -> jax.Array:
    """The corrupted input: hidden coordinates replaced as `fill` says."""
    if fill == "zero":
        return jnp.where(hidden, 0.0, x)
    if fill == "scaled":
        return jnp.where(hidden, 0.0, x / (1.0 - ratio))
    if fill == "token":
        if token is None:
            raise ValueError("mask fill 'token' needs the learned token")
        return jnp.where(hidden, token, x)
    raise ValueError(f"unknown mask fill {fill!r}")


class LinearAutoencoder(nnx.Module):
    """x -> W2 W1 x with W1 (k, m), W2 (m, k); rows are points: x_hat = x W1^T W2^T."""

    def __init__(self, dim: int, latent_dim: int, init_scale: float, *, rngs: nnx.Rngs):
        normal = nnx.initializers.normal(init_scale)
        self.w1 = nnx.Param(normal(rngs.params(), (latent_dim, dim)))
        self.w2 = nnx.Param(normal(rngs.params(), (dim, latent_dim)))

    def __call__(self, x_BxM):
        return x_BxM @ self.w1[...].T @ self.w2[...].T
