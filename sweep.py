"""Run a W&B sweep file offline on one machine, with W&B's own search algorithms.

    python sweep.py sweeps/X.yaml [--count N] [--workers W] [--sweep_dir DIR] [--seed S]
                    [--set KEY=VALUE ...] [--retry_failed] [--no_pack]
    python sweep.py --report DIR
    python sweep.py sweeps/X.yaml --agent ENTITY/PROJECT/ID [--count N]   # a W&B server sweep

The YAML is the same file `wandb sweep` takes (method grid | random | bayes,
metric, parameters, and a command holding --task=NAME). Trials are proposed by
`sweeps.next_run` (the `sweeps` package that W&B's server uses), seeded so that a
sweep is reproducible. Trials run in `--workers` long-lived processes (the study
executor, experiment.study), and trials that differ only in packable options
(seed, learning rate, weight decay, a task's numeric loss options) train as
replicas of one compiled program; each is still a complete `train.py` run with
its own workdir under the sweep directory (trial.log holds its output) and
offline W&B files (`wandb sync` uploads them later). A failed or non-finite
trial, or one whose worker died, is recorded with its error and the sweep goes
on. The state lives in SWEEP_DIR/sweep_state.json, written
atomically after every change: rerunning the same command resumes, rerunning
interrupted trials from their checkpoints and never repeating a finished one.

At the end (or with --report): a table sorted by the metric with one column per
swept parameter, printed and saved as results.csv / results.md, the best
configuration, and results.png (the metric against each parameter).

`--set steps=500` gives every trial an option without editing the YAML (a
smaller sweep for a first look); `--retry_failed` reruns the failed trials of an
existing sweep directory, each resuming from its own checkpoints (for trials a
crash, a kill or a full disk ended; a diverging trial diverges again).

Exit codes: 0 done, 1 every trial failed, 2 bad sweep file or options, 130
interrupted.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any

from experiment import run_options
from experiment.config import build_config, suggest, to_text
from experiment.errors import UsageError, command_exit_code
from experiment.figures import pyplot
from experiment.study import Result, Trial, failure_message, run_trials
from experiment.workdir import (
    SUMMARY_FILE,
    read_json_object,
    resolve,
    write_bytes_atomic,
    write_json_atomic,
)
from experiment.writers import SWEEP_ENV, SWEPT_ENV, result_metrics

STATE_FILE = "sweep_state.json"
METHODS = ("grid", "random", "bayes")


# ------------------------------------------------------------------ sweep file


def load_sweep_file(path: Path) -> dict:
    """The parsed YAML, or a UsageError saying what is wrong with it."""
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"sweep file {path} not found") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"sweep file {path} is not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise UsageError(f"sweep file {path} cannot be read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: a sweep file is a mapping with method, metric and parameters")
    return spec


def task_of(spec: dict) -> tuple[str, dict[str, str]]:
    """(task name, fixed --key=value options) from the sweep's command."""
    fixed = {}
    command = spec.get("command") or []
    if not isinstance(command, list):
        raise UsageError("command: expected a list like [python, train.py, --task=NAME, ...]")
    for item in command:
        if isinstance(item, str) and item.startswith("--") and "=" in item:
            key, value = item[2:].split("=", 1)
            fixed[key] = value
    task = fixed.pop("task", None)
    if not task:
        raise UsageError("the sweep's command must contain --task=NAME")
    return task, fixed


def parameter_values(param: dict) -> list[Any]:
    """Concrete values a parameter can take, for validation (bounds for distributions)."""
    if "values" in param:
        if not isinstance(param["values"], list) or not param["values"]:
            raise UsageError(
                f"values: expected a non-empty list like [1, 2, 3], got {param['values']!r}"
            )
        return list(param["values"])
    if "value" in param:
        return [param["value"]]
    return [param[k] for k in ("min", "max") if k in param]


