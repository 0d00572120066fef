"""Whole studies: a process per trial vs trials in a long-lived worker vs packed trials.

    python benchmarks/study_executor.py [--grids rnn_activation,linear_ae,ae_latent]
                                        [--modes ...] [--rounds N]

For each grid, the same trials run in each mode, one after another in this process's
machine, each with a cold JAX compilation cache of its own:

  process    `python train.py ...` per trial, one at a time (what sweep.py did before
             the study executor)
  in-process one experiment.worker process runs every trial (experiment.study,
             packing off)
  packed     the same worker, compatible trials packed into one program
  packed-2w  packed, with two workers (the 2-core machine's other core)
  in-process-2w  packing off, two workers (what packed-2w is compared with when a
             grid is one packed group: surnames_regularisation)
  torch      (rnn_activation only, with --modes ...,torch) a plain PyTorch script per
             trial, benchmarks/torch_trial.py in the .bench-venv (`make bench-torch`)

With --rounds N every mode runs N times, the modes interleaved (process,
in-process, ..., process, ...), and each mode's median round is reported, with
every round's wall time and every round's speed-up over the `process` run of
the same round: the shared 2-core machine's speed drifts by 10-40% over
minutes, which a single round per mode attributes to whichever mode ran then.

The executor modes start the costliest jobs first, as `sweep.py` does
(`RNNAE_BENCH_GIVEN_ORDER=1`: in the grid's order instead, as before that order).

Printed per mode: wall seconds, speed-up over `process`, the share of wall time
spent training (each packed group's training counted once), and the largest
relative difference of a trial's metric from its `process` run. The numbers go in
BENCHMARKS.md ("Whole studies").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiment.study import Result, Trial, run_trials  # noqa: E402

# (task, fixed options, {swept option: values}, metric)
GRIDS = {
    # sweeps/rnn_activation.yaml at 500 steps
    "rnn_activation": (
        "running_average",
        {"steps": "500"},
        {"cell": ["rnn", "lstm"], "activation": ["tanh", "relu", "identity"],
         "num_layers": ["1", "2"], "last_step_only": ["false", "true"]},
        "eval_loss",
    ),
    # 16 weight decays of the linear autoencoder, log-spaced (sweeps/linear_ae_weight_decay.yaml)
    "linear_ae": (
        "linear_ae",
        {"steps": "2000", "eval_every": "500"},
        {"weight_decay": [f"{x:.3g}" for x in np.logspace(-4, -0.5, 16)]},
        "orthonormality_error",
    ),
    # sweeps/ae_latent.yaml at 2 epochs: shapes differ, nothing packs
    "ae_latent": (
        "autoencoder",
        {"dataset": "synthetic", "epochs": "2"},
        {"latent_dim": ["5", "20", "100", "200"], "activation": ["relu", "tanh", "identity"],
         "kind": ["vanilla", "denoising"]},
        "probe_accuracy",
    ),
    # the surname classifier's regularisation at 900 steps (4 epochs), without the
    # n-gram bag (with it, trials train alone: tasks.surnames.packs): one packed group
    "surnames_regularisation": (
        "surnames",
        {"steps": "900", "ngram_buckets": "0",
         "data_dir": str(REPO.parent / "shared" / "data" / "names")},
        {"dropout": ["0.0", "0.25", "0.5"], "label_smoothing": ["0.0", "0.1"]},
        "val_accuracy",
    ),
    # gradient flow after 500 steps of training, 8 spectral radii at initialisation
    "flow_radius": (
        "grad_flow",
        {"steps": "500"},
        {"spectral_radius": ["none", "0.5", "0.8", "0.9", "0.95", "1.0", "1.05", "1.1"]},
        "eval_loss",
    ),
}  # fmt: skip


def trials_of(name: str, root: Path) -> list[Trial]:
    task, fixed, swept, _ = GRIDS[name]
    combos = itertools.product(*swept.values())
    return [
        Trial(f"trial-{i:03d}", task, {**fixed, **dict(zip(swept, combo, strict=True))},
              root / f"trial-{i:03d}")
        for i, combo in enumerate(combos)
    ]  # fmt: skip


def summary(trial: Trial) -> dict:
    return json.loads((trial.workdir / "summary.json").read_text())


def run_processes(trials: list[Trial]) -> list[list[Trial]]:
    for trial in trials:
        trial.workdir.mkdir(parents=True)
        with open(trial.log, "wb") as log:
            subprocess.run([sys.executable, str(REPO / "train.py"), *trial.argv()],
                           stdout=log, stderr=subprocess.STDOUT, check=True)  # fmt: skip
    return [[t] for t in trials]


TORCH_PYTHON = REPO / ".bench-venv" / "bin" / "python"


def run_torch(trials: list[Trial]) -> list[list[Trial]]:
    """Each trial as `benchmarks/torch_trial.py` (rnn_activation's options), one at a time."""
    for trial in trials:
        trial.workdir.mkdir(parents=True)
        options = [f"--{k}={v}" for k, v in trial.options.items()]
        with open(trial.log, "wb") as log:
            subprocess.run([str(TORCH_PYTHON), str(REPO / "benchmarks" / "torch_trial.py"),
                            f"--workdir={trial.workdir}", *options],
                           stdout=log, stderr=subprocess.STDOUT, check=True)  # fmt: skip
    return [[t] for t in trials]


# Jobs start costliest first, as in sweep.py (RNNAE_BENCH_GIVEN_ORDER=1: in the grid's
# order, as before that order existed)
COSTLIEST_FIRST = os.environ.get("RNNAE_BENCH_GIVEN_ORDER") != "1"


def run_executor(trials: list[Trial], pack: bool, workers: int) -> list[list[Trial]]:
    jobs: list[list[Trial]] = []
    failed: list[Result] = []
    queue = list(trials)

    def more(idle: int) -> list[Trial]:
        chosen = list(queue)
        queue.clear()
        return chosen

    def on_result(result: Result) -> None:
        if result.exit_code != 0:
            failed.append(result)

    run_trials(more, workers=workers, pack=pack, on_start=jobs.append, on_result=on_result,
               worker_log=trials[0].workdir.parent / "workers.log",
               expected=len(trials), costliest_first=COSTLIEST_FIRST)  # fmt: skip
    if failed:
        raise SystemExit(f"{len(failed)} trials failed, e.g. {failed[0].trial.log}")
    return jobs


def measure(name: str, mode: str, scratch: Path) -> dict:
    root = scratch / name / mode
    trials = trials_of(name, root)
    os.environ["RNNAE_CACHE_DIR"] = str(root / "jax-cache")  # cold, of its own
    start = time.perf_counter()
    if mode == "process":
        jobs = run_processes(trials)
    elif mode == "torch":
        jobs = run_torch(trials)
    else:
        jobs = run_executor(
            trials, pack=mode.startswith("packed"), workers=2 if mode.endswith("-2w") else 1
        )
    wall = time.perf_counter() - start
    # a packed group trains once for all its trials: count its time once (with two
    # workers, training time can overlap: the share is then of the summed wall time)
    training = sum(max(summary(t)["train_seconds"] for t in job) for job in jobs)
    metric = GRIDS[name][3]
    return dict(
        wall=wall,
        training=training,
        groups=len(jobs),
        metrics={t.id: summary(t)[metric] for t in trials},
    )


def median_round(rounds: list[dict]) -> dict:
    """The round with the median wall time (the lower of the two middle ones)."""
    return sorted(rounds, key=lambda r: r["wall"])[(len(rounds) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", default=",".join(GRIDS))
    parser.add_argument("--modes", default="process,in-process,packed,packed-2w")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every mode this many times, the modes interleaved, and "
                        "report each mode's median round (the shared machine drifts)")  # fmt: skip
    args = parser.parse_args()
    threads = os.environ.get("XLA_FLAGS", "default XLA threads")
    # with --workers > 1 each worker runs on its share of the CPUs, and its BLAS starts
    # as many threads unless set here
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "BLAS threads: CPUs / workers in packed-2w")
    blas += ", each packed-2w worker on its own CPUs"
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {threads}, {blas}")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.grids.split(","):
            torch_ok = name == "rnn_activation" and TORCH_PYTHON.exists()
            modes = [m for m in args.modes.split(",") if m != "torch" or torch_ok]
            rounds: dict[str, list[dict]] = {m: [] for m in modes}
            for r in range(args.rounds):
                for m in modes:
                    rounds[m].append(measure(name, m, Path(scratch) / f"round-{r}"))
            results = {m: median_round(rs) for m, rs in rounds.items()}
            base = results.get("process")
            print(f"\n{name}: {len(next(iter(results.values()))['metrics'])} trials, "
                  f"{args.rounds} round(s)")  # fmt: skip
            print("| mode | programs | wall s | speed-up | training share | "
                  "median / max rel. diff of the metric | every round's wall s | "
                  "every round's speed-up |")  # fmt: skip
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for mode, r in results.items():
                speedup = f"{base['wall'] / r['wall']:.2f}x" if base else "n/a"
                # a PyTorch trial starts from its own initialisation: no metric to compare
                reference = base["metrics"] if base and mode != "torch" else {}
                diffs = [abs(r["metrics"][k] - v) / max(abs(v), 1e-30)
                         for k, v in reference.items()] or [float("nan")]  # fmt: skip
                share = 100 * r["training"] / r["wall"]
                every = " / ".join(f"{x['wall']:.1f}" for x in rounds[mode])
                # each round against the `process` run of the same round (minutes apart,
                # so less of the machine's drift between them)
                paired = (
                    " / ".join(
                        f"{p['wall'] / x['wall']:.2f}x"
                        for p, x in zip(rounds.get("process", []), rounds[mode], strict=False)
                    )
                    or "n/a"
                )
                row = [mode, r["groups"], f"{r['wall']:.1f}", speedup, f"{share:.0f}%",
                       f"{np.median(diffs):.2g} / {max(diffs):.2g}", every, paired]  # fmt: skip
                print("| " + " | ".join(map(str, row)) + " |", flush=True)


if __name__ == "__main__":
    main()
