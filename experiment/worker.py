"""A long-lived process that runs a study's trials (started by experiment.study).

    python -m experiment.worker        # jobs on stdin, results on stdout, one JSON per line

A job is a list of trials: {"id", "argv" (train.py's options), "env", "log"}. Each
trial is `train.main(argv)` in this process, so imports, the JAX runtime and
compiled programs are paid once per worker, not once per trial. A job of several
trials was grouped by the executor as packable: they train together in one
program (training.packing.fit_packed) and the worker answers {"packed": [ids]};
each trial's own run (a job of one) then resumes from its final checkpoint and
writes its summary and figures, on whichever worker is idle. For every trial's
run one line {"id", "exit_code"} goes back on stdout.

While a trial runs, file descriptors 1 and 2 point at its log file (its workdir's
trial.log), so its output is what `python train.py ... > trial.log 2>&1` would
show. A trial interrupted by SIGTERM or SIGINT ends the worker (after reporting).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator

from experiment import interrupt

# The study process's PID (set by experiment.study): the worker ends when it does.
PARENT_ENV = "RNNAE_STUDY_PID"
# The CPUs this worker runs on, e.g. "0" or "4,5,6,7" (set by experiment.study).
CPUS_ENV = "RNNAE_WORKER_CPUS"
# Exit codes after which the worker stops instead of taking the next trial.
STOP_CODES = frozenset({130, 143})


@contextlib.contextmanager
def output_to(path: str) -> Iterator[None]:
    """Point fds 1 and 2 (and Python's streams) at `path`, appending, for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set for the block (a trial's sweep identity, W&B name)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def train_packed(trials: list[dict], hand_on: Callable[[int], None]) -> None:
    """Train the job's trials together (training.packing); on any reason they cannot
    pack, say so and leave them to their own runs (which report real errors).

    hand_on(i): trial i (not the first, whose log this job's output goes to) is
    trained, its run closed: its own run may start now, on another worker."""
    import train
    from experiment.errors import RunFailed, UsageError
    from training.packing import Member, PackingUnavailable, fit_packed

    members: list[Member] = []
    closed: set[int] = set()
    ids = ", ".join(t["id"] for t in trials)

    def trained(i: int) -> None:
        if i == 0:
            return
        closed.add(i)
        members[i].run.close()
        hand_on(i)

    try:
        for trial in trials:
            with environment(trial["env"]):
                task, module, cfg, opts = train.parse_command(trial["argv"])
                with interrupt.deferred():
                    run = train.start_run(task, cfg, opts)
            try:
                train_cfg, problem = module.training_problem(cfg)
            except BaseException:
                run.close()
                raise
            members.append(Member(train_cfg, problem, run))
        print(f"training {len(trials)} trials packed in one program: {ids}", flush=True)
        fit_packed(members, desc=f"packed x{len(trials)}", on_trained=trained)
    except (PackingUnavailable, UsageError, RunFailed) as err:
        print(f"note: not packed ({err}); each trial runs alone", flush=True)
    except Exception as err:  # e.g. a full disk: each trial's own run meets it and says so
        print(f"note: packed training failed ({type(err).__name__}: {err}); each trial runs "
              "alone from its last checkpoint", flush=True)  # fmt: skip
    finally:
        for i, member in enumerate(members):
            if i not in closed:
                with contextlib.suppress(Exception):
                    member.run.close()


def run_job(trials: list[dict], results) -> bool:
    """Run one job; False when the worker must stop (an interrupt).

    A job of several trials is a packed group: they train together, the worker reports
    {"packed": [ids]}, and the executor hands each trial's own run (which resumes from
    its final checkpoint and writes its summary and figures) to whichever worker is
    idle. A job of one trial is that trial's run."""
    import train

    if len(trials) > 1:
        handed_on: set[str] = set()

        def hand_on(i: int) -> None:
            note_packed(trials[i], trials[0]["id"])
            announce_packed([trials[i]], results)
            handed_on.add(trials[i]["id"])

        try:
            with interrupt.trap(), output_to(trials[0]["log"]):
                train_packed(trials, hand_on)
        except KeyboardInterrupt:
            code = interrupt.exit_code()
            for trial in trials:
                if trial["id"] not in handed_on:
                    report(results, trial["id"], code)
            return False
        rest = [t for t in trials[1:] if t["id"] not in handed_on]
        for trial in rest:
            note_packed(trial, trials[0]["id"])
        announce_packed([trials[0], *rest], results)
        return True
    (trial,) = trials
    with environment(trial["env"]), output_to(trial["log"]):
        try:
            code = train.main(trial["argv"])
        except Exception:  # a bug: its traceback goes to the trial's log
            traceback.print_exc()
            code = 1
    report(results, trial["id"], code)
    return code not in STOP_CODES


