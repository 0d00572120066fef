"""Run one experiment.

    python train.py --task=NAME [--key=value ...] [--workdir=DIR] [--wandb=MODE]
    python train.py --help                 # the tasks
    python train.py --task=NAME --help     # that task's options, types and defaults

Exit codes: 0 success, 2 bad usage or input (nothing in the workdir changed), 1 a
run that failed (e.g. a non-finite loss, a full disk), 130 interrupted by Ctrl-C
(143 by SIGTERM); the message of 1 and 130 gives the command that resumes.
"""

from __future__ import annotations

# First, before anything slow is imported: from here on a Ctrl-C is recorded and
# reported in one line (experiment.interrupt), not a traceback from an import.
from experiment import interrupt

if __name__ == "__main__":  # a command, not a module imported by tests or other code
    interrupt.install_early()

import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from experiment import faults
from experiment.config import build_config, config_help, tokenize
from experiment.errors import RunFailed, UsageError


def run_options_help() -> list[str]:
    """The run options' lines of --help, from the typed RunOptions."""
    from experiment.run_options import NAMES, RunOptions

    lines = config_help(RunOptions).splitlines()
    keep = [i for i, line in enumerate(lines) if line.strip().startswith("--")]
    wanted = [i for i in keep if lines[i].strip()[2:].split("=")[0] in NAMES]
    return [line for i in wanted for line in lines[i : i + 2]]


def usage() -> str:
    from tasks import TASKS

    lines = [__doc__.strip(), "", "Tasks:"]
    lines += [f"  {name:18s} {desc}" for name, desc in TASKS.items()]
    lines += ["", "Options of every task:", *run_options_help()]
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
            *run_options_help(),
        ]
    )


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
    """Run one experiment; returns the exit code (0, 1, 2, or 128 + signal)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with interrupt.trap(), faults.quiet_library_noise():
        return _main(argv)


def _main(argv: list[str]) -> int:
    wants_help = any(a in ("-h", "--help") for a in argv)
    argv = [a for a in argv if a not in ("-h", "--help")]
    run = None
    given: dict[str, str | None] = {}
    try:
        interrupt.raise_if_received()  # a Ctrl-C during start-up (install_early)
        given = dict(tokenize(argv))
        if wants_help:
            return print_help(given)
        task_name, module, cfg, run_opts = parse_command(argv)
        with interrupt.deferred():  # W&B and TensorBoard start their helpers here
            run = start_run(task_name, cfg, run_opts)
        summary = module.run(cfg, run)
        interrupt.raise_if_received()  # a Ctrl-C that a library swallowed is still one
        run.finish(summary)
        print(f"done: {run.workdir / 'summary.json'}")
        return 0
    except KeyboardInterrupt:
        return _report_interrupt(run, given)
    except BaseException as err:
        if interrupt.received():  # the interrupt surfaced as another error
            return _report_interrupt(run, given)
        failure = classify_failure(err, run.workdir if run is not None else None)
        if failure is None:
            raise  # a bug: keep its traceback
        message, code = failure
        if faults.disk_error(err) is not None and run is not None:
            message += f"; free space and resume with: {resume_command(given, run.workdir)}"
        print(f"error: {message}", file=sys.stderr)
        faults.mark_reported()
        if run is not None:
            _quietly(run.fail, message, code)
        return code
    finally:
        if run is not None:
            _quietly(run.close)


def print_help(given: dict[str, str | None]) -> int:
    """--help: the tasks, or with --task (or --config) that task's options."""
    raw = with_saved_config(given.pop("config"), given) if "config" in given else given
    task_name = raw.get("task")
    if task_name is None:
        print(usage())
        return 0
    import tasks

    with interrupt.deferred():
        print(task_usage(task_name, tasks.load(task_name).Config))
    return 0


def parse_command(argv: list[str]):
    """(task name, task module, task config, RunOptions) of a train.py command line;
    UsageError for anything wrong with it. Also used by the study executor's workers."""
    raw = tokenize(argv)
    if "config" in raw:
        raw = with_saved_config(raw.pop("config"), raw)
    task_name = raw.pop("task", None)
    if task_name is None:
        raise UsageError("--task is required; see `python train.py --help` for the tasks")
    import tasks

    with interrupt.deferred():  # imports jax & co.: not to be torn by a Ctrl-C
        module = tasks.load(task_name)
    from experiment.run_options import NAMES, RunOptions

    if "workdir" in raw and not (raw["workdir"] or "").strip():
        raise UsageError("--workdir needs a directory")
    run_opts = build_config(RunOptions, {k: raw.pop(k) for k in list(raw) if k in NAMES})
    cfg = build_config(module.Config, raw, also_known=[*NAMES, "task"])
    return task_name, module, cfg, run_opts


