"""Is the RNN's activation worth packing? One program for trials that differ in it,
against one program per activation.

    python benchmarks/packed_activation.py [--steps 500] [--replicas 2]

For the default running-average RNN (1 and 2 layers), R replicas per activation
train either as three packed programs of R replicas, one per activation (the
activation a static choice, as before it packed), or as one program of 3R replicas
whose activation is a per-replica index (every candidate computed, one kept). Printed:
compile seconds and training seconds for `--steps` steps of each, in one process, one
configuration after the other. The numbers go in BENCHMARKS.md ("Whole studies").
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from models.recurrent_ops import ACTIVATION_NAMES
from tasks import running_average
from training.loop import init_replicas, make_train_step, scan_steps
from training.optim import make_optimizer
from training.sampling import EpochSampler

STEPS_PER_CALL = 16


def program(cfg, activations: list[str]):
    """(compile seconds, train seconds) of one packed program training one replica per
    entry of `activations` for cfg.steps steps."""
    problem = running_average.make_problem(dataclasses.replace(cfg, activation=activations[0]))
    replicas = len(activations)
    tx = make_optimizer(cfg)
    graphdef, state = init_replicas(problem, tx, np.arange(replicas), replicated=True)
    hp = {
        "learning_rate": jnp.full(replicas, cfg.learning_rate, jnp.float32),
        "weight_decay": jnp.zeros(replicas, jnp.float32),
        "last_step_only": jnp.zeros(replicas, jnp.float32),
        "activation": jnp.asarray([ACTIVATION_NAMES.index(a) for a in activations], jnp.float32),
    }
    if len(set(activations)) == 1:
        # the activation as the static choice it was before it packed: its name
        index = ACTIVATION_NAMES.index(activations[0])

        def static_loss(model, batch, key, values):
            return running_average.loss_fn(model, batch, key, {**values, "activation": index})

        problem = dataclasses.replace(problem, loss_fn=static_loss)

    def optimizer_for(values):
        return make_optimizer(cfg, values["learning_rate"], values["weight_decay"])

    step = make_train_step(graphdef, problem, tx, optimizer_for=optimizer_for)

    def chunk(s, data, idx, values):
        return scan_steps(lambda c, i: step(c, data, i, values), s, idx)

    chunk = jax.jit(jax.vmap(chunk, in_axes=(0, None, 0, 0)), donate_argnums=(0,))
    samplers = [EpochSampler(cfg.num_train, cfg.batch_size, r) for r in range(replicas)]
    indices = [np.stack([s.indices(k, STEPS_PER_CALL) for s in samplers])
               for k in range(0, cfg.steps, STEPS_PER_CALL)]  # fmt: skip
    t0 = time.perf_counter()
    compiled = chunk.lower(state, problem.train_data, indices[0], hp).compile()
    t1 = time.perf_counter()
    for idx in indices:
        state, _ = compiled(state, problem.train_data, idx, hp)
    jax.block_until_ready(state)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=496)  # a multiple of 16
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
          f"{os.environ.get('XLA_FLAGS', 'default XLA threads')}, {args.steps} steps")  # fmt: skip
    print("| RNN | programs | replicas each | compile s | train s | total s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for layers in (1, 2):
        cfg = running_average.Config(cell="rnn", num_layers=layers, steps=args.steps)
        r = args.replicas
        separate = [program(cfg, [a] * r) for a in ACTIVATION_NAMES]
        packed = program(cfg, [a for a in ACTIVATION_NAMES for _ in range(r)])
        for name, rows in (("one per activation", separate), ("activation packed", [packed])):
            compile_s, train_s = (sum(x) for x in zip(*rows, strict=True))
            each = len(ACTIVATION_NAMES) * r // len(rows)
            row = [f"{layers} layer(s), {name}", len(rows), each, f"{compile_s:.2f}",
                   f"{train_s:.2f}", f"{compile_s + train_s:.2f}"]  # fmt: skip
            print("| " + " | ".join(map(str, row)) + " |", flush=True)


if __name__ == "__main__":
    main()