def validate(spec: dict) -> tuple[str, type, dict[str, str]]:
    """Check method, metric and every parameter against the task's config before running."""
    import tasks

    method = spec.get("method")
    if method not in METHODS:
        raise UsageError(
            f"method {method!r} is not supported offline; use one of {', '.join(METHODS)}"
        )
    if "early_terminate" in spec:
        raise UsageError(
            "early_terminate (hyperband) is not supported by the offline runner; "
            "remove it, or run the sweep online with `wandb agent`"
        )
    metric = spec.get("metric") or {}
    if not isinstance(metric, dict):
        raise UsageError(
            f"metric: expected a mapping with name and goal (e.g. {{name: eval_loss, goal: "
            f"minimize}}), got {metric!r}"
        )
    if not metric.get("name") or metric.get("goal", "minimize") not in ("minimize", "maximize"):
        raise UsageError("metric needs a name and goal minimize or maximize")
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        raise UsageError("parameters: give at least one parameter to sweep")
    task, fixed = task_of(spec)
    config_cls = tasks.load(task).Config
    names = [f for f in config_cls.__dataclass_fields__]
    for name, param in params.items():
        if name in run_options.NAMES or name not in names:
            raise UsageError(
                f"parameter {name!r} is not an option of task {task}{suggest(name, names)}"
            )
        if not isinstance(param, dict):
            raise UsageError(
                f"parameter {name!r}: expected a mapping (values, value, or a distribution)"
            )
        try:
            values = parameter_values(param)
        except UsageError as err:
            raise UsageError(f"parameter {name!r}: {err}") from None
        for value in values:
            build_config(config_cls, {**fixed, name: to_text(value)})
    build_config(config_cls, fixed)
    sweeps = import_sweeps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sweeps.next_run(sweep_config(spec), [], validate=True)
        except Exception as err:  # the sweeps package's schema/validation errors
            raise UsageError(f"invalid sweep: {err}") from None
    return task, config_cls, fixed


def import_sweeps():
    """W&B's search algorithms (the `sweeps` package; its pydantic-v1 style warns on import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def sweep_config(spec: dict) -> dict:
    """The part of the YAML the search algorithms read."""
    return {k: spec[k] for k in ("method", "metric", "parameters") if k in spec}


# ----------------------------------------------------------------------- state


def read_state(path: Path) -> dict:
    """A saved sweep_state.json, or a UsageError when it is damaged (never a traceback)."""
    saved = read_json_object(path, "the sweep state")
    trials = saved.get("trials")
    sweep_spec = saved.get("sweep")
    well_formed = (
        isinstance(sweep_spec, dict)
        and isinstance(sweep_spec.get("metric"), dict)
        and isinstance(sweep_spec.get("parameters"), dict)
        and isinstance(trials, list)
        and all(isinstance(t, dict) and {"id", "params", "status"} <= set(t) for t in trials)
    )
    if not well_formed:
        raise UsageError(
            f"the sweep state {path} is damaged (no sweep, metric, parameters or trial list); "
            "restore it, or start the sweep in a new --sweep_dir"
        )
    return saved


class SweepState:
    """Trials and their outcomes, saved atomically after every change."""

    def __init__(self, directory: Path, spec: dict, seed: int):
        self.path = directory / STATE_FILE
        self.directory = directory
        if self.path.exists():
            saved = read_state(self.path)
            if saved["sweep"] != spec or saved["seed"] != seed:
                raise UsageError(
                    f"--sweep_dir={directory} holds a different sweep (or seed); "
                    "use another directory"
                )
            self.trials: list[dict] = saved["trials"]
        else:
            self.trials = []
        self.spec, self.seed = spec, seed
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, {"sweep": self.spec, "seed": self.seed, "trials": self.trials})

    def add(self, params: dict) -> dict:
        trial = {
            "id": f"trial-{len(self.trials):03d}",
            "params": params,
            "status": "running",
            "metric": None,
            "error": None,
        }
        self.trials.append(trial)
        self.save()
        return trial

    def as_sweep_runs(self, metric: str) -> list:
        sweeps = import_sweeps()
        states = {"finished": sweeps.RunState.finished, "failed": sweeps.RunState.failed,
                  "running": sweeps.RunState.running}  # fmt: skip
        runs = []
        for t in self.trials:
            summary = {metric: t["metric"]} if t["metric"] is not None else {}
            runs.append(
                sweeps.SweepRun(
                    name=t["id"],
                    config={k: {"value": v} for k, v in t["params"].items()},
                    state=states[t["status"]],
                    summary_metrics=summary,
                )
            )
        return runs


# --------------------------------------------------------------------- running


def propose(state: SweepState, spec: dict) -> dict | None:
    """The next trial's parameters from W&B's algorithm, or None when the grid is done."""
    import numpy as np

    sweeps = import_sweeps()
    # the sweeps package samples with both numpy's and Python's global generators
    np.random.seed([state.seed, len(state.trials)])
    random.seed(state.seed * 1_000_003 + len(state.trials))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = sweeps.next_run(sweep_config(spec), state.as_sweep_runs(spec["metric"]["name"]))
    if run is None:
        return None
    return {k: _plain(v["value"]) for k, v in run.config.items()}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def still_to_propose(spec: dict, state: SweepState, count: int | None) -> int:
    """How many trials the sweep has yet to propose (the grid's size or --count, less
    the trials it has): how many workers to start before the first proposal."""
    total = count or 0
    if spec["method"] == "grid":
        params = spec["parameters"].values()
        size = math.prod(len(p["values"]) if "values" in p else 1 for p in params)
        total = size if count is None else min(count, size)
    return max(0, total - len(state.trials))


def sweep_identity(directory: Path, spec: dict, seed: int) -> str:
    """'<name>-<id>' of a sweep: its directory's name and a hash of where it runs, what it
    searches and its seed, so trials of different sweeps never share a W&B group, and a
    resumed sweep keeps its own."""
    text = json.dumps([str(directory), spec, seed], sort_keys=True, default=str)
    return f"{directory.name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def make_trial(
    trial: dict, task: str, fixed: dict, directory: Path, wandb: str, identity: str
) -> Trial:
    """The executor's trial for a sweep trial: its options, workdir and W&B identity."""
    options = {k: to_text(v) for k, v in {**fixed, **trial["params"]}.items()}
    # the swept options are HParams columns of every trial, also where a trial's value
    # equals the task default
    env = {SWEPT_ENV: ",".join(trial["params"]), SWEEP_ENV: identity, "WANDB_NAME": trial["id"]}
    return Trial(trial["id"], task, options, directory / trial["id"], wandb, env)


