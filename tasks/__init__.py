"""Experiments, one module per task; `--task=NAME` picks one from this registry.

Every task module exposes `Config` (a frozen dataclass of its options) and
`run(cfg, run) -> dict`, which performs the experiment, writes its plots through
`run` and returns the flat summary that becomes `summary.json`. Tasks that
train call `training.loop.fit`; none re-implements the loop.

Optional, for studies (experiment.study, training.packing): `training_problem`
and `PACKABLE` (trials that differ only in these options train packed),
`ignored_options(cfg)` and `packs(cfg)`, and `training_cost(cfg)` (an estimate of
a config's training computation: a sweep starts its costliest jobs first).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from experiment.config import suggest
from experiment.errors import UsageError

TASKS: dict[str, str] = {
    "running_average": "RNN / LSTM / stacked regression of the running mean (all or last step)",
    "scalar_rnn": "backprop through h_t = w (u_t + h_{t-1}): autodiff vs closed form vs edges",
    "grad_flow": "||dL/dh_t|| over time: vanishing / exploding gradients of one configuration",
    "surnames": "character-level RNN / LSTM / GRU classifier: surname -> language (18 classes)",
    "autoencoder": "vanilla / denoising / masked MLP autoencoder + linear probe (synthetic, MNIST)",
    "linear_probe": "rebuild an encoder from its checkpoint alone and fit a linear probe",
    "latent_study": "autoencoders across latent sizes: recon and probe accuracy vs PCA, one figure",
    "linear_ae": "linear autoencoder vs PCA; weight decay's closed-form optimum and balancing",
    "grad_flow_compare": "tanh vs relu vs identity RNN vs LSTM vs residual RNN on one figure",
}


def load(name: str) -> ModuleType:
    """The task module for `name`, or a UsageError listing the tasks."""
    if name not in TASKS:
        raise UsageError(
            f"unknown task {name!r}{suggest(name, TASKS).replace('--', '--task=')}; "
            f"available: {', '.join(TASKS)}"
        )
    return importlib.import_module(f"tasks.{name}")