def note_packed(trial: dict, lead: str) -> None:
    """Say in a packed trial's log where its training went."""
    with open(trial["log"], "a", encoding="utf-8") as log:
        log.write(f"trained packed with {lead} (see its trial.log)\n")


def announce_packed(trials: list[dict], results) -> None:
    """{"packed": [ids]}: these trials' packed training is over (their runs finish next)."""
    results.write(json.dumps({"packed": [t["id"] for t in trials]}) + "\n")
    results.flush()


def report(results, trial_id: str, code: int) -> None:
    results.write(json.dumps({"id": trial_id, "exit_code": code}) + "\n")
    results.flush()


def die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the study process that started it dies (even by kill -9):
    its running trial then records the interruption and keeps its checkpoints, instead
    of an orphan going on (and holding the trial's workdir lock) after the study ended.
    Linux only (prctl PR_SET_PDEATHSIG); elsewhere the worker stops at its next job."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def pin_to_cpus(cpus: str | None) -> None:
    """Run on the CPUs listed in `cpus` ("0,1"), set before any thread starts so that
    every thread (XLA's, BLAS's) inherits them. Nothing happens without a list, where
    the OS cannot pin (not Linux), or for a list it refuses (CPUs no longer there)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    with contextlib.suppress(OSError, ValueError):
        os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})


def warm_up() -> None:
    """Import what every trial uses and start JAX's runtime, before the first job: a
    worker started beside a busy one pays this (about 2 s) while it waits, not when
    its first trial starts. Anything that fails here fails again, with its proper
    message, in the trial that needs it."""
    with contextlib.suppress(Exception):
        import jax
        import orbax.checkpoint  # noqa: F401
        import tensorboardX  # noqa: F401

        import train  # noqa: F401
        from experiment.figures import pyplot
        from training import loop, packing  # noqa: F401

        jax.devices()
        pyplot()


def main() -> int:
    pin_to_cpus(os.environ.get(CPUS_ENV))  # first: the threads started later inherit it
    from experiment import faults

    parent = os.environ.get(PARENT_ENV)
    if parent and parent.isdigit():
        die_with_parent(int(parent))
    faults.silence_library_noise()
    # results go to the original stdout; everything else the trials print goes to logs
    results = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    warm_up()  # after the redirection: nothing it prints can reach the results
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if isinstance(request, dict) and "keys" in request:
            answer_keys(request["keys"], results)
        elif not run_job(request, results):
            return 0
    return 0


def answer_keys(trials: list[dict], results) -> None:
    """{"keys": {id: packing key or null}, "costs": {id: training cost or null}} for the
    study's trials (experiment.study). A trial whose key cannot be worked out (a bug,
    a task that fails to import) gets null: it runs alone, and its own run reports the
    error."""
    from pathlib import Path

    from experiment.study import Trial, group_key, training_cost

    keys, costs = {}, {}
    for t in trials:
        trial = Trial(t["id"], t["task"], t["options"], Path())
        try:
            keys[t["id"]] = group_key(trial)
        except Exception:
            traceback.print_exc()  # to the worker's log
            keys[t["id"]] = None
        try:  # only an order depends on it: a failure here leaves the key as it is
            costs[t["id"]] = training_cost(trial)
        except Exception:
            traceback.print_exc()
            costs[t["id"]] = None
    results.write(json.dumps({"keys": keys, "costs": costs}) + "\n")
    results.flush()


if __name__ == "__main__":
    sys.exit(main())
