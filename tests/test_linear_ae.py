"""Linear autoencoder: closed-form gradients, PCA optimum, weight-decay optimum, exact penalty."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tasks import linear_ae
from training.loop import init_train_state, make_train_step
from training.optim import make_optimizer


def small_problem(dim=8, n=400, seed=0):
    """Centred data with distinct, well-separated variances along a random basis."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(2.0, 0.3, dim)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    x = (rng.normal(size=(n, dim)) * scales) @ q.T
    return x - x.mean(axis=0)


def test_closed_form_gradients_equal_autodiff():
    x = small_problem()
    c = x.T @ x / len(x)
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(3, 8)), rng.normal(size=(8, 3))
    with jax.enable_x64(True):

        def objective(w1, w2):
            return jnp.mean(jnp.sum((x @ w1.T @ w2.T - x) ** 2, axis=1))

        g1, g2 = jax.grad(objective, argnums=(0, 1))(jnp.asarray(w1), jnp.asarray(w2))
        value = float(objective(jnp.asarray(w1), jnp.asarray(w2)))
    c1, c2 = linear_ae.closed_form_gradients(w1, w2, c)
    np.testing.assert_allclose(g1, c1, rtol=1e-10)
    np.testing.assert_allclose(g2, c2, rtol=1e-10)
    np.testing.assert_allclose(linear_ae.objective_data_term(w1, w2, c), value, rtol=1e-10)


def test_top_principal_directions_satisfy_the_first_order_conditions():
    x = small_problem()
    spec = linear_ae.spectrum(x)
    u_k = spec.basis[:3].T
    g1, g2 = linear_ae.closed_form_gradients(u_k.T, u_k, spec.covariance)
    assert np.linalg.norm(g1) < 1e-12 and np.linalg.norm(g2) < 1e-12
    assert linear_ae.objective_data_term(u_k.T, u_k, spec.covariance) == pytest.approx(
        spec.eigenvalues[3:].sum()
    )
    assert linear_ae.subspace_distance(u_k @ np.diag([2.0, 0.5, 1.0]), u_k) < 1e-12


def train_small(run_dir, train_cli, *args):
    """A short run on 2,000 synthetic points (k = 20: the eigengap is 0.93 vs 0.01)."""
    code, _, err = train_cli(
        "--task=linear_ae",
        "--latent_dim=20",
        "--num_train=2000",
        "--eval_every=250",
        f"--workdir={run_dir}",
        *args,
    )
    assert code == 0, err
    return json.loads((run_dir / "summary.json").read_text())


def test_sgd_reaches_the_pca_subspace(train_cli, tmp_path):
    s = train_small(tmp_path, train_cli, "--optimizer=sgd", "--learning_rate=0.02", "--steps=3000")
    assert s["subspace_distance"] < 0.02
    assert s["recon_relative_gap"] < 1e-3
    assert s["pca_grad_norm_W1"] < 1e-10 and s["pca_grad_norm_W2"] < 1e-10
    assert (tmp_path / "training.png").exists() and (tmp_path / "singular_values.png").exists()


def test_regularised_optimum_matches_the_closed_form(train_cli, tmp_path):
    s = train_small(
        tmp_path, train_cli, "--weight_decay=0.1", "--steps=4000", "--learning_rate=0.01"
    )
    assert s["singular_value_gap"] < 0.01
    assert s["w1_w2T_distance"] < 0.01
    assert s["recon_mse"] == pytest.approx(s["predicted_recon_mse"], rel=2e-3)
    assert s["orthonormality_error"] > 0.01  # shrunk below 1: not orthonormal, as predicted


def test_weight_decay_is_applied_exactly_once():
    cfg = linear_ae.Config(
        optimizer="sgd",
        momentum=0.0,
        learning_rate=0.05,
        weight_decay=0.3,
        lr_schedule="constant",
        latent_dim=3,
        batch_size=16,
    )
    x = small_problem(n=64).astype(np.float32)
    problem = linear_ae.make_problem(cfg, x, linear_ae.spectrum(x))
    tx = make_optimizer(cfg)
    graphdef, state = init_train_state(problem, tx, cfg)
    idx = jnp.arange(16)
    new_state, _ = jax.jit(make_train_step(graphdef, problem, tx))(state, problem.train_data, idx)
    model = nnx.merge(graphdef, state.params)
    w1, w2 = np.asarray(model.w1[...], np.float64), np.asarray(model.w2[...], np.float64)
    batch = x[:16].astype(np.float64)
    c = batch.T @ batch / 16
    g1, g2 = linear_ae.closed_form_gradients(w1, w2, c)
    expected_w1 = w1 - 0.05 * (g1 + 2 * 0.3 * w1)
    expected_w2 = w2 - 0.05 * (g2 + 2 * 0.3 * w2)
    updated = nnx.merge(graphdef, new_state.params)
    np.testing.assert_allclose(updated.w1[...], expected_w1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updated.w2[...], expected_w2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--latent_dim=100"], "--latent_dim=100: must be smaller than the data dimension (100)"),
        (["--latent_dim=0"], "--latent_dim=0: must be >= 1"),
        (["--weight_decay=-0.1"], "--weight_decay=-0.1: must be >= 0"),
        (["--lambda_grid=0.1,-1"], "weight decays must be >= 0"),
    ],
)
def test_bad_input_exits_2(train_cli, tmp_path, args, message):
    code, _, err = train_cli("--task=linear_ae", *args, f"--workdir={tmp_path}")
    assert code == 2 and message in err, err