def outcome(trial: dict, result: Result, metric: str) -> None:
    """Record a finished trial's status, metric and error in the trial."""
    summary_file = result.trial.workdir / SUMMARY_FILE
    if result.exit_code == 0 and result.cause is None and summary_file.exists():
        try:
            summary = read_json_object(summary_file, "the trial summary")
        except UsageError as err:
            trial.update(status="failed", error=str(err))
            return
        value = summary.get(metric)
        if metric not in summary:
            trial.update(status="failed", error=f"metric {metric!r} not reported")
            raise UsageError(
                f"metric {metric!r} is not in {trial['id']}'s summary.json; the task reports: "
                + ", ".join(sorted(k for k in summary if not isinstance(summary[k], list)))
            )
        if value is None or not math.isfinite(value):
            trial.update(status="failed", error=f"non-finite {metric}")
        else:
            trial.update(status="finished", metric=float(value), error=None)
        return
    trial.update(status="failed", error=failure_message(result))


def with_settings(spec: dict, settings: list[str]) -> dict:
    """`spec` with each KEY=VALUE of --set as `--KEY=VALUE` in its command (replacing the
    command's own value of KEY): every trial gets it, and the saved sweep records it."""
    command = list(spec.get("command") or [])
    for item in settings:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set steps=500")
        if key in (spec.get("parameters") or {}):
            raise UsageError(f"--set {item!r}: {key} is swept by the file; --set fixes others")
        command = [c for c in command if not (isinstance(c, str) and c.startswith(f"--{key}="))]
        # before ${args}, where W&B's agents put the swept values
        at = command.index("${args}") if "${args}" in command else len(command)
        command.insert(at, f"--{key}={value}")
    return {**spec, "command": command} if settings else spec