def with_saved_config(path_text: str | None, given: dict[str, str | None]) -> dict:
    """The options of a saved config.json (a file or a workdir holding one) as command-line
    text, with the options given on the command line taking precedence."""
    from experiment.config import to_text
    from experiment.workdir import CONFIG_FILE, read_saved_run, resolve

    if not (path_text or "").strip():
        raise UsageError("--config needs WORKDIR/config.json or a WORKDIR")
    path = resolve(path_text or "")
    workdir = path if path.is_dir() else path.parent
    if path.is_file() and path.name != CONFIG_FILE:
        raise UsageError(f"--config={path_text}: expected a {CONFIG_FILE} or a workdir")
    saved = read_saved_run(workdir)
    if saved is None:
        raise UsageError(f"--config={path_text}: no {CONFIG_FILE} there")
    task, config = saved
    if given.get("task") not in (None, task):
        raise UsageError(
            f"--config={path_text} is a {task!r} run; --task={given['task']} does not match"
        )
    return {"task": task, **{k: to_text(v) for k, v in config.items()}, **given}


def classify_failure(err: BaseException, workdir: Path | None = None) -> tuple[str, int] | None:
    """(one-line message, exit code) for an expected kind of failure, None for a bug."""
    if isinstance(err, UsageError | RunFailed):
        return str(err), err.exit_code
    if isinstance(err, MemoryError):
        return (
            "out of memory; reduce the sizes (e.g. --hidden_size, --latent_dim, "
            "--batch_size, --num_train, --num_seeds)",
            2,
        )
    disk = faults.disk_error(err, workdir)
    if disk is not None:
        return disk, 1
    return None


def _report_interrupt(run, given: dict) -> int:
    code = interrupt.exit_code()
    name = "SIGTERM" if code == 128 + signal.SIGTERM else "Ctrl-C"
    faults.mark_reported()
    if run is None:
        print(f"interrupted ({name}) before the run started; nothing was written", file=sys.stderr)
        return code
    from training.checkpoints import recorded_configs

    saved = "checkpoints are intact" if recorded_configs(run.workdir) else "no checkpoint yet"
    message = f"interrupted ({name}); {saved}"
    _quietly(run.fail, message, code)
    print(
        f"{message}; resume with: {resume_command(given, run.workdir)}",
        file=sys.stderr,
    )
    return code


def _quietly(fn, *args) -> None:
    """Clean-up that must not replace the error being reported (e.g. on a full disk)."""
    with contextlib.suppress(Exception):
        fn(*args)


def resume_command(given: dict[str, str | None], workdir: Path) -> str:
    """The command that continues this run: the same options, with its --workdir."""
    parts = ["python", "train.py"]
    parts += [f"--{k}" if v is None else f"--{k}={v}" for k, v in given.items() if k != "workdir"]
    parts.append(f"--workdir={workdir}")
    return shlex.join(parts)


def start_run(task_name: str, cfg, opts):
    """Lock and check the workdir, then open the run's writers (UsageError if unusable).

    `opts`: the RunOptions. Nothing is written into an existing workdir before the lock
    is held and the requested config has been checked against everything the workdir
    records.
    """
    from experiment.run import Run
    from experiment.workdir import WorkdirLock, default_workdir, prepare_workdir, resolve
    from experiment.writers import default_wandb_mode

    wandb_mode = opts.wandb or default_wandb_mode()
    if opts.distributed:
        start_distributed()
    if opts.compilation_cache:
        enable_compilation_cache()
    given = opts.workdir
    workdir = prepare_workdir(resolve(given)) if given else default_workdir(task_name)
    from experiment.run import is_primary_process

    lock = WorkdirLock(workdir) if is_primary_process() else None
    if lock is not None:
        lock.acquire()
    try:
        check_identity(workdir, task_name, cfg)
        print(f"workdir: {workdir}")
        return Run(task_name, cfg, workdir, wandb_mode, lock=lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def check_identity(workdir: Path, task_name: str, cfg) -> None:
    """Refuse a workdir whose config.json or checkpoints record another task or config."""
    from experiment.config import to_dict
    from experiment.workdir import CONFIG_FILE, check_same_run, read_saved_run
    from training.checkpoints import recorded_configs

    config = to_dict(cfg)
    saved = read_saved_run(workdir)
    if saved is not None:
        check_same_run(workdir, task_name, config, saved, workdir / CONFIG_FILE)
    for source, recorded in recorded_configs(workdir):
        check_same_run(
            workdir, task_name, config, (recorded.get("task"), recorded.get("config", {})), source
        )


def exit_now(code: int) -> None:
    """Exit a failed or interrupted run without waiting for library threads: everything
    of ours is closed by now, and a helper thread left waiting by the failure (orbax's
    signalling threads after an interrupted save) must not keep the process alive."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    faults.silence_library_noise()
    exit_code = main()
    if exit_code != 0:
        exit_now(exit_code)
    sys.exit(0)
