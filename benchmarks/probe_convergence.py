"""The probe's early stop: iterations used, time, and what running to the cap changes.

    python benchmarks/probe_convergence.py [--iterations 100]

For features like those the study probes (PCA projections and random ReLU / tanh
encoders of the synthetic set; raw pixels and a random tanh encoder of MNIST when
../shared/data/mnist is there), every L2_GRID penalty is fitted twice by the same
program: stopping once the gradient norm is below GRAD_TOL (what the probe does) and
running all `--iterations` (a tolerance of 0). Printed per fit: iterations used, run
time of both, the relative loss difference and how many training-set predictions
differ. One process, one program per feature width; the numbers go in BENCHMARKS.md
("The probe stops once converged").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import mnist, synthetic
from training import probe
from training.probe import pca_basis, pca_features

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def feature_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    d = synthetic.make_synthetic()
    x, y = d["x_train"], d["y_train"]
    mean, basis, _ = pca_basis(x)
    sets = {f"synthetic PCA {k}": (pca_features(x, mean, basis, k), y) for k in (5, 20, 100)}
    proj = rng.normal(size=(100, 200)).astype(np.float32)
    sets["synthetic random tanh 200"] = (np.tanh(x @ proj / 10), y)
    sets["synthetic random ReLU 200"] = (np.maximum(x @ proj, 0), y)
    if MNIST_DIR.is_dir():
        m = mnist.load_idx_dir(MNIST_DIR)
        sets["MNIST pixels 784"] = (m.x_train, m.y_train)
        proj = rng.normal(size=(784, 32)).astype(np.float32)
        sets["MNIST random tanh 32"] = (np.tanh(m.x_train @ proj / 10), m.y_train)
    return sets


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()
    program = probe._fit_program()
    print(f"GRAD_TOL {probe.GRAD_TOL:g}, at most {args.iterations} iterations")
    print(
        f"{'features':28s} {'l2':>6s} {'iters':>5s} {'stop s':>7s} {'full s':>7s} "
        f"{'rel loss diff':>13s} {'preds differ':>12s}"
    )
    total_stop = total_full = 0.0
    for name, (x, y) in feature_sets().items():
        x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
        weights = jnp.ones(len(x), jnp.float32)
        classes = int(y.max()) + 1
        call = (x, y, weights)
        # compile both calls first (and wait for them: dispatch is asynchronous)
        timed(program, *call, jnp.float32(1e-3), classes, args.iterations)
        timed(program, *call, jnp.float32(1e-3), classes, args.iterations, grad_tol=0.0)
        for l2 in probe.L2_GRID:
            l2 = jnp.float32(l2)
            (p, loss, count), t_stop = timed(program, *call, l2, classes, args.iterations)
            (q, full_loss, _), t_full = timed(
                program, *call, l2, classes, args.iterations, grad_tol=0.0
            )
            differ = int(jnp.sum(probe.predict(p, x) != probe.predict(q, x)))
            rel = abs(float(loss) - float(full_loss)) / abs(float(full_loss))
            total_stop, total_full = total_stop + t_stop, total_full + t_full
            print(
                f"{name:28s} {float(l2):6.0e} {int(count):5d} {t_stop:7.3f} {t_full:7.3f} "
                f"{rel:13.1e} {differ:12d}"
            )
    print(
        f"all fits: {total_stop:.2f} s stopping once converged, {total_full:.2f} s to the cap "
        f"({total_full / total_stop:.2f}x)"
    )


if __name__ == "__main__":
    main()
