"""Reconstruction and probe accuracy against latent size, trained vs untrained vs PCA.

For every latent size an autoencoder (all options of `autoencoder`) is trained;
its encoder and the same network at initialisation are probed; PCA with the
same number of components gives the optimal linear reconstruction error and a
reference probe. `latent_study.png` draws the three against latent size.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiment.config import option
from experiment.errors import UsageError
from experiment.figures import pyplot
from experiment.run import Run
from tasks import autoencoder
from training.loop import fit, initial_model
from training.probe import pca_basis, pca_features, pca_reconstruction_mse

DEFAULT_SIZES = {"synthetic": (5, 20, 100, 200), "mnist": (8, 32, 64, 128)}


@dataclasses.dataclass(frozen=True)
class Config(autoencoder.Options):
    latent_sizes: tuple[int, ...] = option(
        (), "latent sizes to train (default: synthetic 5,20,100,200; mnist 8,32,64,128)"
    )

    def check(self) -> None:
        super().check()
        if any(k < 1 for k in self.latent_sizes):
            raise UsageError(
                f"--latent_sizes={','.join(map(str, self.latent_sizes))}: sizes must be >= 1"
            )

    def sizes(self) -> tuple[int, ...]:
        return self.latent_sizes or DEFAULT_SIZES[self.dataset]


def pca_reference(
    data: autoencoder.Data, k: int, cfg: Config, mean: np.ndarray, basis: np.ndarray
) -> dict[str, float]:
    """PCA with k components (of the training set's `pca_basis`): its reconstruction
    error and the probe on its projections."""
    k = min(k, basis.shape[0])
    probe = autoencoder.probe_features(
        cfg,
        data,
        pca_features(data.x_train, mean, basis, k),
        pca_features(data.x_test, mean, basis, k),
    )
    return {
        "recon_mse": pca_reconstruction_mse(data.x_test, mean, basis, k),
        "probe_accuracy": probe.test_accuracy,
    }


def run(cfg: Config, run: Run) -> dict:
    data = autoencoder.load_data(cfg)
    print(f"data: {data.source}; latent sizes {', '.join(map(str, cfg.sizes()))}")
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(autoencoder.Options)}
    rows = {}
    mean, basis, _ = pca_basis(data.x_train)  # one basis for every size
    for k in cfg.sizes():
        ae_cfg = autoencoder.Config(**options, latent_dim=k)
        problem = autoencoder.make_problem(ae_cfg, data)
        train_cfg = autoencoder.training_config(ae_cfg, len(data.x_train))
        result = fit(train_cfg, problem, run, desc=f"latent {k}", model=f"latent_{k}")
        trained = autoencoder.evaluate_replicas(ae_cfg, result, data)
        initial = initial_model(problem, train_cfg)
        rows[k] = {
            "trained": {key: float(np.mean(v)) for key, v in trained.items()},
            "untrained": autoencoder.probe_model(ae_cfg, initial, data),
            "pca": pca_reference(data, k, cfg, mean, basis),
        }
        print(
            f"latent {k:4d}: probe {rows[k]['trained']['probe_accuracy']:.4f} "
            f"(untrained {rows[k]['untrained']['probe_accuracy']:.4f}, "
            f"PCA {rows[k]['pca']['probe_accuracy']:.4f}); "
            f"recon {rows[k]['trained']['recon_mse']:.5f} (PCA {rows[k]['pca']['recon_mse']:.5f})"
        )
    plot_study(cfg, run, rows)
    summary = {}
    for k, row in rows.items():
        for source in ("trained", "untrained", "pca"):
            suffix = "" if source == "trained" else f"_{source}"
            summary[f"latent_{k}_recon_mse{suffix}"] = row[source]["recon_mse"]
            summary[f"latent_{k}_probe_accuracy{suffix}"] = row[source]["probe_accuracy"]
    return summary


def plot_study(cfg: Config, run: Run, rows: dict) -> None:
    plt = pyplot()

    sizes = list(rows)
    fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(11, 3.8))
    styles = {"trained": ("o-", "C0"), "untrained": ("s--", "C1"), "pca": ("^:", "k")}
    names = {
        "trained": "trained encoder",
        "untrained": "untrained encoder",
        "pca": "PCA (optimal linear)",
    }
    for source, (style, color) in styles.items():
        for ax, metric in ((ax_r, "recon_mse"), (ax_p, "probe_accuracy")):
            values = [rows[k][source][metric] for k in sizes]
            ax.plot(sizes, values, style, color=color, label=names[source])
    for ax in (ax_r, ax_p):
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(k) for k in sizes])
        ax.set_xlabel("latent size")
    ax_r.set_yscale("log")
    ax_r.set_ylabel("test reconstruction MSE")
    ax_p.set_ylabel("linear-probe test accuracy")
    ax_p.legend(fontsize=8)
    fig.suptitle(f"{cfg.kind} {cfg.activation} autoencoder on {cfg.dataset}")
    run.save_figure(fig, "latent_study")
