"""Autoencoders: corruptions, training, probing from checkpoints, latent study, bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.autoencoders import Autoencoder, add_noise, apply_mask, random_mask
from tasks import autoencoder
from tests.conftest import TINY_ARGS


def fast(steps: int = 150) -> list[str]:
    """The shared tiny autoencoder configuration, trained for `steps`."""
    return [f"--steps={steps}", *TINY_ARGS["autoencoder"]]


def test_noise_has_the_requested_scale():
    x = jnp.zeros((2000, 100))
    noisy = add_noise(jax.random.key(0), x, 0.3)
    assert abs(float(noisy.std()) - 0.3) < 0.005 and abs(float(noisy.mean())) < 0.005


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
def test_mask_hides_the_ratio_on_average_and_differs_per_example(ratio):
    hidden = np.asarray(random_mask(jax.random.key(1), 512, 784, ratio))
    assert abs(hidden.mean() - ratio) < 0.005
    per_example = hidden.mean(axis=1)
    assert np.all(np.abs(per_example - ratio) < 0.1)  # binomial spread: std <= 0.018
    assert ratio == 0 or not np.all(hidden[0] == hidden[1])


def test_patch_mask_hides_whole_patches():
    hidden = np.asarray(
        random_mask(jax.random.key(2), 8, 784, 0.5, patch_size=7, image_shape=(28, 28))
    )
    images = hidden.reshape(8, 4, 7, 4, 7)
    per_patch = images.mean(axis=(2, 4))
    assert set(np.unique(per_patch)) == {0.0, 1.0}  # every patch wholly hidden or wholly kept


def test_mask_fills():
    x = jnp.ones((1, 4)) * 2.0
    hidden = jnp.array([[True, False, True, False]])
    np.testing.assert_allclose(apply_mask(x, hidden, "zero", 0.5), [[0, 2, 0, 2]])
    np.testing.assert_allclose(apply_mask(x, hidden, "scaled", 0.5), [[0, 4, 0, 4]])
    np.testing.assert_allclose(
        apply_mask(x, hidden, "token", 0.5, jnp.array([9.0, 8, 7, 6])), [[9, 2, 7, 2]]
    )


@pytest.mark.parametrize("kind", ["denoising", "masked"])
def test_corrupted_inputs_but_clean_targets(kind):
    cfg = autoencoder.Config(
        kind=kind, noise_std=0.5, mask_fill="zero", hidden_sizes=(8,), latent_dim=3
    )
    data = autoencoder.Data(*[np.zeros((4, 10), np.float32), np.zeros(4, np.int32)] * 2, source="t",
                            image_shape=None)  # fmt: skip
    data.x_train = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32)
    problem = autoencoder.make_problem(cfg, data)
    model = problem.make_model(nnx.Rngs(0))
    x, key = jnp.asarray(data.x_train), jax.random.key(3)
    loss, _ = problem.loss_fn(model, {"x": x}, key, problem.hparams)
    corrupted, _ = autoencoder.corrupt(cfg, model, x, key, None)
    assert not np.allclose(corrupted, x)
    np.testing.assert_allclose(loss, jnp.mean((model(corrupted) - x) ** 2), rtol=1e-6)


@pytest.mark.parametrize("kind", ["vanilla", "denoising", "masked"])
def test_each_kind_trains_and_improves_reconstruction(train_cli, tmp_path, kind):
    code, _, err = train_cli(
        "--task=autoencoder", f"--kind={kind}", *fast(), f"--workdir={tmp_path}"
    )
    assert code == 0, err
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["recon_mse"] < 0.5 * s["recon_mse_untrained"]
    assert 0.1 <= s["probe_accuracy"] <= 1 and 0.1 <= s["probe_accuracy_untrained"] <= 1
    assert (tmp_path / "recon_curve.png").exists()


def test_probe_from_checkpoint_equals_probe_at_end_of_training(train_cli, tmp_path):
    run_dir, probe_dir = tmp_path / "ae", tmp_path / "probe"
    assert (
        train_cli("--task=autoencoder", *fast(), "--probe_l2=1e-4", f"--workdir={run_dir}")[0] == 0
    )
    code, _, err = train_cli(
        "--task=linear_probe",
        f"--checkpoint={run_dir}",
        "--probe_l2=1e-4",
        "--probe_iterations=30",
        f"--workdir={probe_dir}",
    )
    assert code == 0, err
    trained = json.loads((run_dir / "summary.json").read_text())
    probed = json.loads((probe_dir / "summary.json").read_text())
    assert probed["checkpoint_step"] == 150
    for key in ("probe_accuracy", "probe_train_accuracy", "recon_mse"):
        assert probed[key] == pytest.approx(trained[key], rel=1e-6), key


def test_linear_probe_bad_checkpoints_exit_2(train_cli, tmp_path):
    code, _, err = train_cli(
        "--task=linear_probe", f"--checkpoint={tmp_path / 'nope'}", f"--workdir={tmp_path / 'a'}"
    )
    assert code == 2 and "no such directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = train_cli(
        "--task=linear_probe", f"--checkpoint={tmp_path / 'empty'}", f"--workdir={tmp_path / 'b'}"
    )
    assert code == 2 and "no complete checkpoint" in err
    code, _, err = train_cli("--task=linear_probe", f"--workdir={tmp_path / 'c'}")
    assert code == 2 and "--checkpoint is required" in err

    run_dir = tmp_path / "ra"
    assert (
        train_cli(
            "--task=running_average",
            "--steps=2",
            "--num_train=64",
            "--batch_size=8",
            f"--workdir={run_dir}",
        )[0]
        == 0
    )
    code, _, err = train_cli(
        "--task=linear_probe", f"--checkpoint={run_dir}", f"--workdir={tmp_path / 'd'}"
    )
    assert code == 2 and "holds a 'running_average' run" in err

    ae_dir = tmp_path / "ae"
    assert train_cli("--task=autoencoder", *fast(5), f"--workdir={ae_dir}")[0] == 0
    config_file = ae_dir / "checkpoints" / "5" / "config" / "metadata"
    saved = json.loads(config_file.read_text())
    saved["config"]["latent_dim"] = 7  # a config that does not match the saved parameters
    config_file.write_text(json.dumps(saved))
    code, _, err = train_cli(
        "--task=linear_probe", f"--checkpoint={ae_dir}", f"--workdir={tmp_path / 'e'}"
    )
    assert code == 2 and "do not match" in err

    shutil.rmtree(ae_dir / "checkpoints" / "5" / "params")  # a partial checkpoint
    code, _, err = train_cli(
        "--task=linear_probe", f"--checkpoint={ae_dir}", f"--workdir={tmp_path / 'f'}"
    )
    assert code == 2 and "Traceback" not in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--latent_dim=0"], "--latent_dim=0: must be >= 1"),
        (["--mask_ratio=1"], "--mask_ratio=1.0: must be < 1"),
        (["--mask_ratio=-0.1"], "must be >= 0"),
        (["--dataset=cifar"], "choose one of synthetic, mnist"),
        (["--steps=10"], "give one (--epochs=0 to use --steps)"),
        (["--steps=2000"], "give one"),  # the old sentinel value is no escape
        (["--epochs=0"], "--epochs=0 needs --steps=N"),
        (["--patch_size=4"], "--patch_size needs image data"),
        (["--dataset=mnist", "--patch_size=5"], "must divide 28"),
        (["--dataset=mnist", "--mnist_dir=/nonexistent"], "not a directory"),
    ],
)
def test_bad_autoencoder_input_exits_2(train_cli, tmp_path, args, message):
    code, _, err = train_cli("--task=autoencoder", *args, f"--workdir={tmp_path}")
    assert code == 2 and message in err, err


def test_configs_saved_before_steps_became_optional_still_load():
    from experiment.config import to_dict

    old = to_dict(autoencoder.Config(epochs=0, steps=7))
    old.update(epochs=50, steps=2000)  # what such a run recorded: epochs and the unused default
    cfg = autoencoder.config_from_saved(old)
    assert cfg.epochs == 50 and cfg.steps is None
    assert autoencoder.config_from_saved(to_dict(autoencoder.Config(epochs=0, steps=7))).steps == 7


@pytest.mark.parametrize("num_seeds", [1, 3])
def test_the_untrained_baseline_is_the_network_that_training_starts_from(num_seeds):
    """initial_model: seed 5's network, drawn by training's own init program (one seed
    or the vmapped several); the eager draw for that seed is the independent reference."""
    from training.loop import initial_model

    cfg = autoencoder.Config(
        seed=5, num_seeds=num_seeds, num_train=200, num_test=50, hidden_sizes=(16,), latent_dim=3
    )
    data = autoencoder.load_data(cfg)
    problem = autoencoder.make_problem(cfg, data)
    model = initial_model(problem, autoencoder.training_config(cfg, len(data.x_train)))
    drawn = problem.make_model(nnx.Rngs(jax.random.key(5)))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    reference = jax.tree.leaves(nnx.state(drawn, nnx.Param))
    assert [a.shape for a in leaves] == [b.shape for b in reference]
    for a, b in zip(leaves, reference, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # seed 6 (replica 1) is another network: the one returned is replica 0's
    other = problem.make_model(nnx.Rngs(jax.random.key(6)))
    assert not np.allclose(leaves[0], jax.tree.leaves(nnx.state(other, nnx.Param))[0])


def test_latent_study_draws_trained_untrained_and_pca(train_cli, tmp_path):
    code, _, err = train_cli(
        "--task=latent_study", "--latent_sizes=2,8", *fast(60), f"--workdir={tmp_path}"
    )
    assert code == 0, err
    s = json.loads((tmp_path / "summary.json").read_text())
    for k in (2, 8):
        for suffix in ("", "_untrained", "_pca"):
            assert (
                f"latent_{k}_probe_accuracy{suffix}" in s and f"latent_{k}_recon_mse{suffix}" in s
            )
    assert s["latent_8_recon_mse_pca"] < s["latent_2_recon_mse_pca"]
    assert (tmp_path / "latent_study.png").stat().st_size > 10_000


def test_mnist_autoencoder_on_the_real_files(train_cli, tmp_path, mnist_dir):
    code, out, err = train_cli(
        "--task=autoencoder",
        "--dataset=mnist",
        f"--mnist_dir={mnist_dir}",
        "--kind=masked",
        "--patch_size=7",
        "--epochs=1",
        "--latent_dim=16",
        "--probe_iterations=20",
        f"--workdir={tmp_path}",
    )
    assert code == 0, err
    assert "split in file order: first 8,000 train / last 2,000 test" in out
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["mnist_split_from_test_set"] == 1
    assert s["recon_mse"] < s["recon_mse_untrained"] and s["probe_accuracy"] > 0.5
    assert (tmp_path / "reconstructions.png").stat().st_size > 10_000


def test_autoencoder_model_shapes():
    model = Autoencoder(784, (256, 64), 16, sigmoid_output=True, rngs=nnx.Rngs(0))
    x = jnp.ones((3, 784))
    assert model.encode(x).shape == (3, 16)
    out = model(x)
    assert out.shape == (3, 784) and float(out.min()) >= 0 and float(out.max()) <= 1