def run_sweep(
    spec: dict,
    directory: Path,
    count: int | None,
    workers: int,
    seed: int,
    wandb: str,
    retry_failed: bool = False,
    pack: bool = True,
) -> SweepState:
    task, _, fixed = validate(spec)
    metric = spec["metric"]["name"]
    directory.mkdir(parents=True, exist_ok=True)
    state = SweepState(directory, spec, seed)
    identity = sweep_identity(directory, spec, seed)
    if count is None and spec["method"] != "grid":
        raise UsageError(f"--count is required for method {spec['method']}")
    if retry_failed:
        for trial in state.trials:
            if trial["status"] == "failed":
                trial.update(status="running", error=None)
        state.save()
    resume = [t for t in state.trials if t["status"] == "running"]

    def by_id(trial_id: str) -> dict:
        return next(t for t in state.trials if t["id"] == trial_id)

    def more(idle: int) -> list[Trial]:
        """Interrupted trials first; then proposals: a whole grid or random search at
        once (so packing can group it), one per idle worker for bayes (each proposal
        sees the results so far)."""
        chosen = []
        if resume:
            chosen = [resume.pop(0) for _ in range(len(resume))]
            for trial in chosen:
                print(f"{trial['id']}: resuming {trial['params']}", flush=True)
        else:
            wanted = idle if spec["method"] == "bayes" else math.inf
            while len(chosen) < wanted and (count is None or len(state.trials) < count):
                params = propose(state, spec)
                if params is None:
                    break
                chosen.append(state.add(params))
        return [make_trial(t, task, fixed, directory, wandb, identity) for t in chosen]

    def on_start(job: list[Trial]) -> None:
        ids = ", ".join(t.id for t in job)
        what = f"packed: {len(job)} trials in one program" if len(job) > 1 else "starting"
        print(f"{ids}: {what} {'' if len(job) > 1 else by_id(job[0].id)['params']}".rstrip(),
              flush=True)  # fmt: skip

    def on_result(result: Result) -> None:
        trial = by_id(result.trial.id)
        outcome(trial, result, metric)
        if result.exit_code in (130, 143) and result.cause is None:
            trial.update(status="running", error=None)  # interrupted: resumes next time
        state.save()
        done = sum(t["status"] != "running" for t in state.trials)
        shown = (
            f"{metric}={trial['metric']:.6g}" if trial["status"] == "finished" else trial["error"]
        )
        print(f"{trial['id']}: {trial['status']}: {shown} ({done} done)", flush=True)

    try:
        # the costliest jobs first (by the task's estimate): a long packed group does
        # not start last, beside a worker with nothing left to run
        run_trials(more, workers=workers, pack=pack, on_start=on_start, on_result=on_result,
                   worker_log=directory / "workers.log",
                   expected=len(resume) + still_to_propose(spec, state, count),
                   costliest_first=True)  # fmt: skip
    finally:
        state.save()  # interrupted trials stay "running" and resume later
    return state


def run_agent(spec: dict, sweep_id: str, count: int | None, directory: Path, wandb: str) -> int:
    """A W&B server sweep's trials in THIS process: `wandb.agent(sweep_id, function=...)`
    asks the server for each trial, and each is `train.main` with the proposed values
    (imports and compiled programs are reused, as in the offline executor's workers).

    The sweep file gives the task and the fixed options (the same file given to
    `wandb sweep`); a trial's workdir is DIR/<W&B run id> and its W&B run is the one
    the server created for it (so the sweep sees its metric). Returns 1 when every
    trial failed, else 0."""
    try:
        import wandb as wandb_sdk
    except ImportError:
        raise UsageError("--agent needs the wandb package: pip install wandb") from None
    import yaml

    import train
    from experiment.workdir import WANDB_ID_FILE
    from experiment.worker import environment

    task, _, fixed = validate(spec)
    codes: list[int] = []

    def trial() -> None:
        run_id = os.environ["WANDB_RUN_ID"]  # set by the agent for this trial
        with open(os.environ["WANDB_SWEEP_PARAM_PATH"], encoding="utf-8") as f:
            proposed = yaml.safe_load(f) or {}
        params = {
            k: v["value"] for k, v in proposed.items() if isinstance(v, dict) and "value" in v
        }
        workdir = directory / run_id
        workdir.mkdir(parents=True, exist_ok=True)
        # the server's run for this trial is the workdir's W&B run
        write_bytes_atomic(workdir / WANDB_ID_FILE, (run_id + "\n").encode())
        options = {**fixed, **{k: to_text(v) for k, v in params.items()}}
        argv = [f"--task={task}", *[f"--{k}={v}" for k, v in options.items()],
                f"--workdir={workdir}", f"--wandb={wandb}"]  # fmt: skip
        print(f"{run_id}: starting {params}", flush=True)
        with environment({SWEPT_ENV: ",".join(params), "WANDB_NAME": run_id}):
            code = train.main(argv)
        codes.append(code)
        print(f"{run_id}: exit {code}", flush=True)

    try:
        wandb_sdk.agent(sweep_id, function=trial, count=count)
    except Exception as err:  # no login, no network, an unknown sweep: W&B's own errors
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(
            f"--agent {sweep_id}: W&B could not run the agent ({first_line}); check the "
            "sweep id and `wandb login`, or run the sweep offline without --agent"
        ) from None
    return 1 if codes and all(codes) else 0


