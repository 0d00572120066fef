"""Training-step throughput of our recurrent layers vs Flax's built-ins (and PyTorch).

One train step = forward over the sequence + linear head at every step + MSE +
backward + Adam update. All implementations are interleaved round by round in
ONE process, so their ratios share the machine's load; medians are reported.

    python benchmarks/recurrent_layers.py                 # all sizes, cells, depths
    python benchmarks/recurrent_layers.py --sizes small --rounds 9
    .bench-venv/bin/python benchmarks/recurrent_layers.py # adds PyTorch if importable

PyTorch is never a project dependency; `make bench-torch` builds a separate
virtual environment with it for the reference column.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.recurrent import SequenceRegressor

SIZES = {
    "small": dict(batch=64, seq_len=16, hidden=32, features=1),
    "large": dict(batch=256, seq_len=128, hidden=256, features=32),
}
OURS = {
    "ours-fused": dict(impl="fused", hoist_input=False),
    "ours-fused-hoist": dict(impl="fused", hoist_input=True),
    "ours-scan": dict(impl="scan", hoist_input=False),
    "ours-scan-hoist": dict(impl="scan", hoist_input=True),
}


class FlaxBuiltin(nnx.Module):
    """Flax's own nnx.RNN over SimpleCell / OptimizedLSTMCell, stacked, with a linear head."""

    def __init__(self, cell: str, features: int, hidden: int, layers: int, rngs: nnx.Rngs):
        make = nnx.SimpleCell if cell == "rnn" else nnx.OptimizedLSTMCell
        sizes = [features] + [hidden] * layers
        self.layers = nnx.List([nnx.RNN(make(sizes[i], hidden, rngs=rngs)) for i in range(layers)])
        self.head = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        zeros = jnp.zeros((x.shape[0], self.head.in_features), x.dtype)
        for layer in self.layers:
            carry = zeros if isinstance(layer.cell, nnx.SimpleCell) else (zeros, zeros)
            x = layer(x, initial_carry=carry)
        return self.head(x)


def jax_step_runner(model: nnx.Module, x, y):
    """A jitted, buffer-donating Adam step over the model's parameters; returns run(n)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    def loss_fn(p, rest):
        return jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)

    def step(params, opt_state, rest):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    state = {"p": params, "o": opt_state}

    def run(n: int) -> None:
        for _ in range(n):
            state["p"], state["o"], loss = step(state["p"], state["o"], rest)
        loss.block_until_ready()

    t0 = time.perf_counter()
    run(1)  # compile
    return run, time.perf_counter() - t0


def torch_step_runner(cell: str, size: dict, layers: int, x_np, y_np):
    import torch

    torch.manual_seed(0)
    # Like with like: PyTorch on the GPU (cuDNN's RNN / LSTM) when JAX runs on one.
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    cls = torch.nn.RNN if cell == "rnn" else torch.nn.LSTM
    rnn = cls(size["features"], size["hidden"], num_layers=layers, batch_first=True).to(device)
    head = torch.nn.Linear(size["hidden"], 1).to(device)
    params = list(rnn.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    x, y = torch.from_numpy(x_np).to(device), torch.from_numpy(y_np).to(device)

    def run(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = torch.mean((head(rnn(x)[0]) - y) ** 2)
            loss.backward()
            opt.step()
        float(loss)  # waits for the device

    t0 = time.perf_counter()
    run(1)
    return run, time.perf_counter() - t0


def build_runners(cell, size, layers, variants, with_torch):
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((size["batch"], size["seq_len"], size["features"]), np.float32)
    y_np = np.cumsum(x_np[..., :1], axis=1) / np.arange(1, size["seq_len"] + 1)[:, None]
    x, y = jnp.asarray(x_np), jnp.asarray(y_np.astype(np.float32))
    runners, compile_s = {}, {}
    for name in variants:
        if name == "flax":
            model = FlaxBuiltin(cell, size["features"], size["hidden"], layers, nnx.Rngs(0))
        else:
            model = SequenceRegressor(
                size["features"],
                size["hidden"],
                1,
                layers,
                cell=cell,
                rngs=nnx.Rngs(0),
                **OURS[name],
            )
        runners[name], compile_s[name] = jax_step_runner(model, x, y)
    if with_torch:
        runners["torch"], compile_s["torch"] = torch_step_runner(
            cell, size, layers, x_np, y_np.astype(np.float32)
        )
    return runners, compile_s


def time_interleaved(runners: dict, steps: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each runner, runners alternating within every round."""
    samples = {name: [] for name in runners}
    order = list(runners)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            t0 = time.perf_counter()
            runners[name](steps)
            samples[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


def torch_available() -> bool:
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        return True
    except ImportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--cells", default="rnn,lstm")
    parser.add_argument("--layers", default="1,2")
    parser.add_argument("--variants", default=",".join([*OURS, "flax"]))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--target_seconds", type=float, default=0.25, help="per runner per round")
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with_torch = not args.no_torch and torch_available()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} ({jax.default_backend()}), "
        f"load avg {os.getloadavg()[0]:.2f}, torch: {with_torch}"
    )
    results = []
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        for cell in args.cells.split(","):
            for layers in (int(v) for v in args.layers.split(",")):
                runners, compile_s = build_runners(
                    cell, size, layers, args.variants.split(","), with_torch
                )
                probe = time_interleaved(runners, 1, 1)
                steps = max(1, int(args.target_seconds / max(probe.values())))
                per_step = time_interleaved(runners, steps, args.rounds)
                best_ref = min(per_step[k] for k in ("flax", "torch") if k in per_step)
                for name, sec in per_step.items():
                    row = dict(
                        size=size_name,
                        cell=cell,
                        layers=layers,
                        impl=name,
                        ms_per_step=1e3 * sec,
                        speedup_vs_flax=per_step["flax"] / sec if "flax" in per_step else None,
                        speedup_vs_best_reference=best_ref / sec,
                        compile_s=compile_s[name],
                    )
                    results.append(row)
                    print(
                        f"{size_name:5s} {cell:4s} L{layers} {name:17s} {1e3 * sec:9.3f} ms/step"
                        f"  x{row['speedup_vs_flax'] or float('nan'):5.2f} vs flax"
                        f"  x{row['speedup_vs_best_reference']:5.2f} vs best ref"
                        f"  compile {compile_s[name]:5.2f} s",
                        flush=True,
                    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
