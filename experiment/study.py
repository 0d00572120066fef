"""The study executor: many trials in a few long-lived worker processes, packed where
they can share one compiled program. Used by sweep.py and report.py.

* `--workers W` processes (experiment.worker) run trials one job at a time; imports,
  the JAX runtime and compiled programs are reused from trial to trial. A worker
  starts as soon as there is work for it to come (as trials arrive, before they are
  grouped into jobs; while a packed job trains whose trials then finish as jobs of
  their own) and warms up while it waits.
* Packing: pending trials with the same `training.packing.group_key` (configs that
  differ only in seed, learning rate, weight decay or a task's PACKABLE options) go
  to one worker as one job and train as replicas of one program; each trial's own
  run (summary, figures) then finishes as a job of its own on any idle worker. The
  keys of trials whose task this process has not loaded are worked out by an idle
  worker (which has JAX and the training code loaded), so grouping alone never
  makes this process import JAX or the tasks.
* Every trial is still a complete run of its own (train.py's workdir, summary,
  figures, TensorBoard and W&B runs, checkpoints), with its output in
  WORKDIR/trial.log.
* A worker that dies (segfault, out of memory, kill) costs the trials of its job
  still running: each is reported with exit code 128 + signal and the cause, and
  the study goes on with a new worker.
* Ctrl-C: the workers get SIGTERM; a running trial records the interruption and
  keeps its checkpoints, so rerunning the study resumes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Collection
from pathlib import Path

from experiment.config import build_config, tokenize
from experiment.errors import UsageError
from experiment.worker import CPUS_ENV, PARENT_ENV

REPO = Path(__file__).resolve().parent.parent
TRIAL_LOG = "trial.log"
# How long a worker may take to record an interruption before it is killed.
STOP_SECONDS = 30.0


@dataclasses.dataclass
class Trial:
    """One run of a study: `python train.py --task=TASK --KEY=VALUE ... --workdir=...`."""

    id: str
    task: str
    options: dict[str, str]  # option -> its command-line text
    workdir: Path
    wandb: str = "disabled"
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    def argv(self) -> list[str]:
        options = [f"--{k}={v}" for k, v in self.options.items()]
        return [f"--task={self.task}", *options, f"--workdir={self.workdir}",
                f"--wandb={self.wandb}"]  # fmt: skip

    def command(self) -> str:
        """The same run as one command."""
        return shlex.join(["python", "train.py", *self.argv()])

    @property
    def log(self) -> Path:
        return self.workdir / TRIAL_LOG


@dataclasses.dataclass
class Result:
    trial: Trial
    exit_code: int
    cause: str | None = None  # why, when the trial's worker died under it


def failure_message(result: Result) -> str:
    """Why a trial did not succeed, in one line: `exit CODE: reason`, the reason being
    its worker's death, else its failure.json, else the last line of its log."""
    from experiment.workdir import FAILURE_FILE, read_json_object

    reason = result.cause
    if reason is None and (result.trial.workdir / FAILURE_FILE).exists():
        try:
            record = read_json_object(result.trial.workdir / FAILURE_FILE, "the failure record")
            reason = str(record.get("error"))
        except UsageError as err:
            reason = str(err)
    if reason is None:
        try:
            text = result.trial.log.read_text(errors="replace")
        except OSError:
            text = ""
        lines = [line for line in text.splitlines() if line.strip()]
        reason = lines[-1] if lines else "no output"
    return f"exit {result.exit_code}: {reason}"


@functools.lru_cache(maxsize=4096)
def _task_config(task: str, options: tuple[tuple[str, str], ...]):
    """(task module, config) of a trial's options; None for options its own run will
    refuse (with its error). Kept: a trial's packing key and cost both read it."""
    import tasks

    try:
        module = tasks.load(task)
        cfg = build_config(module.Config, tokenize([f"--{k}={v}" for k, v in options]))
    except UsageError:
        return None
    return module, cfg


def _config_of(trial: Trial):
    return _task_config(trial.task, tuple(trial.options.items()))


def group_key(trial: Trial) -> str | None:
    """Trials with equal keys can train packed; None: alone (or a config the trial's
    own run will refuse with its error)."""
    from training.packing import group_key as key_of

    found = _config_of(trial)
    return None if found is None else key_of(trial.task, *found)