def test_diverging_learning_rate_fails_with_the_summed_objective_hint(train_cli, tmp_path):
    code, _, err = train_cli(
        "--task=linear_ae",
        "--optimizer=sgd",
        "--learning_rate=5",
        "--steps=200",
        "--lr_schedule=constant",
        f"--workdir={tmp_path}",
    )
    assert code == 1
    assert "non-finite loss" in err and "sums the squared error over all coordinates" in err


def test_runs_with_the_same_data_share_one_read_only_load():
    """A study's trials in one worker load and decompose the data once; the shared arrays
    cannot be changed in place by one run under another."""
    cfg = linear_ae.Config(num_train=300)
    x, spec = linear_ae.load_centred(cfg)
    again, spec_again = linear_ae.load_centred(linear_ae.Config(num_train=300, weight_decay=0.1))
    assert again is x and spec_again is spec
    for array in (x, spec.mean, spec.basis, spec.eigenvalues, spec.covariance):
        with pytest.raises(ValueError, match="read-only"):
            array[...] = 0
    other, _ = linear_ae.load_centred(linear_ae.Config(num_train=300, data_seed=1))
    assert other is not x and not np.array_equal(other, x)
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-6)  # centred


def test_a_changed_data_file_is_not_served_from_the_shared_load(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"first")
    before = linear_ae.files_state(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"second copy")
    assert linear_ae.files_state(str(tmp_path)) != before  # a new cache key: loaded anew
    assert linear_ae.files_state(str(tmp_path / "missing")) == ()
    assert linear_ae.files_state(None) == ()


GRID_RUN = ("--task=linear_ae", "--num_train=500", "--steps=60", "--eval_every=20",
            "--weight_decay=0.001", "--lambda_grid=0.01,0.1,0.01")  # fmt: skip
# what a model's summary says about its training's cost, not its result
COST_KEYS = ("train_seconds", "compile_seconds", "steps_per_second", "compilations")


def model_results(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.endswith(COST_KEYS)}


def test_a_lambda_grid_trains_packed_and_equals_its_models_trained_alone(
    train_cli, tmp_path, monkeypatch
):
    """The run's models whose optimizers match (every weight decay > 0 here: the run's
    own and the grid's, 0.01 given twice is one model) train as replicas of one program;
    each model's checkpoints are where its own fit writes them, its summary equal to
    the same model trained alone."""
    from training import packing

    packed_groups = []
    real_fit_packed = packing.fit_packed

    def recording(members, **kwargs):
        packed_groups.append([m.model for m in members])
        return real_fit_packed(members, **kwargs)

    monkeypatch.setattr(packing, "fit_packed", recording)
    code, _, err = train_cli(*GRID_RUN, f"--workdir={tmp_path / 'packed'}")
    assert code == 0, err
    assert packed_groups == [[None, "lambda_0.01", "lambda_0.1"]]
    for model in ("lambda_0.01", "lambda_0.1"):
        assert (tmp_path / "packed" / "checkpoints" / model / "60").is_dir()
    packed = json.loads((tmp_path / "packed" / "summary.json").read_text())

    monkeypatch.setattr(linear_ae, "fit_models_packed", lambda run, models: None)
    code, _, err = train_cli(*GRID_RUN, f"--workdir={tmp_path / 'alone'}")
    assert code == 0, err
    alone = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert len(packed_groups) == 1  # the second run trained each model on its own
    assert model_results(packed).keys() == model_results(alone).keys()
    for key, value in model_results(alone).items():
        np.testing.assert_allclose(packed[key], value, rtol=1e-4, atol=1e-7, err_msg=key)


def test_a_rerun_of_a_packed_lambda_grid_trains_nothing(train_cli, tmp_path):
    code, _, err = train_cli(*GRID_RUN, f"--workdir={tmp_path}")
    assert code == 0, err
    first = (tmp_path / "summary.json").read_text()
    checkpoints = sorted(p.relative_to(tmp_path) for p in (tmp_path / "checkpoints").rglob("*"))
    code, _, err = train_cli(*GRID_RUN, f"--workdir={tmp_path}")
    assert code == 0, err
    assert (tmp_path / "summary.json").read_text() == first  # the same numbers, timings too
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "checkpoints").rglob("*")) == (
        checkpoints
    )


def test_a_diverging_lambda_fails_the_run_while_its_packed_neighbours_finish(train_cli, tmp_path):
    """Weight decay 1e30 overflows Adam's second moment (every step's guard passes; the
    host check before a checkpoint catches it): that model stops, the others train on,
    and its own fit then fails the run as it would have alone."""
    code, out, err = train_cli(
        "--task=linear_ae", "--num_train=500", "--steps=60", "--eval_every=20",
        "--lambda_grid=0.01,1e30", f"--workdir={tmp_path}",
    )  # fmt: skip
    assert code == 1
    assert "lambda_1e+30's parameters or optimizer state are non-finite" in out
    assert "non-finite parameters or optimizer state" in err
    assert (tmp_path / "checkpoints" / "lambda_0.01" / "60").is_dir()
    assert not (tmp_path / "checkpoints" / "lambda_1e+30" / "60").exists()
    assert not (tmp_path / "summary.json").exists()
