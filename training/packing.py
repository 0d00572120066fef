"""Trials packed into one compiled program: a generalisation of `num_seeds` from seeds
to (trial x seed).

Trials whose configs differ only in options that change neither array shapes nor
the program's structure train as replicas of one `jax.vmap`-ed, jitted step. What
differs between them enters the step as per-replica arrays:

* the seed (initial parameters, per-step keys and the batch order, as in `num_seeds`);
* the optimizer's scalars: `learning_rate` and `weight_decay` (the optax chain is built
  inside the vmapped step from the replica's values, training.optim.make_optimizer);
* the task's numeric options that enter the loss or the initialisation
  (`Problem.hparams`, listed by the task module as PACKABLE), e.g. the denoising
  noise level, the last-step-only loss as a 0/1 weight, the RNN's activation as
  an index (every candidate computed, the chosen one kept), a dropout rate, or a
  spectral radius that `Problem.init_fn` applies to each replica's initial weights.

Every trial keeps its own workdir: `fit_packed` writes each trial's checkpoints
(parameters, optimizer state, evaluation history and timings) exactly where and as
its own `fit` would, and logs its series to its own TensorBoard / W&B run. The
trial's ordinary run (train.main) then resumes from its final checkpoint, trains
nothing, and writes the summary and figures; so `linear_probe`, `predict` and a
resume read a packed trial like any other.

Selection and early stopping per trial (a problem with `select_metric`): one
selector keeps every replica's best parameters; a trial whose replicas all ran out
of patience writes its final checkpoint at that step, as its own run would, and is
handed on while its neighbours train on (its replicas keep running in the program,
unread). A group resumed after some of its trials stopped trains only the others.

NaN guard per trial: a trial whose replica goes non-finite stops being logged and
checkpointed (its last finite checkpoint stays) while its neighbours train on; its
own run then resumes from that checkpoint, diverges again, and fails as it would
alone.

A task takes part by defining `training_problem(cfg) -> (train_cfg, Problem)` (the
one `fit` of its run that packing replaces), `PACKABLE` and optionally
`ignored_options(cfg)` (options the configuration does not use) and `packs(cfg)`
(False: this configuration trains alone, e.g. it does not train, or packing it was
measured to be slower).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiment import interrupt
from experiment.config import to_dict
from experiment.run import Run
from experiment.workdir import checkpoints_dir
from training.checkpoints import Checkpoints
from training.config import MAX_REPLICAS, TrainConfig
from training.loop import (
    LoopHooks,
    Problem,
    TrainState,
    _scalar_view,
    _Segment,
    _Selector,
    _Spent,
    _train_state_dict,
    eval_graphdef,
    init_replicas,
    jitted_eval,
    make_train_step,
    model_metrics,
    non_finite_replicas,
    run_chunks,
    scan_steps,
    task_args,
    vmap_replicas,
)
from training.optim import make_optimizer
from training.progress import Progress
from training.sampling import EpochSampler

# Options of every training task that pack (enter the step as per-replica values).
GENERIC_PACKABLE = ("seed", "learning_rate", "weight_decay")


class PackingUnavailable(Exception):
    """These trials cannot train packed (e.g. different data or progress); run them alone."""


def packable_options(module: ModuleType) -> tuple[str, ...]:
    """The options of a task whose values pack, () for a task that cannot pack."""
    if not hasattr(module, "training_problem"):
        return ()
    return (*GENERIC_PACKABLE, *module.PACKABLE)


def group_key(task: str, module: ModuleType, cfg) -> str | None:
    """Trials with equal keys train packed; None for a task that does not pack.

    The key is the config less the packable options and the options this
    configuration ignores, plus whether weight decay is on (the optimizer chain's
    structure, hence the checkpoint's, depends on it)."""
    packable = packable_options(module)
    if not packable or (hasattr(module, "packs") and not module.packs(cfg)):
        return None
    ignored = module.ignored_options(cfg) if hasattr(module, "ignored_options") else set()
    return json.dumps([task, _structure(cfg, {*packable, *ignored})], sort_keys=True, default=str)


def _structure(cfg, packable: set[str]) -> dict:
    """What must be equal for configs to pack: every option but `packable`, and whether
    weight decay is on (the optimizer chain's structure, hence the checkpoint's)."""
    key = {k: v for k, v in to_dict(cfg).items() if k not in packable}
    key["weight_decay_on"] = cfg.weight_decay > 0
    return key


@dataclasses.dataclass
class Member:
    """One trial of a packed group: its training config, problem and open run."""

    cfg: TrainConfig
    problem: Problem
    run: Run
    model: str | None = None  # one of the run's several models (fit's `model`)
    diverged_at: int | None = None  # first non-finite step, once seen

    @property
    def name(self) -> str:
        """How notes name it: the model of a run's several, else the trial's workdir."""
        return self.model or self.run.workdir.name


def _same_arrays(a: Any, b: Any) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(  # type: ignore[operator]
        np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def _check_compatible(members: list[Member]) -> None:
    lead = members[0]
    for m in members[1:]:
        if m.cfg.num_seeds != lead.cfg.num_seeds or m.cfg.steps != lead.cfg.steps:
            raise PackingUnavailable("different num_seeds or steps")
        if not (
            _same_arrays(m.problem.train_data, lead.problem.train_data)
            and _same_arrays(m.problem.eval_data, lead.problem.eval_data)
        ):
            raise PackingUnavailable("the trials' data differ")
        selection = ("select_metric", "select_mode", "patience")
        if any(getattr(m.problem, a) != getattr(lead.problem, a) for a in selection):
            raise PackingUnavailable("the trials select or stop early differently")
    if lead.problem.select_metric is not None and lead.problem.eval_fn is None:
        raise PackingUnavailable("select_metric needs an eval_fn")


def _replica_values(members: list[Member], seeds_per: int) -> dict[str, np.ndarray]:
    """Per-replica hyperparameters, float32 (R,): each trial's values, once per seed."""
    names = ["learning_rate", "weight_decay", *members[0].problem.hparams]

    def value(m: Member, name: str) -> float:
        if name in ("learning_rate", "weight_decay"):
            return float(getattr(m.cfg, name))
        return float(m.problem.hparams[name])

    return {n: np.repeat([value(m, n) for m in members], seeds_per).astype(np.float32)
            for n in names}  # fmt: skip


def _member_slice(tree: Any, index: int, seeds_per: int) -> Any:
    """Member `index`'s part of a replicated tree, shaped as its own run's (no replica
    axis with one seed)."""
    if seeds_per == 1:
        return jax.tree.map(lambda a: a[index], tree)
    return jax.tree.map(lambda a: a[index * seeds_per : (index + 1) * seeds_per], tree)


def fit_packed(
    members: list[Member], desc: str = "packed", on_trained: Callable[[int], None] | None = None
) -> None:
    """Train `members` as replicas of one program, writing each one's checkpoints and
    logs as its own `fit` would (see the module docstring). Resumes from the newest
    step every member's checkpoints hold; raises PackingUnavailable when they cannot
    pack (then each trial's own run trains it).

    on_trained(i): member i's final checkpoint is on disk (its checkpoint manager
    closed), while the members after it may still be saving theirs: a study's worker
    hands the trial on to be finished at once."""
    _check_compatible(members)
    lead = members[0]
    cfg, problem = lead.cfg, lead.problem
    seeds_per = cfg.num_seeds
    seeds = np.concatenate([np.arange(m.cfg.seed, m.cfg.seed + seeds_per) for m in members])
    hp = {k: jnp.asarray(v) for k, v in _replica_values(members, seeds_per).items()}
    tx = make_optimizer(cfg)  # the structure; each replica's values enter in the step
    graphdef, state = init_replicas(problem, tx, seeds, replicated=True, hp=hp)
    # best parameters per replica, and each trial's early stop (per trial, as alone)
    selector = _Selector(problem, state.params, len(seeds)) if problem.select_metric else None
    stores = [Checkpoints(checkpoints_dir(m.run.workdir, m.model), keep=m.cfg.keep_checkpoints)
              for m in members]  # fmt: skip
    closed: set[int] = set()

    def close(i: int) -> None:
        closed.add(i)
        stores[i].wait()
        stores[i].close()

    def trained(i: int) -> None:
        close(i)
        if on_trained is not None:
            on_trained(i)

    try:
        _train(members, stores, graphdef, state, selector, tx, hp, seeds, desc, trained)
    finally:
        for i in range(len(stores)):
            if i not in closed:
                close(i)


def fit_models_packed(run: Run, models: list[tuple[TrainConfig, Problem, str | None]]) -> None:
    """Train a run's several models (`fit`'s `model`, e.g. one per weight decay) packed,
    ahead of the task's own `fit` of each, which then resumes from the model's final
    checkpoint and trains nothing (as a packed trial's own run does).

    Models whose configs differ only in seed, learning rate and weight decay train as
    replicas of one program (up to MAX_REPLICAS replicas), each model's checkpoints and
    series written where its own `fit` would write them. A model without a partner,
    models that cannot pack (said in one line) and a run on several devices (`fit`
    splits its batch over them; packing does not) are left to their own `fit`."""
    if jax.device_count() > 1:
        return
    groups: dict[str, list[Member]] = {}
    for cfg, problem, model in models:
        key = json.dumps(_structure(cfg, set(GENERIC_PACKABLE)), sort_keys=True, default=str)
        groups.setdefault(key, []).append(Member(cfg, problem, run, model))
    for group in groups.values():
        limit = max(1, MAX_REPLICAS // group[0].cfg.num_seeds)
        for start in range(0, len(group), limit):
            part = group[start : start + limit]
            if len(part) < 2:
                continue
            try:
                fit_packed(part, desc=f"{run.task} x{len(part)}")
            except PackingUnavailable as err:
                names = ", ".join(m.name for m in part)
                print(f"note: {names} not packed ({err}); each trains alone", flush=True)


def _resume(members, stores, state: TrainState, selector: _Selector | None, seeds_per: int):
    """(state, what each member spent) from the members' checkpoints, all at one step
    (and `selector` loaded from theirs)."""
    saved_steps = [set(store.all_steps()) for store in stores]
    if not any(saved_steps):
        return state, [_Spent() for _ in members]
    # The newest step every member has: a kill between two members' saves leaves the
    # group one checkpoint apart (each keeps keep_checkpoints >= 1 older ones).
    common = set.intersection(*saved_steps)
    if not common:
        newest = [max(steps, default=None) for steps in saved_steps]
        raise PackingUnavailable(f"the trials' checkpoints have no step in common ({newest})")
    step = max(common)
    parts, bests, spent = [], [], []
    for i, store in enumerate(stores):
        template = _member_slice(state, i, seeds_per)
        best = None if selector is None else _member_slice(selector.state_dict(), i, seeds_per)
        try:
            params, saved, progress = store.restore(
                step, template.params, _train_state_dict(template, best)
            )
        except Exception as err:  # damaged: the trial's own run moves it aside
            raise PackingUnavailable(f"a checkpoint is unreadable ({type(err).__name__})") from None
        parts.append(TrainState(saved["step"], params, saved["opt_state"], saved["key"],
                                saved["bad_step"]))  # fmt: skip
        bests.append(saved.get("best"))
        spent.append(_Spent.from_saved(progress))
    stack = (lambda *xs: jnp.stack(xs)) if seeds_per == 1 else (lambda *xs: jnp.concatenate(xs))
    if selector is not None:
        selector.load(jax.tree.map(stack, *bests))
    print(f"resuming {len(members)} packed trials from step {step}", flush=True)
    return jax.tree.map(stack, *parts), spent


def _train(members, stores, graphdef, state, selector, tx, hp, seeds, desc, trained) -> None:
    lead = members[0]
    cfg, problem = lead.cfg, lead.problem
    seeds_per = cfg.num_seeds
    state, spent = _resume(members, stores, state, selector, seeds_per)
    train_data, eval_data = problem.train_data, problem.eval_data
    num_examples = jax.tree.leaves(train_data)[0].shape[0]
    samplers = [EpochSampler(num_examples, cfg.batch_size, int(s)) for s in seeds]
    compute_dtype = None if cfg.dtype == "float32" else jnp.dtype(cfg.dtype)

    def optimizer_for(values):
        return make_optimizer(cfg, values["learning_rate"], values["weight_decay"])

    train_step = make_train_step(
        graphdef, problem, tx, compute_dtype=compute_dtype, optimizer_for=optimizer_for
    )

    def chunk_fn(s, data, idx_KxB, active_K, values):
        return scan_steps(lambda c, idx: train_step(c, data, idx, values), s, idx_KxB, active_K)

    chunk = jax.jit(vmap_replicas(chunk_fn, in_axes=(0, None, 0, None, 0)), donate_argnums=(0,))
    evaluate = None
    if problem.eval_fn is not None:
        hp_axes = (0,) if problem.hparams else ()  # per-replica values, when it takes any
        evaluate = jitted_eval(
            eval_graphdef(problem, graphdef), problem.eval_fn, (0, None, *hp_axes)
        )

    step = int(jax.device_get(state.step).max())
    histories = [s.history for s in spent]
    segments = [_Segment(s) for s in spent]
    last_saved = [store.latest_step() for store in stores]
    # steps a member already holds: one ahead of the group's resume point was written
    # by the same program from the same state, and is not written again
    held = [set(store.all_steps()) for store in stores]
    progress = Progress(cfg.steps, start=step, desc=desc)
    finished: set[int] = set()  # members whose final checkpoint is written
    stopping: set[int] = set()  # members that stopped early at this boundary

    def alive() -> list[int]:
        """Members still training: not diverged, final checkpoint not yet written."""
        return [i for i, m in enumerate(members) if m.diverged_at is None and i not in finished]

    def stopped_members() -> list[int]:
        """Members whose every replica ran out of patience (an early stop, as alone)."""
        if selector is None:
            return []
        done = selector.stopped_replicas().reshape(len(members), seeds_per).all(axis=1)
        return [i for i in alive() if done[i]]

    def guard(state: TrainState) -> None:
        """Stop following members whose replicas went non-finite (per trial)."""
        bad = np.asarray(jax.device_get(state.bad_step)).reshape(len(members), seeds_per)
        for i in alive():
            if (bad[i] >= 0).any():
                members[i].diverged_at = int(bad[i][bad[i] >= 0].min())
                print(
                    f"note: {members[i].name} went non-finite at step "
                    f"{members[i].diverged_at}; stopped it (last checkpoint: step "
                    f"{last_saved[i]}); the other packed trials go on",
                    flush=True,
                )

    def metrics_of(values: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
        return {k: _member_slice(v, i, seeds_per) for k, v in values.items()}

    def log(at_step: int, host: dict[str, np.ndarray], rate: float) -> None:
        for i in alive():
            view = dict(_scalar_view(metrics_of(host, i), "train_"), steps_per_second=rate)
            members[i].run.log(at_step, model_metrics(members[i].model, view))

    def evaluate_at(at_step: int, state: TrainState) -> None:
        assert evaluate is not None
        values = evaluate(state.params, eval_data, *task_args(problem, hp))
        ev = {k: np.asarray(v) for k, v in values.items()}
        for i in alive():
            mine = metrics_of(ev, i)
            histories[i].append(dict(step=at_step, **{k: v.tolist() for k, v in mine.items()}))
            view = _scalar_view(mine, "eval_")
            members[i].run.log(at_step, model_metrics(members[i].model, view))
        if selector is not None:
            selector.update(at_step, ev, state.params)
            stopping.update(stopped_members())

    def save(at_step: int, state: TrainState, compilations: int, scheduled: bool) -> None:
        with interrupt.deferred():  # a Ctrl-C does not split the group's checkpoints
            # one copy to the host, sliced there: a device slice per leaf and member
            # was a dispatch each (a second per save of 16 linear autoencoders)
            host = None
            for i in alive():
                # a member saves where its own run would: at its checkpoint boundaries,
                # at the end, and where it stops early (not where a neighbour stopped)
                if not (scheduled or i in stopping):
                    continue
                if not (last_saved[i] == at_step or at_step in held[i]):
                    host = host_copy(state) if host is None else host
                    if not save_member(i, at_step, host, compilations):
                        continue
                if at_step >= cfg.steps or i in stopping:
                    finish(i)
            stopping.clear()

    def host_copy(state: TrainState):
        """(state, selector state or None) on the host."""
        return jax.device_get((state, None if selector is None else selector.state_dict()))

    def finish(i: int) -> None:
        finished.add(i)  # its training is complete and on disk
        trained(i)

    def save_member(i: int, at_step: int, host, compilations: int) -> bool:
        """Write member i's checkpoint; False (and the member stopped) when its state is
        not finite (what the step's guard does not read: see make_train_step)."""
        m = members[i]
        host_state, host_best = host
        mine: TrainState = _member_slice(host_state, i, seeds_per)
        best = None if host_best is None else _member_slice(host_best, i, seeds_per)
        if non_finite_replicas(mine):
            m.diverged_at = at_step
            print(f"note: {m.name}'s parameters or optimizer state are non-finite "
                  f"by step {at_step}; stopped it (last checkpoint: step {last_saved[i]}); "
                  "the other packed trials go on", flush=True)  # fmt: skip
            return False
        mine, best = jax.tree.map(jnp.asarray, (mine, best))
        stores[i].save(
            at_step,
            mine.params,
            _train_state_dict(mine, best),
            {"task": m.run.task, "config": m.run.config_dict},
            segments[i].totals(histories[i], compilations),
        )
        last_saved[i] = at_step
        return True

    def add_compile_time(seconds: float) -> None:
        for seg in segments:
            seg.compile_seconds += seconds

    hooks = LoopHooks(
        guard=guard,
        log=log,
        save=save,
        evaluate=None if evaluate is None else evaluate_at,
        stopped=lambda: not alive(),
        stopping=lambda: bool(stopping),
        compiled=add_compile_time,
    )
    for i in stopped_members():  # resumed after they stopped early: nothing to train
        print(f"note: {members[i].name} stopped early before; not trained on",
              flush=True)  # fmt: skip
        finish(i)
    try:
        run_chunks(state, cfg, chunk, train_data, (hp,), samplers, hooks, progress,
                   f"a packed train step ({len(seeds)} replicas)")  # fmt: skip
    finally:
        progress.close()
