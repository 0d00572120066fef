"""Options of every run (not of a task): where it writes and how it logs.

A typed config like the tasks' (experiment.config), so parsing, validation, help
texts and error messages are one mechanism. `train.py` builds it from the command
line; `sweep.py` reads its field names to keep sweeps off them.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from experiment.config import Config, option


@dataclasses.dataclass(frozen=True)
class RunOptions(Config):
    """--workdir, --wandb, --compilation_cache, --distributed."""

    config: str | None = option(
        None,
        "start from a saved run: WORKDIR/config.json or WORKDIR (its task and every option); "
        "--key=value options given with it override the saved values",
    )
    workdir: str | None = option(
        None,
        "where the run writes (default runs/<task>/<timestamp>); an existing workdir with "
        "checkpoints and the same config is resumed",
    )
    wandb: Literal["online", "offline", "disabled"] | None = option(
        None,
        "online | offline | disabled (default: $WANDB_MODE, online under `wandb agent`, "
        "else offline: files in WORKDIR/wandb for `wandb sync`)",
    )
    compilation_cache: bool = option(
        True, "JAX's persistent compilation cache in $RNNAE_CACHE_DIR or ~/.cache/rnnae/jax"
    )
    distributed: bool = option(
        False,
        "jax.distributed.initialize() for a multi-host run (coordinator from the environment); "
        "only process 0 logs and writes files",
    )


# `seed` belongs to the task config; the run options are the fields declared here
NAMES = tuple(f.name for f in dataclasses.fields(RunOptions) if f.name != "seed")
# the modes --wandb accepts: the Literal inside `wandb`'s `Literal[...] | None`
WANDB_MODES: tuple[str, ...] = typing.get_args(
    typing.get_args(typing.get_type_hints(RunOptions)["wandb"])[0]
)