# ---------------------------------------------------------------------- report


def report(directory: Path) -> None:
    """results.csv, results.md and results.png for a sweep directory, and the printed table.

    The table has the sweep metric and the task's other result metrics (all of them in
    the CSV, the first few in the Markdown and printed tables)."""
    state_file = directory / STATE_FILE
    if not state_file.exists():
        raise UsageError(f"--report {directory}: no {STATE_FILE} there")
    saved = read_state(state_file)
    spec, trials = saved["sweep"], saved["trials"]
    metric, goal = spec["metric"]["name"], spec["metric"].get("goal", "minimize")
    names = list(spec["parameters"])
    done = [t for t in trials if t["status"] == "finished"]
    done.sort(key=lambda t: t["metric"], reverse=goal == "maximize")
    rest = [t for t in trials if t["status"] != "finished"]
    results = {t["id"]: trial_results(directory / t["id"]) for t in done}
    others = other_metrics(metric, [results[t["id"]] for t in done])

    def rows_with(extra: list[str]) -> tuple[list[str], list[list[str]]]:
        header = ["trial", *names, metric, *extra, "status"]
        rows = [[t["id"], *[to_text(t["params"].get(n, "")) for n in names],
                 "" if t["metric"] is None else f"{t['metric']:.6g}",
                 *[_number(results.get(t["id"], {}).get(k)) for k in extra],
                 t["status"] if t["status"] != "failed" else f"failed: {t['error']}"]
                for t in done + rest]  # fmt: skip
        return header, rows

    header, rows = rows_with(others)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    write_bytes_atomic(directory / "results.csv", buffer.getvalue().encode())
    header, rows = rows_with(others[:SHOWN_METRICS])
    markdown = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        + ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    )
    best = done[0] if done else None
    best_line = (
        f"best ({goal} {metric}): {best['id']} {best['params']} -> {best['metric']:.6g}"
        if best
        else "no finished trial"
    )
    write_bytes_atomic(directory / "results.md", (markdown + "\n\n" + best_line + "\n").encode())
    print(format_table(header, rows))
    print(best_line)
    if done:
        plot_results(directory, spec, done, metric, goal)


SHOWN_METRICS = 3  # other result metrics in the printed / Markdown table (all in the CSV)


def trial_results(workdir: Path) -> dict[str, float]:
    """A finished trial's result metrics (its summary less run statistics), {} if unreadable."""
    try:
        return result_metrics(read_json_object(workdir / SUMMARY_FILE, "the trial summary"))
    except UsageError:
        return {}


def other_metrics(metric: str, results: list[dict[str, float]]) -> list[str]:
    """The result metrics every finished trial reports, in summary order, less `metric`."""
    if not results:
        return []
    common = set.intersection(*(set(r) for r in results))
    return [k for k in results[0] if k in common and k != metric]


def _number(value) -> str:
    return "" if value is None else f"{value:.6g}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def is_discrete(param: dict, xs: list) -> bool:
    """A parameter with a list of values (or non-numeric ones): a categorical axis."""
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    return "values" in param or "value" in param or not numeric


