"""Run one experiment.

    python train.py --task=NAME [--key=value ...] [--workdir=DIR] [--wandb=MODE]
    python train.py --help                 # the tasks
    python train.py --task=NAME --help     # that task's options, types and defaults

Exit codes: 0 success, 2 bad usage or input, 1 a run that failed (e.g. a
non-finite loss), 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from experiment.config import build_config, config_help, tokenize
from experiment.errors import RunFailed, UsageError

RUN_OPTIONS = {
    "workdir": "where the run writes (default runs/<task>/<timestamp>); an existing workdir "
    "with checkpoints and the same config is resumed",
    "wandb": "online | offline | disabled (default: $WANDB_MODE, online under `wandb agent`, "
    "else offline: files in WORKDIR/wandb for `wandb sync`)",
    "compilation_cache": "true | false: JAX's persistent compilation cache in "
    "$RNNAE_CACHE_DIR or ~/.cache/rnnae/jax (default true)",
    "distributed": "true | false: jax.distributed.initialize() for a multi-host run (coordinator "
    "from the environment); only process 0 logs and writes files (default false)",
}


def usage() -> str:
    from tasks import TASKS

    lines = [__doc__.strip(), "", "Tasks:"]
    lines += [f"  {name:18s} {desc}" for name, desc in TASKS.items()]
    lines += ["", "Options of every task:"]
    lines += [f"  --{k}\n      {v}" for k, v in RUN_OPTIONS.items()]
    return "\n".join(lines)


def task_usage(name: str, config_cls) -> str:
    return "\n".join(
        [
            f"python train.py --task={name} [--key=value ...]",
            "",
            "Task options:",
            config_help(config_cls),
            "",
            "Run options:",
            *[f"  --{k}\n      {v}" for k, v in RUN_OPTIONS.items()],
        ]
    )


def parse_bool(name: str, text: str | None) -> bool:
    value = "true" if text is None else text.strip().lower()
    if value in {"true", "1", "yes", "on"}:
        return True
    if value in {"false", "0", "no", "off"}:
        return False
    raise UsageError(f"--{name}={text!r}: expected true or false")


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, so repeated runs skip XLA compilation."""
    import jax

    cache = Path(os.environ.get("RNNAE_CACHE_DIR", Path.home() / ".cache" / "rnnae" / "jax"))
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        print(f"note: compilation cache dir {cache} is not writable; cache off", file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def start_distributed() -> None:
    """Join a multi-host JAX job (addresses from the environment, e.g. Slurm or Cloud TPU)."""
    import jax

    try:
        jax.distributed.initialize()
    except (RuntimeError, ValueError) as err:
        raise UsageError(
            f"--distributed: jax.distributed.initialize() failed ({err}); set the coordinator "
            "address, process count and id in the environment, or run without --distributed"
        ) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    argv = [a for a in argv if a not in ("-h", "--help")]
    run = None
    try:
        raw = tokenize(argv)
        task_name = raw.pop("task", None)
        if task_name is None:
            if wants_help:
                print(usage())
                return 0
            raise UsageError("--task is required; see `python train.py --help` for the tasks")
        import tasks

        module = tasks.load(task_name)
        if wants_help:
            print(task_usage(task_name, module.Config))
            return 0
        run_opts = {k: raw.pop(k) for k in list(raw) if k in RUN_OPTIONS}
        cfg = build_config(module.Config, raw, also_known=[*RUN_OPTIONS, "task"])
        run = start_run(task_name, cfg, run_opts)
        summary = module.run(cfg, run)
        run.finish(summary)
        print(f"done: {run.workdir / 'summary.json'}")
        return 0
    except (UsageError, RunFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        if run is not None:
            run.fail(str(err), err.exit_code)
        return err.exit_code
    except KeyboardInterrupt:
        print(
            "interrupted; rerun the same command to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    finally:
        if run is not None:
            run.close()


def start_run(task_name: str, cfg, run_opts: dict):
    """Workdir, compilation cache and writers for a run (UsageError if any is unusable)."""
    from experiment.run import Run, default_workdir, prepare_workdir
    from experiment.writers import WANDB_MODES, default_wandb_mode

    wandb_mode = run_opts.get("wandb") or default_wandb_mode()
    if wandb_mode not in WANDB_MODES:
        raise UsageError(f"--wandb={wandb_mode!r}: choose one of {', '.join(WANDB_MODES)}")
    if parse_bool("distributed", run_opts.get("distributed", "false")):
        start_distributed()
    if parse_bool("compilation_cache", run_opts.get("compilation_cache", "true")):
        enable_compilation_cache()
    given = run_opts.get("workdir")
    if "workdir" in run_opts and not given:
        raise UsageError("--workdir needs a directory")
    workdir = prepare_workdir(Path(given) if given else default_workdir(task_name))
    print(f"workdir: {workdir}")
    return Run(task_name, cfg, workdir, wandb_mode)


if __name__ == "__main__":
    sys.exit(main())
