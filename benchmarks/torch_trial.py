"""One running-average trial as a plain PyTorch script: what a user would otherwise run
per trial of `sweeps/rnn_activation.yaml` (the `torch` mode of study_executor.py).

    .bench-venv/bin/python benchmarks/torch_trial.py --workdir DIR [--cell rnn|lstm]
        [--activation tanh|relu|identity] [--num_layers N] [--last_step_only true|false]
        [--steps 500]

The same data (data.running_average, the task's seeds), model sizes (hidden 32),
batch (64), Adam at 1e-2 with a cosine decay to 0, loss (all steps or the last),
one evaluation on the held-out set every 500 steps and at the end, and the same
work products as a trial: summary.json and the three figures of the task
(predictions, error by step, evaluation curve). One thread by default (--threads),
as a script per trial on a shared machine would be run. torch.nn.RNN has no
identity activation: that one is a Python loop over the time steps, as a user
would write it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.running_average import make_running_average
from experiment.figures import pyplot

HIDDEN, BATCH, LR, SEQ_LEN, NUM_TRAIN, NUM_EVAL, DATA_SEED = 32, 64, 1e-2, 16, 10_000, 2_000, 1234
EVAL_EVERY = 500


class IdentityRNN(torch.nn.Module):
    """h_t = x_t W_x + h_{t-1} W_h + b, stacked: torch.nn.RNN offers tanh and relu only."""

    def __init__(self, layers: int):
        super().__init__()
        sizes = [1] + [HIDDEN] * layers
        self.inputs = torch.nn.ModuleList(torch.nn.Linear(sizes[i], HIDDEN) for i in range(layers))
        self.recurrent = torch.nn.ModuleList(
            torch.nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(layers)
        )

    def forward(self, x):
        for inp, rec in zip(self.inputs, self.recurrent, strict=True):
            h, outputs = torch.zeros(x.shape[0], HIDDEN), []
            projected = inp(x)
            for t in range(x.shape[1]):
                h = projected[:, t] + rec(h)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)
        return x, None


class Regressor(torch.nn.Module):
    def __init__(self, cell: str, activation: str, layers: int):
        super().__init__()
        if cell == "lstm":
            self.rnn = torch.nn.LSTM(1, HIDDEN, num_layers=layers, batch_first=True)
        elif activation == "identity":
            self.rnn = IdentityRNN(layers)
        else:
            self.rnn = torch.nn.RNN(1, HIDDEN, num_layers=layers, nonlinearity=activation,
                                    batch_first=True)  # fmt: skip
        self.head = torch.nn.Linear(HIDDEN, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--cell", default="rnn", choices=["rnn", "lstm"])
    parser.add_argument("--activation", default="tanh", choices=["tanh", "relu", "identity"])
    parser.add_argument("--num_layers", type=int, default=1)
    parser.add_argument("--last_step_only", default="false", choices=["true", "false"])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    last_only = args.last_step_only == "true"
    train = {k: torch.from_numpy(v) for k, v in
             make_running_average(NUM_TRAIN, SEQ_LEN, seed=DATA_SEED).items()}  # fmt: skip
    held = {k: torch.from_numpy(v) for k, v in
            make_running_average(NUM_EVAL, SEQ_LEN, seed=DATA_SEED + 1).items()}  # fmt: skip
    model = Regressor(args.cell, args.activation, args.num_layers)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    rng = np.random.default_rng(args.seed)

    def loss_of(errors):
        return errors[:, -1].mean() if last_only else errors.mean()

    def evaluate():
        with torch.no_grad():
            errors = ((model(held["x"]) - held["y"]) ** 2)[..., 0]
        return {"loss": float(loss_of(errors)), "mse_all_steps": float(errors.mean()),
                "mse_last_step": float(errors[:, -1].mean())}  # fmt: skip

    start = time.perf_counter()
    history, order, position = [], rng.permutation(NUM_TRAIN), 0
    for step in range(1, args.steps + 1):
        if position + BATCH > NUM_TRAIN:
            order, position = rng.permutation(NUM_TRAIN), 0
        idx = torch.from_numpy(order[position : position + BATCH])
        position += BATCH
        loss = loss_of(((model(train["x"][idx]) - train["y"][idx]) ** 2)[..., 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4g}", flush=True)
        if step % EVAL_EVERY == 0 or step == args.steps:
            history.append({"step": step, **evaluate()})
    train_seconds = time.perf_counter() - start
    final = history[-1]
    with torch.no_grad():
        train_errors = ((model(train["x"]) - train["y"]) ** 2)[..., 0]
        predictions = model(held["x"]).numpy()
    summary = {"train_loss": float(loss_of(train_errors)),
               **{f"eval_{k}": v for k, v in final.items() if k != "step"},
               "train_seconds": train_seconds, "steps": args.steps}  # fmt: skip
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(args, held, predictions, history)


def plot(args, held, predictions, history) -> None:
    plt = pyplot()
    x, y = held["x"].numpy(), held["y"].numpy()
    t = np.arange(1, SEQ_LEN + 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True)
    for i, ax in enumerate(axes):
        ax.plot(t, x[i, :, 0], ".", color="0.7", label="input x_t")
        ax.plot(t, y[i, :, 0], "-", color="k", label="running mean")
        ax.plot(t, predictions[i, :, 0], "--", color="C1", label="prediction")
    axes[0].legend(fontsize=8)
    fig.savefig(args.workdir / "predictions.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy(t, ((predictions - y) ** 2)[..., 0].mean(axis=0), "o-")
    fig.savefig(args.workdir / "error_by_step.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [h["step"] for h in history]
    for key in ("mse_all_steps", "mse_last_step"):
        ax.semilogy(steps, [h[key] for h in history], marker="o", label=key)
    ax.legend(fontsize=8)
    fig.savefig(args.workdir / "eval_curve.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
