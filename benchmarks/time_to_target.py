"""Wall time (compile included) and steps to reach the running-average targets.

Targets (training MSE, the mean batch loss over the last 10 steps):
  1-layer RNN < 0.01 and 2-layer RNN < 0.001, with the all-steps loss (Task 1)
  and with the last-step loss (Task 2).
Setting: T=16, hidden 32, batch 64, Adam with a constant learning rate, 10,000
training sequences, checked every 10 steps, at most 5,000 steps.

Each JAX measurement runs in a fresh process (so compile time is real): first
with an empty persistent compilation cache, then again with the cache filled.
PyTorch (when importable) runs the same recipe in the same script, interleaved.

    python benchmarks/time_to_target.py [--lrs 3e-3,1e-2,3e-2] [--inits uniform,orthogonal]
    .bench-venv/bin/python benchmarks/time_to_target.py   # adds PyTorch
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

REPO = Path(__file__).resolve().parents[1]
TARGETS = [(1, False, 0.01), (2, False, 0.001), (1, True, 0.01), (2, True, 0.001)]
CHECK_EVERY, MAX_STEPS, WINDOW = 10, 5000, 10


def jax_worker(layers: int, last_step: bool, target: float, lr: float, init: str) -> dict:
    """Runs inside a fresh process: time from model init to reaching the target."""
    sys.path.insert(0, str(REPO))
    import train

    if os.environ.get("BENCH_CACHE") == "1":
        train.enable_compilation_cache()
    import jax
    import numpy as np

    from tasks import running_average as ra
    from training.loop import init_train_state, make_chunk, make_train_step
    from training.optim import make_optimizer
    from training.sampling import EpochSampler

    cfg = ra.Config(
        num_layers=layers,
        last_step_only=last_step,
        learning_rate=lr,
        init=init,
        lr_schedule="constant",
        steps=MAX_STEPS,
    )
    problem = ra.make_problem(cfg)
    data = jax.device_put(problem.train_data)
    sampler = EpochSampler(cfg.num_train, cfg.batch_size, cfg.seed)
    t0 = time.perf_counter()
    tx = make_optimizer(cfg)
    graphdef, state = init_train_state(problem, tx, cfg)
    chunk = make_chunk(make_train_step(graphdef, problem, tx), replicated=False)
    step, first_call = 0, None
    while step < MAX_STEPS:
        state, metrics = chunk(state, data, sampler.indices(step, CHECK_EVERY))
        step += CHECK_EVERY
        loss = float(np.mean(np.asarray(metrics["loss"])[-WINDOW:]))
        first_call = first_call or time.perf_counter() - t0
        if loss < target:
            break
    return dict(seconds=time.perf_counter() - t0, steps=step, loss=loss, first_call_s=first_call)


def torch_warmup() -> bool:
    """Import torch and run a few steps once, so first-use costs are not timed."""
    try:
        import torch
    except ImportError:
        return False
    rnn, x = torch.nn.RNN(1, 8, num_layers=2, batch_first=True), torch.randn(4, 5, 1)
    opt = torch.optim.Adam(rnn.parameters())
    for _ in range(3):
        opt.zero_grad()
        rnn(x)[0].pow(2).mean().backward()
        opt.step()
    return True


def torch_run(layers: int, last_step: bool, target: float, lr: float, init: str) -> dict | None:
    if not torch_warmup():
        return None
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from data.running_average import make_running_average

    data = make_running_average(10_000, 16, seed=1234)
    x_all, y_all = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rnn = torch.nn.RNN(1, 32, num_layers=layers, batch_first=True)
    head = torch.nn.Linear(32, 1)
    if init == "orthogonal":
        for name, p in rnn.named_parameters():
            if "weight_hh" in name:
                torch.nn.init.orthogonal_(p)
            elif "bias" in name:
                torch.nn.init.zeros_(p)
    opt = torch.optim.Adam([*rnn.parameters(), *head.parameters()], lr=lr)
    rng = np.random.default_rng(0)
    perm, pos, losses = rng.permutation(10_000), 0, []
    for step in range(1, MAX_STEPS + 1):
        if pos + 64 > 10_000:
            perm, pos = rng.permutation(10_000), 0
        idx = torch.from_numpy(perm[pos : pos + 64])
        pos += 64
        err = (head(rnn(x_all[idx])[0]) - y_all[idx]) ** 2
        loss = err[:, -1].mean() if last_step else err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % CHECK_EVERY == 0 and np.mean(losses[-WINDOW:]) < target:
            break
    return dict(seconds=time.perf_counter() - t0, steps=step, loss=float(np.mean(losses[-WINDOW:])))


def run_jax(args: tuple, cache_dir: str, use_cache: bool) -> dict:
    env = dict(os.environ, RNNAE_CACHE_DIR=cache_dir, BENCH_CACHE="1" if use_cache else "0")
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lrs", default="3e-3,1e-2,3e-2")
    parser.add_argument("--inits", default="uniform")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(jax_worker(*json.loads(args.worker))))
        return
    rows = []
    print(f"# {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}")
    print("layers loss       target  init        lr     impl        steps  seconds (first call)")
    for layers, last_step, target in TARGETS:
        for init in args.inits.split(","):
            for lr in (float(v) for v in args.lrs.split(",")):
                spec = (layers, last_step, target, lr, init)
                with tempfile.TemporaryDirectory() as cache:
                    results = {
                        "jax-first": run_jax(spec, cache, True),
                        "jax-cached": run_jax(spec, cache, True),
                        "torch": torch_run(*spec),
                    }
                for impl, res in results.items():
                    if res is None:
                        continue
                    row = dict(
                        layers=layers,
                        last_step_only=last_step,
                        target=target,
                        init=init,
                        lr=lr,
                        impl=impl,
                        **res,
                    )
                    rows.append(row)
                    loss = "last-step" if last_step else "all-steps"
                    first = f"({res['first_call_s']:.2f})" if "first_call_s" in res else ""
                    print(
                        f"{layers:6d} {loss:10s} {target:6g}  {init:10s} {lr:6g} {impl:10s} "
                        f"{res['steps']:6d} {res['seconds']:8.2f} {first}",
                        flush=True,
                    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
