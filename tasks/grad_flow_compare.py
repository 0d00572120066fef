"""tanh vs ReLU vs identity RNNs vs LSTM (vs a residual RNN), on one figure.

Every variant shares the options of `grad_flow` (size, sequence length,
spectral radius, initialisation, optional training) and is measured twice: with
the loss on the last target only and with the loss on every step. The figure
`grad_flow_compare.png` shows ||dL/dh_t|| against t for both losses (the LSTM
also with ||dL/dC_t||) and the hidden-state magnitudes.
"""

from __future__ import annotations

import dataclasses

from experiment.config import option
from experiment.errors import RunFailed, UsageError
from experiment.figures import pyplot
from experiment.run import Run
from tasks import grad_flow

VARIANTS = {
    "tanh": dict(cell="rnn", activation="tanh"),
    "relu": dict(cell="rnn", activation="relu"),
    "identity": dict(cell="rnn", activation="identity"),
    "residual": dict(cell="rnn", activation="tanh", residual=True),
    "lstm": dict(cell="lstm"),
}
LABELS = {
    "tanh": "RNN tanh",
    "relu": "RNN relu",
    "identity": "RNN identity",
    "residual": "RNN tanh + residual",
    "lstm": "LSTM",
}


@dataclasses.dataclass(frozen=True)
class Config(grad_flow.FlowConfig):
    variants: tuple[str, ...] = option(
        tuple(VARIANTS), f"variants to compare, comma-separated from {','.join(VARIANTS)}"
    )

    def check(self) -> None:
        super().check()
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise UsageError(
                f"--variants={','.join(self.variants)}: choose from {', '.join(VARIANTS)}"
            )


def variant_config(cfg: Config, variant: str, last_step_only: bool) -> grad_flow.Config:
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(grad_flow.FlowConfig)}
    return grad_flow.Config(**shared, **VARIANTS[variant], last_step_only=last_step_only)


def run(cfg: Config, run: Run) -> dict:
    summary: dict = {}
    flows: dict[bool, dict[str, grad_flow.GradFlow]] = {True: {}, False: {}}
    for variant in cfg.variants:
        for last_only in (True, False):
            vcfg = variant_config(cfg, variant, last_only)
            loss = "last" if last_only else "all"
            try:
                model, trained, _ = grad_flow.trained_or_initial_model(
                    vcfg, run, model=f"{variant}_{loss}"
                )
            except RunFailed as err:  # one diverging variant must not hide the others
                print(f"{LABELS[variant]:22s} loss on {loss:4s} steps: training failed: {err}")
                summary[f"{variant}_{loss}_failed"] = 1
                continue
            flow = grad_flow.measure(model, *grad_flow.probe_batch(vcfg), last_only)
            flows[last_only][LABELS[variant]] = flow
            part = grad_flow.flow_summary(flow, prefix=f"{variant}_{loss}_")
            summary.update(part)
            summary.update({f"{variant}_{loss}_{k}": v for k, v in trained.items()})
            slope = part.get(f"{variant}_{loss}_log_grad_slope", float("nan"))
            ratio = part.get(f"{variant}_{loss}_grad_ratio_first_last", float("nan"))
            print(
                f"{LABELS[variant]:22s} loss on {loss:4s} steps: slope {slope:+.4f}, "
                f"||dL/dh_1||/||dL/dh_T|| = {ratio:.3g}"
            )
    plot_compare(cfg, run, flows)
    return summary


def plot_compare(cfg: Config, run: Run, flows) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for col, last_only in enumerate((True, False)):
        ax = axes[col]
        for i, (label, flow) in enumerate(flows[last_only].items()):
            grad_flow.draw_flow(ax, axes[2] if last_only else _Null(), flow, label, f"C{i}")
        ax.set_yscale("log")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("||dL/dh_t||  (log scale)")
        ax.set_title("loss on the last target only" if last_only else "loss on every step")
        ax.legend(fontsize=7)
    axes[2].set_xlabel("timestep t")
    axes[2].set_ylabel("mean ||h_t||")
    axes[2].set_title("hidden-state magnitude")
    axes[2].legend(fontsize=7)
    rho = "init default" if cfg.spectral_radius is None else f"{cfg.spectral_radius:g}"
    trained = f", after {cfg.steps} training steps" if cfg.steps else ", at initialisation"
    forget = f", LSTM forget bias {cfg.forget_bias:g}" if cfg.forget_bias else ""
    fig.suptitle(
        f"T={cfg.seq_len}, hidden {cfg.hidden_size}, {cfg.num_layers} layer(s), "
        f"{cfg.init} init, spectral radius {rho}{forget}{trained}"
    )
    run.save_figure(fig, "grad_flow_compare")


class _Null:
    """An axes stand-in that draws nothing (state magnitudes are drawn once)."""

    def plot(self, *args, **kwargs):
        return None
