"""Where a small training run's time goes: steps per call, replicas, compilation cache.

    python benchmarks/loop_overheads.py [--parts steps_per_call,seeds,cache]

1. steps_per_call: steady-state time per train step of the default
   running-average run when K steps run inside one jitted lax.scan, K in 1..32
   (interleaved rounds, medians; the host-side batch sampler included).
2. seeds: S = 8 replicas in one compiled program (`--num_seeds=8`) vs 8 separate
   runs one after the other, each a whole `train.py` process, compilation cache off.
3. cache: a whole default run with an empty persistent compilation cache, then
   the same run again with the cache filled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def steps_per_call(ks=(1, 2, 4, 8, 16, 32), rounds=7, steps=256) -> dict[int, float]:
    import jax

    from tasks import running_average as ra
    from training.loop import init_train_state, make_chunk, make_train_step
    from training.optim import make_optimizer
    from training.sampling import EpochSampler

    cfg = ra.Config()
    problem = ra.make_problem(cfg)
    data = jax.device_put(problem.train_data)
    tx = make_optimizer(cfg)
    sampler = EpochSampler(cfg.num_train, cfg.batch_size, cfg.seed)
    runners = {}
    for k in ks:
        graphdef, state = init_train_state(problem, tx, cfg)
        chunk = make_chunk(make_train_step(graphdef, problem, tx), replicated=False)
        holder = {"state": state, "step": 0}

        def run(n, k=k, chunk=chunk, holder=holder):
            for _ in range(n // k):
                idx = sampler.indices(holder["step"], k)
                holder["state"], metrics = chunk(holder["state"], data, idx)
                holder["step"] += k
            jax.block_until_ready(metrics)

        run(k)  # compile
        runners[k] = run
    samples = {k: [] for k in ks}
    for r in range(rounds):
        for k in ks[r % len(ks) :] + ks[: r % len(ks)]:
            t0 = time.perf_counter()
            runners[k](steps)
            samples[k].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in samples.items()}


def train_process(args: list[str], env: dict | None = None) -> float:
    """Wall seconds of one whole `train.py` process."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            sys.executable,
            str(REPO / "train.py"),
            f"--workdir={workdir}",
            "--wandb=disabled",
            *args,
        ]
        t0 = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=REPO, env=env)
        return time.perf_counter() - t0


def seeds(count=8) -> dict[str, float]:
    base = ["--task=running_average", "--compilation_cache=false"]
    one_program = train_process([*base, f"--num_seeds={count}"])
    sequential = sum(train_process([*base, f"--seed={s}"]) for s in range(count))
    return {
        "one_program_s": one_program,
        "sequential_s": sequential,
        "speedup": sequential / one_program,
    }


def cache() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        env = dict(os.environ, RNNAE_CACHE_DIR=directory)
        first = train_process(["--task=running_average"], env)
        cached = train_process(["--task=running_average"], env)
    return {"first_run_s": first, "cached_run_s": cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="steps_per_call,seeds,cache")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"# {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}")
    results = {}
    if "steps_per_call" in args.parts:
        per_step = steps_per_call()
        base = per_step[1]
        for k, sec in per_step.items():
            print(
                f"steps_per_call={k:3d}: {1e3 * sec:.4f} ms/step, x{base / sec:.2f} vs K=1",
                flush=True,
            )
        results["steps_per_call"] = {str(k): v for k, v in per_step.items()}
    if "seeds" in args.parts:
        results["seeds"] = seeds()
        print(
            "8 replicas: " + ", ".join(f"{k} {v:.2f}" for k, v in results["seeds"].items()),
            flush=True,
        )
    if "cache" in args.parts:
        results["cache"] = cache()
        print(
            "whole run: " + ", ".join(f"{k} {v:.2f}" for k, v in results["cache"].items()),
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
