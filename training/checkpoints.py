"""Orbax checkpoints of a training run.

Layout: WORKDIR/checkpoints/<step>/ (names in experiment.workdir) with four items:
  params      the model parameters as a plain nested dict (what a probe restores alone)
  train_state step, optimizer state, RNG key and the NaN-guard flag (what resuming needs)
  config      JSON {"task": ..., "config": {...}}: enough to rebuild the model
  progress    JSON: evaluation history and time spent so far, so a resumed run's
              figures and summary equal an uninterrupted run's (absent in older runs)
Best-so-far parameters (early stopping) go to WORKDIR/best/<step>/.
A checkpoint is only ever written from finite parameters and optimizer state (see
training.loop). A step that cannot be read is moved aside to `<step>.unreadable`
(nothing is deleted) so the run resumes from the newest readable one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from experiment import interrupt
from experiment.errors import UsageError
from experiment.workdir import BEST_DIR, CHECKPOINTS_DIR

# orbax writes a JsonSave item as <step>/<item>/metadata
_JSON_ITEM_FILE = "metadata"


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

    def save(
        self, step: int, params: Any, train_state: Any, config: dict, progress: dict | None = None
    ) -> None:
        items = dict(
            params=ocp.args.StandardSave(params),
            train_state=ocp.args.StandardSave(train_state),
            config=ocp.args.JsonSave(config),
        )
        if progress is not None:
            items["progress"] = ocp.args.JsonSave(progress)
        with interrupt.deferred():  # never torn half-way (see experiment.interrupt)
            self._manager.save(step, args=ocp.args.Composite(**items))

    def restore(
        self, step: int, params_like: Any, train_state_like: Any
    ) -> tuple[Any, Any, dict | None]:
        """(params, train_state, progress or None) at `step`, shaped like the templates."""
        items = dict(
            params=ocp.args.StandardRestore(_abstract(params_like)),
            train_state=ocp.args.StandardRestore(_abstract(train_state_like)),
        )
        has_progress = (self.directory / str(step) / "progress").is_dir()
        if has_progress:
            items["progress"] = ocp.args.JsonRestore()
        with interrupt.deferred():
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        progress = restored["progress"] if has_progress else None
        return restored["params"], restored["train_state"], progress

    def quarantine(self, step: int) -> Path:
        """Move an unreadable step aside (to `<step>.unreadable[-n]`) and forget it."""
        source = self.directory / str(step)
        target = self.directory / f"{step}.unreadable"
        n = 1
        while target.exists():
            target = self.directory / f"{step}.unreadable-{n}"
            n += 1
        source.rename(target)
        self._manager.reload()
        return target

    def wait(self) -> None:
        with interrupt.deferred():
            self._manager.wait_until_finished()

    def close(self) -> None:
        with interrupt.deferred():
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


def has_steps(directory: Path) -> bool:
    """Whether a checkpoint directory holds any step, readable or not (a cheap look at
    its names, without starting a checkpoint manager)."""
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def recorded_configs(workdir: Path) -> list[tuple[Path, dict]]:
    """The run configs saved in a workdir's checkpoints: (file, {"task", "config"}) of the
    newest step with a readable config in every checkpoint directory (one per model).

    Read as plain JSON, without orbax, so a damaged step costs nothing here; a step
    whose config is unreadable is skipped (resuming reports it).
    """
    found = []
    roots = [workdir / CHECKPOINTS_DIR, workdir / BEST_DIR]
    directories = [r for r in roots if r.is_dir()]
    directories += [d for r in directories for d in r.iterdir() if d.is_dir() and _is_model(d)]
    for directory in directories:
        steps = sorted((int(d.name) for d in directory.iterdir() if d.name.isdigit()), reverse=True)
        for step in steps:
            file = directory / str(step) / "config" / _JSON_ITEM_FILE
            try:
                saved = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(saved, dict):
                found.append((file, saved))
                break
    return found


def _is_model(directory: Path) -> bool:
    """A per-model checkpoint directory (checkpoints/<model>/), not a step of its own."""
    return not directory.name.split(".")[0].isdigit()


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
            f"checkpoint {checkpoint_dir}/{step}: parameters are unreadable or do not match "
            f"the model of its saved config ({type(err).__name__}); choose another --step"
        ) from None
    finally:
        manager.close()
    return restored["params"]


def restore_model(checkpoint_dir: Path, step: int, make_model, num_seeds: int, replica: int = 0):
    """The model `make_model(rngs)` builds, with the parameters of checkpoint `step` (one
    replica's when the run trained `num_seeds` > 1 in one program). Shapes come from
    `nnx.eval_shape`, so nothing is initialised only to be overwritten."""
    from flax import nnx

    graphdef, params_like = nnx.split(nnx.eval_shape(lambda: make_model(nnx.Rngs(0))))
    if num_seeds > 1:  # the checkpoint holds every replica along a leading axis
        params_like = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((num_seeds, *a.shape), a.dtype), params_like
        )
    params = restore_params(checkpoint_dir, step, params_like)
    if num_seeds > 1:
        params = jax.tree.map(lambda a: a[replica], params)
    return nnx.merge(graphdef, params)
