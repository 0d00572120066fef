"""The optax optimizer a TrainConfig describes.

Weight decay is an exact L2 penalty: with lambda = `weight_decay`, the objective
gains lambda * sum_W ||W||_F^2 over weight matrices (arrays with 2+ dimensions),
so `add_decayed_weights(2 * lambda)` is chained BEFORE the optimizer transform
and the gradient of every weight gets the term 2 * lambda * W. (The reverse
order, decay after the optimizer, would add a raw parameter term to the update
and, with a negative learning-rate scale, grow the weights.) With
`optimizer=adamw` weight decay is optax's decoupled decay instead.
"""

from __future__ import annotations

import jax
import optax

from training.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig, peak=None) -> optax.Schedule:
    """Constant or cosine-to-zero, after an optional linear warmup.

    peak: the learning rate if not cfg's (a per-replica array when trials are packed)."""
    peak = cfg.learning_rate if peak is None else peak
    if cfg.lr_schedule == "constant":
        main = optax.constant_schedule(peak)
    else:
        main = optax.cosine_decay_schedule(peak, max(1, cfg.steps - cfg.warmup_steps))
    if cfg.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def weight_matrices(params) -> object:
    """Mask selecting the parameters that weight decay applies to (ndim >= 2)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    cfg: TrainConfig, learning_rate=None, weight_decay=None
) -> optax.GradientTransformation:
    """Gradient clipping, L2 penalty, then the optimizer with its schedule.

    learning_rate, weight_decay: values instead of cfg's (per-replica arrays when trials
    are packed, training.packing). The chain's structure, and so the optimizer state's,
    follows cfg alone: whether weight decay is on is cfg.weight_decay > 0."""
    schedule = learning_rate_schedule(cfg, learning_rate)
    decay = cfg.weight_decay if weight_decay is None else weight_decay
    parts = []
    if cfg.clip_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    if cfg.weight_decay > 0 and cfg.optimizer != "adamw":
        parts.append(optax.add_decayed_weights(2.0 * decay, mask=weight_matrices))
    if cfg.optimizer == "adam":
        parts.append(optax.adam(schedule))
    elif cfg.optimizer == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=decay, mask=weight_matrices))
    else:
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None))
    return optax.chain(*parts)
