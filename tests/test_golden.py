"""Pinned behaviour: one training step of a tiny config per task family, to the digit.

Loss, gradient norm and update norm after the first step with seed 0. A change of
initialisation, loss scaling, data order, corruption or optimizer order moves these
numbers; if the change is intended, rerun this file with RNNAE_PRINT_GOLDEN=1 and
update GOLDEN with what it prints (and say why in the commit).

Also: the jitted helpers compile once per shape (no retracing across calls).
"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training.loop import init_train_state, make_train_step
from training.optim import make_optimizer

GOLDEN = {
    "running_average_rnn": {
        "loss": 0.4757002294063568,
        "grad_norm": 1.369570255279541,
        "update_norm": 0.07416144013404846,
    },
    "running_average_lstm": {
        "loss": 0.5873324871063232,
        "grad_norm": 1.0920031070709229,
        "update_norm": 0.14106149971485138,
    },
    "autoencoder_masked": {
        "loss": 0.27679863572120667,
        "grad_norm": 0.1397673487663269,
        "update_norm": 0.03713152930140495,
    },
    "linear_ae_weight_decay": {
        "loss": 27.81936264038086,
        "grad_norm": 17.142194747924805,
        "update_norm": 0.18973438441753387,
    },
    "surnames_lstm": {
        "loss": 1.0184381008148193,
        "grad_norm": 0.7611499428749084,
        "update_norm": 0.24248024821281433,
    },
}


def names_dir(root):
    root.mkdir()
    for language in ("English", "Russian", "Polish"):
        names = "\n".join(f"{language[:3]}name{i}" for i in range(12))
        (root / f"{language}.txt").write_text(names + "\n")
    return root


def problem_of(family: str, tmp_path):
    """(config, Problem) of a tiny config of each task family."""
    if family.startswith("running_average"):
        from tasks import running_average as task

        cell = family.rsplit("_", 1)[1]
        cfg = task.Config(num_train=64, num_eval=16, batch_size=8, hidden_size=6, cell=cell)
        return cfg, task.make_problem(cfg)
    if family == "autoencoder_masked":
        from tasks import autoencoder as task

        cfg = task.Config(
            kind="masked", num_train=64, latent_dim=4, hidden_sizes=(8,), batch_size=8
        )
        return task.training_config(cfg, 64), task.make_problem(cfg, task.load_data(cfg))
    if family == "linear_ae_weight_decay":
        from data import datasets
        from tasks import linear_ae as task

        cfg = task.Config(weight_decay=0.01, num_train=64, batch_size=8)
        data = datasets.load(cfg.dataset, mnist_dir=None, data_dir=None, num_train=64,
                             data_seed=cfg.data_seed)  # fmt: skip
        spec = task.spectrum(data.x_train)
        return cfg, task.make_problem(cfg, data.x_train - spec.mean, spec)
    if family == "surnames_lstm":
        from tasks import surnames as task

        cfg = task.Config(data_dir=str(names_dir(tmp_path / "names")), batch_size=8, hidden_size=8)
        return cfg, task.make_problem(cfg, task.prepare(cfg))
    raise AssertionError(family)


def one_step(cfg, problem) -> dict[str, float]:
    tx = make_optimizer(cfg)
    graphdef, state = init_train_state(problem, tx, cfg)
    step = jax.jit(make_train_step(graphdef, problem, tx))
    n = jax.tree.leaves(problem.train_data)[0].shape[0]
    _, metrics = step(state, problem.train_data, jnp.arange(min(cfg.batch_size, n)))
    return {k: float(metrics[k]) for k in ("loss", "grad_norm", "update_norm")}


@pytest.mark.parametrize("family", list(GOLDEN))
def test_one_step_matches_the_pinned_numbers(family, tmp_path):
    got = one_step(*problem_of(family, tmp_path))
    if os.environ.get("RNNAE_PRINT_GOLDEN"):
        print(f'\n    "{family}": {got},')
    expected = GOLDEN[family]
    assert expected is not None, f"no pinned numbers for {family}: {got}"
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=2e-5, err_msg=f"{family} {key}")


def test_the_train_chunk_compiles_once_for_calls_of_the_same_shape():
    from tasks import running_average as task
    from training.loop import make_chunk

    cfg = task.Config(num_train=64, num_eval=16, batch_size=8, hidden_size=6)
    problem = task.make_problem(cfg)
    tx = make_optimizer(cfg)
    graphdef, state = init_train_state(problem, tx, cfg)
    traced = chex.assert_max_traces(make_train_step(graphdef, problem, tx), n=1)
    chunk = make_chunk(traced, replicated=False)
    data = jax.device_put(problem.train_data)
    for start in range(0, 32, 8):  # four calls, new batch indices, same shapes
        state, _ = chunk(state, data, np.arange(start, start + 8).reshape(2, 4) % 64)


def compilations(caplog, fn) -> int:
    """How many XLA compilations `fn()` triggers (JAX logs each one under log_compiles)."""
    import logging

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
        fn()
    return sum("Compiling" in r.getMessage() for r in caplog.records)


def test_module_level_jitted_helpers_compile_once(tmp_path, caplog):
    from flax import nnx

    from tasks import autoencoder, surnames

    cfg = autoencoder.Config(num_train=64, latent_dim=4, hidden_sizes=(8,), batch_size=8)
    model = autoencoder.make_problem(cfg, autoencoder.load_data(cfg)).make_model(nnx.Rngs(0))
    x = np.zeros((5, 100), np.float32)
    assert compilations(caplog, lambda: autoencoder.encode(model, x)) >= 1  # the first call
    assert compilations(caplog, lambda: [autoencoder.encode(model, x + i) for i in range(3)]) == 0

    s_cfg = surnames.Config(data_dir=str(names_dir(tmp_path / "names")), hidden_size=8)
    prepared = surnames.prepare(s_cfg)
    s_model = surnames.make_problem(s_cfg, prepared).make_model(nnx.Rngs(0))
    split = prepared.splits["test"]
    assert compilations(caplog, lambda: surnames.predict_logits(s_model, split)) >= 1
    assert (
        compilations(caplog, lambda: [surnames.predict_logits(s_model, split) for _ in range(3)])
        == 0
    )
