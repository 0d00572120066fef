"""Linear probing: softmax regression on frozen features, fitted to convergence.

The probe minimises mean cross-entropy + l2 * ||W||_F^2 over the whole training
set with optax's L-BFGS (a convex problem: full batch, jitted, inside one
`lax.while_loop` that stops at a number of iterations or once the gradient's norm
is below GRAD_TOL, whichever comes first). Without a given l2, it is chosen from
L2_GRID by accuracy on a held-out 10% of the training set (all candidates are
fitted by the same compiled program), then the probe is refitted on the whole
training set. Features can be standardised with the
training set's mean and standard deviation; that is off by default because it
can hurt (raw MNIST pixels: standardising amplifies near-constant border
pixels).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from training.compile_options import rarely_run

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2)
# A fit stops once its gradient's norm is below this: run on to 100 iterations, the
# float32 fits measured changed their loss by at most 1.4e-6 and no prediction
# (BENCHMARKS.md, "The probe stops once converged").
GRAD_TOL = 1e-5
VALIDATION_FRACTION, VALIDATION_SEED = 0.1, 0


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    train_accuracy: float
    test_accuracy: float
    train_loss: float
    l2: float


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale features by the training set's statistics (constant features stay 0)."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _fit_softmax(
    features, labels, weights, l2, num_classes: int, iterations: int, grad_tol=GRAD_TOL
):
    """Weights, bias, loss and iterations run of the weighted mean CE + l2 ||W||^2
    minimised by L-BFGS: at most `iterations`, fewer once the gradient's norm is below
    grad_tol (converged: see GRAD_TOL for what running on changed).

    Row weights let validation rows sit out of a fit without changing array shapes
    (so selection and the final fit share one compiled program).
    """
    params = {
        "w": jnp.zeros((features.shape[1], num_classes), features.dtype),
        "b": jnp.zeros((num_classes,), features.dtype),
    }

    def objective(p):
        logits = features @ p["w"] + p["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        ce = jnp.sum(ce * weights) / jnp.sum(weights)
        return ce + l2 * jnp.sum(p["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(p, updates), state

    def unfinished(carry):
        # the line search leaves the value and gradient at the new point in the state
        _, state = carry
        count = otu.tree_get(state, "count")
        converged = otu.tree_norm(otu.tree_get(state, "grad")) < grad_tol
        return (count == 0) | ((count < iterations) & ~converged)

    params, state = jax.lax.while_loop(unfinished, step, (params, opt.init(params)))
    return params, otu.tree_get(state, "value"), otu.tree_get(state, "count")


@functools.cache
def _fit_program():
    """_fit_softmax, jitted (num_classes and iterations static) as a rarely run program
    (training.compile_options): a probe's few fits share it."""
    return jax.jit(_fit_softmax, static_argnums=(4, 5), compiler_options=rarely_run())


def predict(params, features) -> jax.Array:
    """The class a fitted probe gives each row of features."""
    return jnp.argmax(features @ params["w"] + params["b"], axis=-1)


def _accuracy(params, features, labels) -> jax.Array:
    return jnp.mean(predict(params, features) == labels, axis=-1)


def select_l2(features: np.ndarray, labels: np.ndarray, num_classes: int, iterations: int) -> float:
    """The L2_GRID value with the best accuracy on a held-out part of the training set."""
    order = np.random.default_rng(VALIDATION_SEED).permutation(len(features))
    held_out = order[: max(1, int(len(order) * VALIDATION_FRACTION))]
    weights = np.ones(len(features), np.float32)
    weights[held_out] = 0.0
    x, y = jnp.asarray(features), jnp.asarray(labels)
    accuracy = []
    for l2 in L2_GRID:  # one compiled program: l2 is a traced argument
        params, _, _ = _fit_program()(
            x, y, jnp.asarray(weights), jnp.float32(l2), num_classes, iterations
        )
        accuracy.append(float(_accuracy(params, x[held_out], y[held_out])))
    return float(L2_GRID[int(np.argmax(accuracy))])  # ties go to the smallest l2


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    l2: float | None = None,
    standardize_features: bool = False,
    iterations: int = 100,
) -> ProbeResult:
    """Fit a softmax-regression probe on the training features; accuracies on both sets.

    l2=None selects the penalty on a validation split of the training features.
    """
    train_features = np.asarray(train_features, np.float32)
    test_features = np.asarray(test_features, np.float32)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if standardize_features:
        train_features, test_features = standardize(train_features, test_features)
    if l2 is None:
        l2 = select_l2(train_features, train_labels, num_classes, iterations)
    weights = jnp.ones(len(train_features), jnp.float32)
    params, loss, _ = _fit_program()(
        jnp.asarray(train_features),
        jnp.asarray(train_labels),
        weights,
        jnp.float32(l2),
        num_classes,
        iterations,
    )
    return ProbeResult(
        train_accuracy=float(
            _accuracy(params, jnp.asarray(train_features), jnp.asarray(train_labels))
        ),
        test_accuracy=float(
            _accuracy(params, jnp.asarray(test_features), jnp.asarray(test_labels))
        ),
        train_loss=float(loss),
        l2=float(l2),
    )


def covariance(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance C = X^T X / n of the centred data, in float64)."""
    mean = x_train.mean(axis=0)
    centred = np.asarray(x_train - mean, np.float64)
    return mean, centred.T @ centred / len(centred)


def principal_axes(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(principal directions as rows (d, d), eigenvalues, descending) of a covariance.

    With n >> d rows the covariance's eigendecomposition is much cheaper than the SVD
    of the centred data (MNIST's 8,000 x 784: 0.12 against 0.95 s on the 2-core CPU),
    and in float64 its eigenvalues agree with the SVD's to about 1e-15 of the largest
    (tests/test_data.py). Rounding can leave a zero-variance direction's eigenvalue
    at -1e-17: they are clipped at 0."""
    eigenvalues, vectors = np.linalg.eigh(cov)  # ascending
    return vectors[:, ::-1].T, np.maximum(eigenvalues[::-1], 0.0)


def pca_basis(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, principal directions as rows (d, d), eigenvalues of the covariance,
    descending): `principal_axes` of the training set's `covariance`."""
    mean, cov = covariance(x_train)
    return mean, *principal_axes(cov)


def pca_features(x: np.ndarray, mean: np.ndarray, basis: np.ndarray, k: int) -> np.ndarray:
    """Projections on the top-k principal directions."""
    return ((x - mean) @ basis[:k].T).astype(np.float32)


def pca_reconstruction_mse(x: np.ndarray, mean: np.ndarray, basis: np.ndarray, k: int) -> float:
    """Per-coordinate MSE of the rank-k PCA reconstruction (the optimal linear AE)."""
    z = (x - mean) @ basis[:k].T
    return float(np.mean((z @ basis[:k] + mean - x) ** 2))
