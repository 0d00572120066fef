"""A character-level recurrent sequence classifier (e.g. surname -> language)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import uniform_linear
from models.recurrent import StackedRecurrent


def reverse_within_length(tokens_BxL: jax.Array, lengths_B: jax.Array) -> jax.Array:
    """Each row's first `length` tokens reversed, padding left in place."""
    steps = jnp.arange(tokens_BxL.shape[1])[None, :]
    source = jnp.where(steps < lengths_B[:, None], lengths_B[:, None] - 1 - steps, steps)
    return jnp.take_along_axis(tokens_BxL, source, axis=1)


def dropout(key: jax.Array | None, x: jax.Array, rate: float | jax.Array) -> jax.Array:
    """Inverted dropout (identity without a key or at a Python rate of 0). `rate` may be
    an array (a packed trial's own value): at 0 every unit is kept, unscaled."""
    if key is None or (isinstance(rate, int | float) and rate == 0.0):
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class SequenceClassifier(nnx.Module):
    """tokens (B, L) + lengths (B,) -> logits (B, C) from the top layer's last valid state.

    Input: a learned embedding, or one-hot vectors. Padded steps are masked, so
    they neither change the state nor the result. `bidirectional` adds a second
    stack that reads each name backwards; the two final states are concatenated.
    Dropout (training only, given a key) applies to the inputs and the final state.

    `ngram_buckets > 0` adds a bag of hashed character n-grams (ids (B, M), 0 =
    padding, see data/surnames.ngram_ids): their embeddings, averaged, are
    concatenated with the recurrent state before the output layer. The
    recurrent layer reads the order of the characters; the bag gives the head
    direct access to the sub-strings (suffixes such as "-ov", "-ski") that
    linear n-gram classifiers are strong on.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        input_kind: Literal["embedding", "onehot"] = "embedding",
        embedding_dim: int = 64,
        bidirectional: bool = False,
        dropout_rate: float = 0.0,
        ngram_buckets: int = 0,
        ngram_dim: int = 64,
        rngs: nnx.Rngs,
        **layer_kw,
    ):
        self.vocab_size, self.input_kind, self.dropout_rate = vocab_size, input_kind, dropout_rate
        features = vocab_size if input_kind == "onehot" else embedding_dim
        self.embed = (
            nnx.Embed(vocab_size, embedding_dim, rngs=rngs) if input_kind == "embedding" else None
        )
        self.rnn = StackedRecurrent(features, hidden_size, num_layers, rngs=rngs, **layer_kw)
        self.backward_rnn = (
            StackedRecurrent(features, hidden_size, num_layers, rngs=rngs, **layer_kw)
            if bidirectional
            else None
        )
        self.ngram_embed = (
            nnx.Embed(ngram_buckets, ngram_dim, rngs=rngs) if ngram_buckets > 0 else None
        )
        head_in = hidden_size * (2 if bidirectional else 1) + (ngram_dim if ngram_buckets else 0)
        self.head = uniform_linear(head_in, num_classes, rngs)

    def inputs(self, tokens_LxB: jax.Array) -> jax.Array:
        """The recurrent layers' inputs, in their weights' dtype: bfloat16 when training
        casts the parameters for mixed precision (`--dtype=bfloat16`), where one_hot
        and nnx.Embed would give float32 and the fused backward's gradient sums
        would no longer match the weights' dtype."""
        dtype = self.rnn.layers[0].w_x[...].dtype
        if self.embed is None:
            return jax.nn.one_hot(tokens_LxB, self.vocab_size, dtype=dtype)
        return self.embed(tokens_LxB).astype(dtype)

    def _final_state(self, rnn, tokens_BxL, lengths_B, key, rate):
        mask_LxB = jnp.arange(tokens_BxL.shape[1])[:, None] < lengths_B[None, :]
        x = dropout(key, self.inputs(tokens_BxL.T), rate)
        return rnn(x, mask=mask_LxB, time_major=True)[-1].final[0]

    def ngram_features(self, ngrams_BxM: jax.Array) -> jax.Array:
        """Mean embedding of the non-padding n-gram ids of each row."""
        if self.ngram_embed is None:
            raise ValueError("this classifier has no n-gram bag (ngram_buckets=0)")
        valid = (ngrams_BxM > 0).astype(jnp.float32)[..., None]
        total = jnp.sum(self.ngram_embed(ngrams_BxM) * valid, axis=1)
        return total / jnp.maximum(jnp.sum(valid, axis=1), 1.0)

    def __call__(
        self,
        tokens_BxL: jax.Array,
        lengths_B: jax.Array,
        ngrams_BxM=None,
        dropout_key=None,
        dropout_rate: float | jax.Array | None = None,
    ) -> jax.Array:
        """dropout_rate: instead of the model's own (e.g. a packed trial's, an array)."""
        if (self.ngram_embed is None) != (ngrams_BxM is None):
            raise ValueError("pass n-gram ids exactly when the model has ngram_buckets > 0")
        rate = self.dropout_rate if dropout_rate is None else dropout_rate
        keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
        final = self._final_state(self.rnn, tokens_BxL, lengths_B, keys[0], rate)
        if self.backward_rnn is not None:
            reversed_tokens = reverse_within_length(tokens_BxL, lengths_B)
            backward = self._final_state(
                self.backward_rnn, reversed_tokens, lengths_B, keys[1], rate
            )
            final = jnp.concatenate([final, backward], axis=-1)
        if self.ngram_embed is not None:
            final = jnp.concatenate([final, self.ngram_features(ngrams_BxM)], axis=-1)
        return self.head(dropout(keys[2], final, rate))
