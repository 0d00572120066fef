"""The documented targets, at the documented default settings (slow: `make test-slow`)."""

import json

import pytest

pytestmark = pytest.mark.slow


def run(train_cli, workdir, *args):
    code, _, err = train_cli(*args, f"--workdir={workdir}")
    assert code == 0, err
    return json.loads((workdir / "summary.json").read_text())


@pytest.mark.parametrize("layers,target", [(1, 0.01), (2, 0.001)])
def test_running_average_rnn_reaches_its_target(train_cli, tmp_path, layers, target):
    s = run(train_cli, tmp_path, "--task=running_average", f"--num_layers={layers}")
    assert s["train_loss"] < target


def test_linear_autoencoder_finds_pca_and_the_weight_decay_optimum(train_cli, tmp_path):
    s = run(train_cli, tmp_path, "--task=linear_ae", "--lambda_grid=0.01,0.1")
    assert s["subspace_distance"] < 0.002 and s["recon_relative_gap"] < 5e-4
    assert (
        s["lambda_0.01_singular_value_gap"] < 0.005 and s["lambda_0.1_singular_value_gap"] < 0.005
    )


def test_synthetic_autoencoder_probe_targets(train_cli, tmp_path):
    s = run(train_cli, tmp_path, "--task=latent_study", "--latent_sizes=5,20,100")
    assert s["latent_20_probe_accuracy"] >= 0.96 and s["latent_100_probe_accuracy"] >= 0.98
    assert s["latent_5_probe_accuracy"] < 0.4
    untrained = [s[f"latent_{k}_probe_accuracy_untrained"] for k in (5, 20, 100)]
    assert untrained == sorted(untrained)
