"""The classic surname recipe vs ours: accuracy and training time, in one run.

The classic recipe, as a newcomer would type it from the well-known tutorial:
one name at a time, one-hot characters, a tanh RNN with 128 hidden units and a
linear output, plain SGD (learning rate 0.005) on the negative log-likelihood,
100,000 steps, each drawing a random language and then a random name of it. It
runs here in PyTorch (outside the project's dependencies; skipped without
torch) on our training split and is scored on our test split. Ours is
`python train.py --task=surnames` with its defaults, run as a subprocess.

    .bench-venv/bin/python benchmarks/surnames_classic.py [--data_dir DIR] [--seeds 0,1,2] \
        [--ours "OPTIONS" ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import surnames as text  # noqa: E402


def classic(data_dir: Path, seed: int, steps: int) -> dict:
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    data = text.read_directory(data_dir)
    train, _, test = text.stratified_split(data.labels, seed=0)
    vocab = text.VOCAB_SIZE
    encoded = [torch.tensor(text.encode(n) or [text.UNK]) for n in data.names]
    by_language = [[i for i in train if data.labels[i] == c] for c in range(len(data.languages))]
    rnn = torch.nn.RNN(vocab, 128, nonlinearity="tanh")
    head = torch.nn.Linear(128, len(data.languages))
    params = [*rnn.parameters(), *head.parameters()]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        c = int(rng.integers(len(by_language)))
        i = by_language[c][int(rng.integers(len(by_language[c])))]
        x = torch.nn.functional.one_hot(encoded[i], vocab).float().unsqueeze(1)
        out, _ = rnn(x)
        loss = torch.nn.functional.cross_entropy(head(out[-1]), torch.tensor([c]))
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 0.005 * p.grad
    seconds = time.perf_counter() - t0
    correct, recall = [], np.zeros(len(data.languages))
    with torch.no_grad():
        for i in test:
            x = torch.nn.functional.one_hot(encoded[i], vocab).float().unsqueeze(1)
            correct.append(int(head(rnn(x)[0][-1]).argmax()) == data.labels[i])
    correct = np.asarray(correct)
    labels = data.labels[test]
    recall = [correct[labels == c].mean() for c in range(len(data.languages))]
    return dict(
        accuracy=float(correct.mean()), macro_accuracy=float(np.mean(recall)), train_seconds=seconds
    )


def ours(data_dir: Path, seed: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            *(sys.executable, str(REPO / "train.py"), "--task=surnames"),
            *(f"--data_dir={data_dir}", f"--seed={seed}", f"--workdir={workdir}"),
            *("--wandb=disabled", *extra),
        ]
        t0 = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=REPO)
        wall = time.perf_counter() - t0
        s = json.loads((Path(workdir) / "summary.json").read_text())
    return dict(accuracy=s["test_accuracy"], macro_accuracy=s["test_macro_accuracy"],
                train_seconds=s["train_seconds"], wall_seconds=wall)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, default=REPO.parent / "shared" / "data" / "names")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--classic_steps", type=int, default=100_000)
    parser.add_argument(
        "--ours",
        action="append",
        help="extra options of one of our configurations, space-separated; repeat to compare "
        "several in the same run (default: one run with the defaults)",
    )
    args = parser.parse_args()
    configs = args.ours or [""]
    names = [f"ours {c}".strip() for c in configs]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        count = len(rows)
        for name, extra in zip(names, configs, strict=True):
            rows.append((name, seed, ours(args.data_dir, seed, extra.split())))
        try:
            rows.append(("classic", seed, classic(args.data_dir, seed, args.classic_steps)))
        except ImportError:
            print("torch is not installed: the classic recipe is skipped", file=sys.stderr)
        for name, s, r in rows[count:]:
            print(
                f"{name} seed {s}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()),
                flush=True,
            )
    for name in (*names, "classic"):
        results = [r for n, _, r in rows if n == name]
        if results:
            summary = {}
            for k in results[0]:
                values = [r[k] for r in results]
                spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
                summary[k] = (np.mean(values), spread)
            text_ = ", ".join(f"{k} {m:.4f} +- {s:.4f}" for k, (m, s) in summary.items())
            print(f"{name} mean +- std over {len(results)} seeds: {text_}")


if __name__ == "__main__":
    main()
