"""Backpropagation through a one-weight linear RNN, checked three ways.

The recurrence h_t = w * (u_t + h_{t-1}), h_0 = 0, output y = h_T. Its
computation graph alternates a sum node a_t = u_t + h_{t-1} and a product node
h_t = w * a_t; for T = 3 the nodes are called p, q, r, s, t, y:
p = u_1, q = w p, r = u_2 + q, s = w r, t = u_3 + s, y = w t.

dy/dw is computed
  1. by `jax.grad` (reverse-mode autodiff through a `lax.scan`),
  2. by the closed form sum_k k w^(k-1) u_(T+1-k)  (y = sum_j w^(T-j+1) u_j),
  3. as the sum over the T edges leaving w: edge t contributes the value entering
     its multiplication (a_t) times dy/dh_t, the gradient of y with respect to that
     multiplication's output, read with the perturbation trick.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from experiment.config import Config as BaseConfig
from experiment.config import option
from experiment.errors import UsageError
from experiment.figures import pyplot
from experiment.run import Run

T3_NAMES = ("p", "q", "r", "s", "t", "y")


@dataclasses.dataclass(frozen=True)
class Config(BaseConfig):
    w: float = option(0.5, "the shared recurrent weight w")
    inputs: tuple[float, ...] = option((1.0, 2.0, 3.0), "the inputs u_1..u_T (any T >= 1)")

    def check(self) -> None:
        if not math.isfinite(self.w):
            raise UsageError(f"--w={self.w}: must be a finite number")
        if not self.inputs:
            raise UsageError("--inputs is empty: give comma-separated numbers u_1,...,u_T")
        if not all(math.isfinite(u) for u in self.inputs):
            raise UsageError(
                f"--inputs={','.join(map(str, self.inputs))}: every u_t must be finite"
            )


def forward(w, u_T, perturb_T=None):
    """(y, sums a_t, states h_t) of h_t = w (u_t + h_{t-1}); perturb_t is added to h_t."""
    perturb_T = jnp.zeros_like(u_T) if perturb_T is None else perturb_T

    def step(h, inputs):
        u, p = inputs
        a = u + h
        h_new = w * a + p
        return h_new, (a, h_new)

    h_T, (a, h) = jax.lax.scan(step, jnp.zeros((), u_T.dtype), (u_T, perturb_T))
    return h_T, a, h


def dy_dw_closed_form(w: float, u: np.ndarray) -> float:
    """sum_{k=1}^{T} k w^(k-1) u_(T+1-k)."""
    steps = len(u)
    return float(sum(k * w ** (k - 1) * u[steps - k] for k in range(1, steps + 1)))


def backprop(w: float, u: np.ndarray) -> dict:
    """Forward intermediates and dy/dw three ways (float64)."""
    with jax.enable_x64(True):
        w64, u64 = jnp.float64(w), jnp.asarray(u, jnp.float64)
        y, a, h = forward(w64, u64)
        dy_dw = jax.grad(lambda w: forward(w, u64)[0])(w64)
        # dy/dh_t: gradient with respect to a perturbation added to each product node
        dy_dh = jax.grad(lambda p: forward(w64, u64, p)[0])(jnp.zeros_like(u64))
        edges = np.asarray(a * dy_dh)
        return dict(
            y=float(y),
            sums=np.asarray(a).tolist(),
            states=np.asarray(h).tolist(),
            dy_dh=np.asarray(dy_dh).tolist(),
            dy_dw_autodiff=float(dy_dw),
            dy_dw_closed_form=dy_dw_closed_form(w, np.asarray(u, np.float64)),
            edge_contributions=edges.tolist(),
            dy_dw_edge_sum=float(edges.sum()),
        )


def graph_nodes(result: dict) -> dict[str, float]:
    """Named nodes in graph order: a_1, h_1, a_2, h_2, ...; p, q, r, s, t, y when T = 3."""
    values = [v for pair in zip(result["sums"], result["states"], strict=True) for v in pair]
    steps = len(result["sums"])
    names = (
        T3_NAMES if steps == 3 else [f"{kind}_{t}" for t in range(1, steps + 1) for kind in "ah"]
    )
    return dict(zip(names, values, strict=True))


def run(cfg: Config, run: Run) -> dict:
    u = np.asarray(cfg.inputs, np.float64)
    result = backprop(cfg.w, u)
    nodes = graph_nodes(result)
    print("forward: " + ", ".join(f"{k}={v:.10g}" for k, v in nodes.items()))
    print(f"dy/dw by jax.grad     = {result['dy_dw_autodiff']:.12g}")
    print(f"dy/dw closed form     = {result['dy_dw_closed_form']:.12g}")
    edges = ", ".join(f"{e:.6g}" for e in result["edge_contributions"])
    print(f"edge contributions    = [{edges}] (sum {result['dy_dw_edge_sum']:.12g})")
    plot_edges(run, result)
    return {
        **{f"node_{k}": v for k, v in nodes.items()},
        "y": result["y"],
        "dy_dw_autodiff": result["dy_dw_autodiff"],
        "dy_dw_closed_form": result["dy_dw_closed_form"],
        "dy_dw_edge_sum": result["dy_dw_edge_sum"],
        "edge_contributions": result["edge_contributions"],
        "dy_dh": result["dy_dh"],
        "abs_error_autodiff_vs_closed_form": abs(
            result["dy_dw_autodiff"] - result["dy_dw_closed_form"]
        ),
    }


def plot_edges(run: Run, result: dict) -> None:
    """edge_contributions.png: how much each use of w contributes to dy/dw."""
    plt = pyplot()

    edges = result["edge_contributions"]
    t = np.arange(1, len(edges) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(t, edges, color="C0")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("timestep t of the multiplication h_t = w a_t")
    ax.set_ylabel("a_t * dy/dh_t")
    ax.set_title(f"dy/dw = {result['dy_dw_autodiff']:.6g} = sum of the {len(edges)} edges")
    run.save_figure(fig, "edge_contributions")
