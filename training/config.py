"""Options shared by every task that trains (each task overrides the defaults it needs)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from experiment.config import INT_LIMIT, Config, option
from experiment.errors import UsageError

# Most replicas in one compiled program (packed trials x seeds, training.packing); a
# larger group is split. Here, not in training.packing, so that the study executor
# (experiment.study) can split groups without importing JAX.
MAX_REPLICAS = 32


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """Optimisation, evaluation, checkpointing and replica options."""

    steps: int = option(2000, "optimizer steps", min=1)
    batch_size: int = option(64, "examples per step (per replica)", min=1)
    learning_rate: float = option(1e-2, "peak learning rate", gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = option("adam", "optimizer (optax)")
    momentum: float = option(0.9, "SGD momentum (0 = plain SGD)", min=0, lt=1)
    lr_schedule: Literal["constant", "cosine"] = option(
        "constant", "learning-rate schedule after warmup (cosine decays to 0 at the last step)"
    )
    warmup_steps: int = option(0, "linear warmup steps", min=0)
    weight_decay: float = option(
        0.0,
        "L2 penalty lambda: adds lambda*sum ||W||^2 over weight matrices (not biases) to the "
        "objective, i.e. 2*lambda*W to their gradients; with optimizer=adamw it is the "
        "decoupled decay rate instead",
        min=0,
    )
    clip_grad_norm: float | None = option(None, "clip gradients to this global norm", gt=0)
    log_every: int = option(100, "steps between training-metric logs", min=1)
    eval_every: int = option(500, "steps between evaluations", min=1)
    checkpoint_every: int = option(
        1000, "steps between checkpoints (one is always saved at the end)", min=1
    )
    keep_checkpoints: int = option(2, "most recent checkpoints kept on disk", min=1)
    num_seeds: int = option(
        1,
        "independent replicas (seeds seed, seed+1, ...) trained in ONE compiled program",
        min=1,
    )
    steps_per_call: int = option(
        0, "train steps per jitted call, run in a lax.scan (0 = the backend's default)", min=0
    )
    dtype: Literal["float32", "bfloat16"] = option(
        "float32",
        "compute dtype of the forward/backward pass (bfloat16: mixed precision for GPU/TPU; "
        "parameters, optimizer state and loss stay float32)",
    )

    def check(self) -> None:
        super().check()
        if self.seed + self.num_seeds - 1 > INT_LIMIT:  # replica seeds are int32 in the program
            raise UsageError(
                f"--seed={self.seed} with --num_seeds={self.num_seeds}: the last replica's seed "
                f"must be <= {INT_LIMIT}"
            )
        # steps may be None in a task whose steps follow from another option (epochs)
        if self.steps is not None and self.warmup_steps >= self.steps and self.warmup_steps > 0:
            raise UsageError(
                f"--warmup_steps={self.warmup_steps} must be smaller than --steps={self.steps}"
            )
