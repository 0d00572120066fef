"""A synthetic 100-d dataset whose labels live in a 20-d subspace.

x = Q [h; e] with h ~ N(0, I_20) informative coordinates, e ~ N(0, 0.1^2 I_80)
nuisance coordinates and Q a fixed random orthogonal 100x100 matrix. The label
is argmax over 10 classes of h A (A: 20x10 Gaussian, unit-norm columns); draws
whose two best class scores differ by less than 0.05 are rejected, so the
labels are cleanly linearly decodable from h. Q and A come from `param_seed`;
train and test points from their own seeds.

Consequences (checked in tests/test_data.py): the covariance of x has 20
eigenvalues near 1 and 80 near 0.01; a linear probe on x or on the top-20
principal components is near-perfect, while 5 components carry too little of
h to name the class.
"""

from __future__ import annotations

import numpy as np

DIM, INFORMATIVE, CLASSES = 100, 20, 10
NUISANCE_STD, MARGIN = 0.1, 0.05


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def mixing_parameters(param_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q (100, 100) orthogonal, A (20, 10) with unit-norm columns)."""
    rng = np.random.default_rng([param_seed, 0])
    q = random_orthogonal(DIM, rng)
    a = rng.standard_normal((INFORMATIVE, CLASSES))
    return q, a / np.linalg.norm(a, axis=0, keepdims=True)


def sample(num: int, seed: int, param_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x (num, 100) float32, y (num,) int32), drawn with rejection of ambiguous labels."""
    q, a = mixing_parameters(param_seed)
    rng = np.random.default_rng([param_seed, 1, seed])
    xs, ys, have = [], [], 0
    while have < num:
        batch = 2 * (num - have) + 64
        h = rng.standard_normal((batch, INFORMATIVE))
        e = NUISANCE_STD * rng.standard_normal((batch, DIM - INFORMATIVE))
        scores = h @ a
        top2 = np.sort(scores, axis=1)[:, -2:]
        keep = top2[:, 1] - top2[:, 0] >= MARGIN
        xs.append(np.concatenate([h, e], axis=1)[keep] @ q.T)
        ys.append(np.argmax(scores[keep], axis=1))
        have += int(keep.sum())
    x = np.concatenate(xs)[:num].astype(np.float32)
    y = np.concatenate(ys)[:num].astype(np.int32)
    return x, y


def make_synthetic(
    num_train: int = 10_000, num_test: int = 2_000, param_seed: int = 0, seed: int = 0
) -> dict[str, np.ndarray]:
    """{'x_train', 'y_train', 'x_test', 'y_test'}: train and test from separate seeds."""
    x_train, y_train = sample(num_train, seed=2 * seed, param_seed=param_seed)
    x_test, y_test = sample(num_test, seed=2 * seed + 1, param_seed=param_seed)
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
