"""Orbax checkpoints of a training run.

Layout: WORKDIR/checkpoints/<step>/ with three items:
  params      the model parameters as a plain nested dict (what a probe restores alone)
  train_state step, optimizer state, RNG key and the NaN-guard flag (what resuming needs)
  config      JSON {"task": ..., "config": {...}}: enough to rebuild the model
Best-so-far parameters (early stopping) go to WORKDIR/checkpoints_best/<step>/.
A checkpoint is only ever written from finite parameters (see training.loop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from experiment.errors import UsageError


def _options(keep: int) -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)


class Checkpoints:
    """Save and restore params / train state / config for one workdir."""

    def __init__(self, directory: Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=_options(keep))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, params: Any, train_state: Any, config: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                train_state=ocp.args.StandardSave(train_state),
                config=ocp.args.JsonSave(config),
            ),
        )

    def restore(self, step: int, params_like: Any, train_state_like: Any) -> tuple[Any, Any]:
        """(params, train_state) at `step`, shaped like the given templates."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params_like)),
                train_state=ocp.args.StandardRestore(_abstract(train_state_like)),
            ),
        )
        return restored["params"], restored["train_state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _abstract(tree: Any) -> Any:
    """Restore targets: shape, dtype and the placement to restore onto (the template's own
    sharding, else the first local device), so a checkpoint written on another number
    of devices still restores."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(x):
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(target, tree)


def read_config(checkpoint_dir: Path, step: int | None = None) -> tuple[int, dict]:
    """(step, saved {"task", "config"}) of a checkpoint directory, or a clear UsageError."""
    checkpoint_dir = Path(checkpoint_dir).absolute()
    if not checkpoint_dir.is_dir():
        raise UsageError(f"no checkpoints at {checkpoint_dir}")
    manager = ocp.CheckpointManager(checkpoint_dir)
    try:
        steps = list(manager.all_steps())
        if not steps:
            raise UsageError(f"no complete checkpoint in {checkpoint_dir}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise UsageError(
                f"--step={step}: no checkpoint at that step; available: {sorted(steps)}"
            )
        try:
            saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises several types for missing/partial items
            raise UsageError(
                f"checkpoint {checkpoint_dir}/{step} has no readable config ({err})"
            ) from None
        return step, saved["config"]
    finally:
        manager.close()


def restore_params(checkpoint_dir: Path, step: int, params_like: Any) -> Any:
    """Only the `params` item of a checkpoint, shaped like `params_like`.

    Raises UsageError when the saved parameters do not fit that shape.
    """
    manager = ocp.CheckpointManager(Path(checkpoint_dir).absolute())
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params_like)))
        )
    except Exception as err:
        raise UsageError(
            f"checkpoint {checkpoint_dir}/{step}: parameters do not match the model "
            f"of its saved config ({err})"
        ) from None
    finally:
        manager.close()
    return restored["params"]
