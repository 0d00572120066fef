"""One train step's cost, of this tree's code or of other checkouts, side by side.

    python benchmarks/train_step.py [--repos DIR,DIR] [--models mlp_wide,ae,lstm,rnn]
                                    [--rounds 3]

For every model, the compiled train chunk (`training.loop.make_chunk`: 16 steps in
one `lax.scan`) of each code tree (a git worktree of another commit, e.g. before a
change to the step) is measured in a fresh process: its compile time (median of 3
fresh compilations, no persistent cache) and its milliseconds per step (the chunk
run 20 times, median of 5). The trees alternate within each round, so the shared
machine's drift hits them alike; every round's values are printed.

Models: mlp_wide, the synthetic autoencoder with two 1024-wide hidden layers and
latent 32; ae, the synthetic autoencoder's defaults; lstm and rnn, the
running-average task's defaults; surnames, the surname classifier's defaults (the
names from ../shared/data/names).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_CALL = 16
NAMES_DIR = REPO.parent / "shared" / "data" / "names"


def problem_of(model: str):
    """(problem, training config) of a model, built by the imported tree's tasks."""
    from tasks import autoencoder, running_average, surnames

    if model == "surnames":
        cfg = surnames.Config(data_dir=str(NAMES_DIR))
        return surnames.make_problem(cfg, surnames.prepare(cfg)), cfg
    if model in ("mlp_wide", "ae"):
        hidden = (1024, 1024) if model == "mlp_wide" else (256,)
        cfg = autoencoder.Config(latent_dim=32, epochs=1, hidden_sizes=hidden)
        data = autoencoder.load_data(cfg)
        return autoencoder.make_problem(cfg, data), autoencoder.training_config(
            cfg, len(data.x_train)
        )
    cfg = running_average.Config(cell=model)
    return running_average.make_problem(cfg), cfg


def measure(model: str) -> dict[str, float]:
    """Compile seconds and ms per step of `model`'s train chunk, in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from training import loop
    from training.optim import make_optimizer

    problem, cfg = problem_of(model)
    tx = make_optimizer(cfg)
    graphdef, state0 = loop.init_train_state(problem, tx, cfg)
    n = jax.tree.leaves(problem.train_data)[0].shape[0]
    idx = jnp.asarray(np.random.default_rng(0).integers(0, n, (STEPS_PER_CALL, cfg.batch_size)))
    active = jnp.ones(STEPS_PER_CALL, bool)
    compiles = []
    for _ in range(3):
        jax.clear_caches()
        chunk = loop.make_chunk(loop.make_train_step(graphdef, problem, tx), False)
        lowered = chunk.lower(state0, problem.train_data, idx, active)
        start = time.perf_counter()
        program = lowered.compile()
        compiles.append(time.perf_counter() - start)
    per_step = []
    for _ in range(5):
        state = jax.tree.map(jnp.copy, state0)
        state, _ = program(state, problem.train_data, idx, active)  # warm
        jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(20):
            state, _ = program(state, problem.train_data, idx, active)
        jax.block_until_ready(state)
        per_step.append(1000 * (time.perf_counter() - start) / (20 * STEPS_PER_CALL))
    return {"compile_s": statistics.median(compiles), "ms_per_step": statistics.median(per_step)}


def measure_in(tree: Path, model: str) -> dict[str, float]:
    """`measure(model)` with `tree`'s code, in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, __file__, "--worker", str(tree), model],
        env=env, cwd=tree, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repos", default=str(REPO), help="code trees, comma-separated")
    parser.add_argument("--models", default="mlp_wide,ae,lstm,rnn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("TREE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tree, model = args.worker
        sys.path.insert(0, tree)
        print(json.dumps(measure(model)))
        return
    trees = [Path(t).resolve() for t in args.repos.split(",")]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
          f"{os.environ.get('XLA_FLAGS', 'default XLA threads')}")  # fmt: skip
    print("| model | tree | compile s, every round | ms per step, every round |")
    print("| --- | --- | --- | --- |")
    for model in args.models.split(","):
        rounds: dict[Path, list[dict]] = {t: [] for t in trees}
        for _ in range(args.rounds):
            for tree in trees:
                rounds[tree].append(measure_in(tree, model))
        for tree, values in rounds.items():
            compiles = " / ".join(f"{v['compile_s']:.2f}" for v in values)
            steps = " / ".join(f"{v['ms_per_step']:.3f}" for v in values)
            print(f"| {model} | {tree.name} | {compiles} | {steps} |", flush=True)


if __name__ == "__main__":
    main()