def training_cost(trial: Trial) -> float | None:
    """The task's estimate of the trial's training computation (its optional
    `training_cost(cfg)`, in units of its own); None without one. Only an order
    depends on it: an estimate that fails or is not a finite number counts as none
    (said in one line)."""
    found = _config_of(trial)
    estimate = None if found is None else getattr(found[0], "training_cost", None)
    if estimate is None:
        return None
    try:
        value = float(estimate(found[1]))
        reason = str(value)
    except Exception as err:
        value, reason = math.nan, f"{type(err).__name__}: {err}"
    if math.isfinite(value):
        return value
    print(f"note: {trial.task}.training_cost gave no cost for {trial.id} ({reason}); "
          "its jobs keep their order", file=sys.stderr, flush=True)  # fmt: skip
    return None


def task_loaded_here(task: str) -> bool:
    """Whether this process has loaded the task's module (and with it JAX)."""
    return f"tasks.{task}" in sys.modules


def take_job(
    pending: list[Trial],
    pack: bool,
    trained: Collection[str] = (),
    key_of: Callable[[Trial], str | None] = group_key,
    idle: int = 1,
) -> list[Trial]:
    """The next job: the first pending trial and, when packing, every pending trial of its
    group (up to training.config.MAX_REPLICAS replicas). Trials in `trained` (their
    packed training is done) run alone: their run only finishes. `key_of`: group_key,
    or a memo of it (a trial's key is asked for at every job while it waits).

    idle: the workers free now, this job's included. When the group is all that is
    pending, it is shared out among them (e.g. a grid of one group on 2 workers: two
    packed programs of half the trials each, side by side), instead of one worker
    training it while the others wait for its trials' runs."""
    first = pending.pop(0)
    key = key_of(first) if pack and first.id not in trained else None
    if key is None:
        return [first]
    group = [t for t in pending if t.id not in trained and key_of(t) == key]
    limit = trials_per_job(first)
    if idle > 1 and len(group) == len(pending):  # nothing else for the other workers
        limit = min(limit, -(-(len(group) + 1) // idle))  # ceil: parts differ by one at most
    job = [first, *group[: max(limit, 1) - 1]]
    for trial in job[1:]:
        pending.remove(trial)
    return job


def trials_per_job(trial: Trial) -> int:
    """How many trials like `trial` one packed job takes: up to
    training.config.MAX_REPLICAS replicas, each trial's num_seeds of them."""
    from training.config import MAX_REPLICAS

    return max(1, MAX_REPLICAS // int(trial.options.get("num_seeds", 1)))


def prefer_own_trials(
    pending: list[Trial],
    trained_by: dict[str, int],
    slot: int,
    job_cost: Callable[[Trial], float | None] | None = None,
) -> None:
    """Put first what worker `slot` should run next: a trial it trained packed (its run
    evaluates and plots with the programs the worker compiled for the group), else
    one not trained yet (new work), else the pending order (trials another worker
    trained). Another worker finishing a group's trials compiles those programs
    again, at the same time as the worker that trained it, when both finish their
    groups together (the persistent cache only helps the later of the two).

    job_cost(trial): the estimated cost of the job the trial would start; given, and
    known for every new trial, the costliest new job goes first (ties: the pending
    order), so that the long jobs do not start last, beside a worker with nothing
    left to run."""
    own = [i for i, t in enumerate(pending) if trained_by.get(t.id) == slot]
    new = [i for i, t in enumerate(pending) if t.id not in trained_by]
    if job_cost is not None and new and not own:
        costs = [job_cost(pending[i]) for i in new]
        known = [c for c in costs if c is not None]
        if len(known) == len(costs):
            new = [new[known.index(max(known))]]
    first = (own or new or [0])[0]
    pending.insert(0, pending.pop(first))


# numpy's BLAS thread-count variables (OpenBLAS, MKL, and OpenMP builds of either).
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def worker_cpus(index: int, workers: int) -> list[int]:
    """The CPUs worker `index` of `workers` runs on: W workers split the usable CPUs into
    W contiguous parts (their sizes differ by one at most); with more workers than
    CPUs, the workers take the CPUs in turn."""
    cpus = usable_cpus()
    if workers >= len(cpus):
        return [cpus[index % len(cpus)]]
    return cpus[index * len(cpus) // workers : (index + 1) * len(cpus) // workers]


def worker_env(index: int, workers: int) -> dict[str, str]:
    """The environment of a study's worker process `index`, one of `workers`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop(CPUS_ENV, None)
    if workers > 1:
        cpus = worker_cpus(index, workers)
        # Each worker runs on its own CPUs (experiment.worker sets its affinity first
        # thing): pinned, 2 workers side by side took 16% less wall time for the
        # 16-lambda grid than when the scheduler could move them (BENCHMARKS.md).
        env[CPUS_ENV] = ",".join(map(str, cpus))
        # numpy's BLAS starts a thread per CPU in every process, and its threads spin
        # while they wait: beside another busy worker, a matrix product then takes
        # 2.5x its time (the synthetic data, PCA, the evaluations' SVDs). Each worker
        # starts as many as its CPUs instead (a user's own settings are kept): 14%
        # less wall time for the 16-lambda grid on 2 workers (BENCHMARKS.md).
        for name in BLAS_THREAD_VARIABLES:
            env.setdefault(name, str(len(cpus)))
        # JAX takes 75% of a GPU's memory when it starts: a second worker on the same
        # GPU would find too little left. Workers allocate what they use instead (a
        # user's own setting is kept). No effect on the CPU.
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


class Worker:
    """One experiment.worker process and the job it is running."""

    def __init__(self, index: int, events: queue.Queue, cwd: Path, log: Path, workers: int = 1):
        env = worker_env(index, workers)
        env[PARENT_ENV] = str(os.getpid())  # the worker ends when this process does
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as err:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "experiment.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=cwd,  # the caller's directory: relative paths mean what they meant
                env=env,
                text=True,
                start_new_session=True,  # a terminal's Ctrl-C reaches the study, not us
            )
        self.index = index
        self.running: dict[str, Trial] = {}
        self._reader = threading.Thread(target=self._read, args=(events,), daemon=True)
        self._reader.start()

    def _read(self, events: queue.Queue) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            events.put((self, message))
        events.put((self, None))  # end of output: the process is gone

    def send(self, job: list[Trial]) -> None:
        assert self.proc.stdin is not None
        for trial in job:
            trial.workdir.mkdir(parents=True, exist_ok=True)
            self.running[trial.id] = trial
        payload = [dict(id=t.id, argv=t.argv(), env=t.env, log=str(t.log)) for t in job]
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()

    def ask_keys(self, trials: list[Trial]) -> bool:
        """Ask for these trials' packing keys: the answer comes back as an event
        {"keys": {id: key}} (experiment.worker.answer_keys). False: not asked (the
        process is gone; its end is an event of its own)."""
        assert self.proc.stdin is not None
        payload = [dict(id=t.id, task=t.task, options=t.options) for t in trials]
        try:
            self.proc.stdin.write(json.dumps({"keys": payload}) + "\n")
            self.proc.stdin.flush()
        except OSError:  # e.g. BrokenPipeError: it died before its end was read
            return False
        return True

    def death_cause(self) -> tuple[int, str]:
        code = self.proc.wait()
        if code < 0:
            name = signal.Signals(-code).name
            return 128 - code, f"its worker process died ({name})"
        return code or 1, f"its worker process exited with code {code}"

    def stop(self) -> None:
        """SIGTERM: a running trial records the interruption and keeps its checkpoints."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self.stop()
        self._reader.join(timeout=5)  # it ends at the pipe's end of file
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()


def run_trials(
    more: Callable[[int], list[Trial]],
    *,
    workers: int,
    pack: bool,
    on_start: Callable[[list[Trial]], None],
    on_result: Callable[[Result], None],
    worker_log: Path,
    expected: int = 0,
    costliest_first: bool = False,
) -> None:
    """Run trials until `more` has none left: `more(idle)` is asked for trials whenever
    a worker is idle and none are pending (it may return more than `idle`, e.g. a
    whole grid, which packing can then group). `on_start(job)` and `on_result(result)`
    are called in this process as jobs start and trials end. `expected`: how many
    trials the caller knows `more` will give; that many workers (up to `workers`)
    start before it is first asked, so their start overlaps its proposals.

    costliest_first: new jobs start in the order of their estimated training cost
    (`training_cost`, times the trials packed together), where the task estimates
    every pending trial's; else in the order `more` gives them (e.g. the report's)."""
    events: queue.Queue = queue.Queue()
    pool: list[Worker | None] = [None] * workers
    pending: list[Trial] = []
    trained: set[str] = set()  # trained packed; their own runs still to finish
    trained_by: dict[str, int] = {}  # the worker slot that trained them
    keys: dict[str, str | None] = {}
    costs: dict[str, float | None] = {}  # training_cost, from this process or a worker
    asked: dict[str, int] = {}  # trial id -> the worker slot working out its key
    started: set[int] = set()  # worker slots started at least once

    def key_of(trial: Trial) -> str | None:
        if trial.id not in keys:  # its task is loaded here, or no worker could be asked
            keys[trial.id] = group_key(trial)
        return keys[trial.id]

    def cost_of(trial: Trial) -> float | None:
        if trial.id not in costs:  # as for its key
            costs[trial.id] = training_cost(trial)
        return costs[trial.id]

    def job_costs() -> Callable[[Trial], float | None]:
        """A new trial's job's estimated cost: its own times the pending trials it
        would pack with (take_job's group, up to trials_per_job)."""
        counts: dict[str, int] = {}
        for t in pending:
            key = key_of(t) if pack and t.id not in trained else None
            if key is not None:
                counts[key] = counts.get(key, 0) + 1

        def job_cost(trial: Trial) -> float | None:
            cost = cost_of(trial)
            key = key_of(trial) if pack else None
            if cost is None or key is None:
                return cost
            return cost * min(counts[key], trials_per_job(trial))

        return job_cost

    def awaiting_keys() -> bool:
        """Whether the pending trials' packing keys are still being worked out. A trial
        whose task this process has loaded (sweep.py and report.py load them to check
        their configs) is keyed here; the others are asked of an idle worker, which
        has JAX and the training code loaded: loading the tasks here would cost about
        2 s of CPU beside the workers' own start (BENCHMARKS.md)."""
        missing = [t for t in pending if t.id not in keys and t.id not in trained]
        for trial in missing:
            if task_loaded_here(trial.task) and trial.id not in asked:
                key_of(trial)
        missing = [t for t in missing if t.id not in keys]
        new = [t for t in missing if t.id not in asked]
        helper = next((w for w in pool if w is not None and not w.running), None)
        if new and helper is not None and helper.ask_keys(new):
            asked.update((t.id, helper.index) for t in new)
        return any(t.id in asked for t in missing)

    exhausted = False
    cwd = Path.cwd()

    def start_new_slots(count: int) -> None:
        """Start the first `count` slots never started yet (once per slot: one that dies
        idle is not restarted; one that dies running a job is, for its next job)."""
        for i in range(min(count, workers)):
            if pool[i] is None and i not in started:
                pool[i] = Worker(i, events, cwd, worker_log, workers)
                started.add(i)

    try:
        start_new_slots(expected)
        while True:
            idle = [i for i, w in enumerate(pool) if w is None or not w.running]
            grouping = False  # the pending trials' keys are being worked out
            for i in idle:
                if not pending and not exhausted:
                    pending += more(len(idle))
                    exhausted = not pending
                    # the workers this work can use start now: the first idle one
                    # works out how it groups (awaiting_keys) once it is warm
                    start_new_slots(len(pending))
                grouping = pack and bool(pending) and awaiting_keys()
                if not pending or grouping:
                    break
                prefer_own_trials(pending, trained_by, i, job_costs() if costliest_first else None)
                job = take_job(pending, pack, trained, key_of, idle=len(idle) - idle.index(i))
                worker = pool[i]
                if worker is None:
                    worker = pool[i] = Worker(i, events, cwd, worker_log, workers)
                    started.add(i)
                if job[0].id not in trained:  # announced once, when its training starts
                    on_start(job)
                worker.send(job)
            # more trials than busy workers (a packed job's trials come back as jobs of
            # their own): start the other workers now, so their imports and JAX start
            # overlap the training (once per slot: one that dies idle is not restarted)
            busy = [w for w in pool if w is not None and w.running]
            if not grouping and sum(len(w.running) for w in busy) + len(pending) > len(busy):
                start_new_slots(workers)
            if not any(w is not None and w.running for w in pool) and not grouping:
                if pending or not exhausted:
                    continue
                break
            worker, message = events.get()
            if message is None:  # the worker is gone: its unfinished trials failed
                # keys it was asked for: asked again of another worker, or worked out here
                for trial_id in [k for k, slot in asked.items() if slot == worker.index]:
                    del asked[trial_id]
                code, cause = worker.death_cause()
                for trial in list(worker.running.values()):
                    on_result(Result(trial, code, cause))
                worker.running.clear()
                worker.close()
                pool[worker.index] = None
                continue
            if "keys" in message:
                keys.update(message["keys"])
                costs.update(message.get("costs") or {})
                for trial_id in message["keys"]:
                    asked.pop(trial_id, None)
                continue
            if "packed" in message:  # their runs finish next, on any idle worker
                done = [worker.running.pop(i) for i in message["packed"] if i in worker.running]
                trained.update(t.id for t in done)
                trained_by.update((t.id, worker.index) for t in done)
                pending[:0] = done
                continue
            trial = worker.running.pop(message["id"], None)
            if trial is not None:
                on_result(Result(trial, int(message["exit_code"])))
    finally:
        # on Ctrl-C or an error here: interrupted trials keep their checkpoints
        for w in pool:
            if w is not None:
                w.close()