def plot_results(directory: Path, spec: dict, done: list[dict], metric: str, goal: str) -> None:
    """results.png: the metric against each swept parameter. Every trial is a grey point;
    for a discrete parameter, each value also gets the best trial and the median over
    the other parameters (what that value gives across the rest of the grid). Log axes
    where values span more than two decades."""
    import numpy as np

    plt = pyplot()
    names = list(spec["parameters"])
    fig, axes = plt.subplots(
        1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False, sharey=True
    )
    values = np.asarray([t["metric"] for t in done], dtype=float)
    pick = np.min if goal == "minimize" else np.max
    for ax, name in zip(axes[0], names, strict=True):
        xs = [t["params"].get(name) for t in done]
        if is_discrete(spec["parameters"][name], xs):
            categories = _ordered(spec["parameters"][name], xs)
            positions = [categories.index(to_text(x)) for x in xs]
            ax.plot(positions, values, "o", color="0.7", markersize=4, label="each trial")
            # values of the file that no finished trial has keep their tick, no point
            at = [i for i in range(len(categories)) if i in positions]
            groups = [values[[p == i for p in positions]] for i in at]
            ax.plot(at, [np.median(g) for g in groups], "s-", color="C0",
                    label="median over the other parameters")  # fmt: skip
            ax.plot(at, [pick(g) for g in groups], "v" if goal == "minimize" else "^",
                    color="C3", linestyle="none", markersize=8, label="best")  # fmt: skip
            ax.set_xticks(range(len(categories)))
            ax.set_xticklabels(categories)
            ax.set_xlim(-0.5, len(categories) - 0.5)
        else:
            numbers = np.asarray(xs, dtype=float)
            ax.plot(numbers, values, "o", color="C0", markersize=4, label="each trial")
            if (numbers > 0).all() and numbers.max() / numbers.min() > 100:
                ax.set_xscale("log")
        ax.set_xlabel(name)
    if (values > 0).all() and values.max() / values.min() > 100:
        axes[0][0].set_yscale("log")  # shared: every panel
    axes[0][0].set_ylabel(metric)
    # one legend below the panels: inside one, it would hide that panel's points
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"{directory.name}: {metric} ({goal}) over {len(done)} trials")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(directory / "results.png", buffer.getvalue())


def _ordered(param: dict, xs: list) -> list[str]:
    """The categories of a parameter as text: the sweep file's order, else sorted."""
    listed = param.get("values") or ([param["value"]] if "value" in param else [])
    seen = [to_text(v) for v in listed]
    return seen + sorted({to_text(x) for x in xs} - set(seen))


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], exit_on_error=False)
    parser.add_argument("sweep_file", nargs="?", type=Path)
    parser.add_argument("--count", type=int, help="total trials (default: the whole grid)")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes running trials at once"
    )
    parser.add_argument(
        "--no_pack",
        action="store_true",
        help="train every trial alone (default: trials that differ only in seed, learning "
        "rate, weight decay or a task's packable options train in one program)",
    )
    parser.add_argument("--sweep_dir", type=Path, help="default: sweep_runs/<file name>")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search algorithm")
    parser.add_argument(
        "--wandb",
        choices=["online", "offline", "disabled"],
        help="W&B mode of the trials (default: offline; online with --agent)",
    )
    parser.add_argument(
        "--agent",
        metavar="SWEEP_ID",
        help="run the trials of this W&B server sweep (ENTITY/PROJECT/ID from `wandb sweep`) "
        "in this process instead of searching offline; the sweep file gives the task",
    )
    parser.add_argument("--report", type=Path, metavar="DIR", help="only write the report of DIR")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option for every trial, over the sweep file's command (e.g. --set steps=500); "
        "part of the sweep's identity: resume with the same --set",
    )
    parser.add_argument(
        "--retry_failed",
        action="store_true",
        help="run the failed trials again (each resumes from its own checkpoints): for "
        "trials that a crash, a full disk or a kill ended",
    )
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise UsageError(str(err)) from None
    if args.report is None and args.sweep_file is None:
        raise UsageError("give a sweep file (or --report DIR)")
    if args.count is not None and args.count < 1:
        raise UsageError(f"--count={args.count}: must be >= 1")
    if args.workers < 1:
        raise UsageError(f"--workers={args.workers}: must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return command_exit_code(
        lambda: _main(sys.argv[1:] if argv is None else argv),
        "interrupted; rerun the same command to resume the sweep",
    )


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.report is not None:
        report(args.report)
        return 0
    spec = with_settings(load_sweep_file(args.sweep_file), args.set)
    # absolute from here on: trials and the report agree on where results are
    directory = resolve(args.sweep_dir or Path("sweep_runs") / args.sweep_file.stem)
    if args.agent:
        return run_agent(spec, args.agent, args.count, directory, args.wandb or "online")
    args.wandb = args.wandb or "offline"
    state = run_sweep(
        spec,
        directory,
        args.count,
        args.workers,
        args.seed,
        args.wandb,
        args.retry_failed,
        pack=not args.no_pack,
    )
    report(directory)
    if state.trials and not any(t["status"] == "finished" for t in state.trials):
        print(f"error: every trial failed; see {directory}/trial-*/trial.log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
