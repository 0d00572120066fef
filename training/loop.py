"""The one training loop every task uses.

A task describes its experiment as a `Problem` (model factory, loss, data,
evaluation); `fit` trains it:

* The whole training set lives on the device. Each step's batch indices come
  from a host-side sampler that depends only on (seed, step), so a resumed run
  sees exactly the batches an uninterrupted run would.
* `steps_per_call` train steps run inside one jitted `lax.scan` (metrics come
  back stacked); state buffers are donated.
* `num_seeds` replicas (seeds seed..seed+S-1) train in the same program, with
  `jax.vmap` over parameters and optimizer state.
* NaN guard: a step whose loss, gradient, new parameters or new optimizer state
  is not finite leaves the state untouched and records its step number; every
  later step is skipped. The host checks the flag before logging, evaluating and
  checkpointing, so no non-finite checkpoint is ever written, and stops with
  `RunFailed`.
* Checkpoints (orbax) every `checkpoint_every` steps and at the end; a workdir
  with checkpoints resumes from the newest readable one. The evaluation history
  and the time spent travel in the checkpoint, so a resumed run's summary and
  figures equal an uninterrupted run's (timings are summed over segments).
* Before anything is allocated, the training state's size is checked against
  the memory available, and the first compiled step's footprint before it runs
  (training.memory), so an impossible size is refused instead of hanging.

The loop itself (`run_chunks`: chunks, boundaries, guard) is shared with packed
trials (training.packing.fit_packed); what each does at a boundary (fail or stop
one trial, log to one run or to each trial's) are its `LoopHooks`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiment import interrupt
from experiment.errors import RunFailed, UsageError
from experiment.run import Run
from experiment.workdir import BEST_DIR, checkpoints_dir
from models.replicas import replica_axis
from training import memory, sharding
from training.checkpoints import Checkpoints, has_steps
from training.compile_options import rarely_run
from training.config import TrainConfig
from training.optim import make_optimizer
from training.progress import Progress
from training.sampling import EpochSampler


def take_rows(data: Any, idx: jax.Array) -> Any:
    """The default batch: rows `idx` of every array in the dataset pytree."""
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)


@dataclasses.dataclass(frozen=True)
class Problem:
    """What a task hands the trainer."""

    make_model: Callable[[nnx.Rngs], nnx.Module]
    # loss_fn(model, batch, key) -> (scalar loss, dict of scalar metrics)
    loss_fn: Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
    train_data: Any  # pytree of arrays with a leading example axis
    eval_data: Any = None
    # eval_fn(model, data) -> dict of scalar metrics (pure; jitted by the trainer)
    eval_fn: Callable[[nnx.Module, Any], dict[str, jax.Array]] | None = None
    batch_fn: Callable[[Any, jax.Array], Any] = take_rows
    select_metric: str | None = None  # eval metric that picks the best parameters
    select_mode: Literal["max", "min"] = "max"
    patience: int = 0  # evaluations without improvement before stopping early (0: never)
    divergence_hint: str = ""
    # The task's numeric options that enter the loss (and eval) as values, not shapes:
    # when given, loss_fn(model, batch, key, hp) and eval_fn(model, data, hp) get them
    # as `hp` (these Python values in a plain run; per-replica arrays when trials are
    # packed into one program, training.packing).
    hparams: dict[str, float] = dataclasses.field(default_factory=dict)
    # init_fn(model, hp): the hparams that enter the initialisation (e.g. a spectral
    # radius) applied to a model make_model just built, in place (per-replica arrays
    # when packed). None: make_model's initialisation is the whole of it.
    init_fn: Callable[[nnx.Module, dict], None] | None = None
    # A model with make_model's parameters whose code does not depend on `hparams`,
    # when make_model's does (the RNN holds its activation; eval_fn applies hp's):
    # trials that differ only in hparams then share one compiled evaluation (a study's
    # worker compiles it once, not once per activation). None: make_model's code.
    shared_model: Callable[[nnx.Rngs], nnx.Module] | None = None

    @functools.cached_property
    def shared_graphdef(self) -> Any:
        """shared_model's graphdef (None without one), traced once per problem (about
        25 ms): a run's evaluation and its figures both ask for it."""
        return None if self.shared_model is None else abstract_graphdef(self.shared_model)


def abstract_graphdef(make_model: Callable[[nnx.Rngs], nnx.Module]) -> Any:
    """The graphdef of the model `make_model` builds, traced without computing it."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make_model(nnx.Rngs(0))))
    return graphdef


def eval_graphdef(problem: Problem, graphdef: Any) -> Any:
    """The model code evaluation compiles: shared_model's when the problem has one,
    else `graphdef` (the trained model's)."""
    shared = problem.shared_graphdef
    return graphdef if shared is None else shared


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: steps taken
    params: Any  # nnx.State of the model
    opt_state: Any
    key: jax.Array  # raw uint32 PRNG key data; per-step keys are fold_in(key, step)
    bad_step: jax.Array  # int32: first step with a non-finite loss/gradient, -1 if none


@dataclasses.dataclass
class FitResult:
    """Trained parameters and what the loop measured."""

    graphdef: Any
    params: Any  # final params, or best-by-select_metric when the problem selects
    num_seeds: int
    history: list[dict[str, Any]]
    stats: dict[str, float]
    eval_fn: Callable[[Any, Any], dict[str, jax.Array]] | None = None
    # rows per chunk of the evaluations so far (each is a compiled shape)
    _eval_rows: list[int] = dataclasses.field(default_factory=list, repr=False)

    def model(self, replica: int = 0) -> nnx.Module:
        """The trained model; with several replicas, replica `replica` (seed + replica)."""
        return nnx.merge(self.graphdef, self.replica_params(replica))

    def replica_params(self, replica: int = 0) -> Any:
        """The parameters of replica `replica` (seed + replica), without a replica axis."""
        if self.num_seeds > 1:
            return jax.tree.map(lambda a: a[replica], self.params)
        if replica != 0:
            raise ValueError(f"replica={replica}: only one replica was trained")
        return self.params

    def evaluate(self, data: Any, max_rows: int = 4096) -> dict[str, np.ndarray]:
        """Eval metrics on `data`, in chunks of at most `max_rows` examples.

        eval_fn metrics must be means over examples (chunks are combined weighted by
        size). Values have shape (num_seeds,) when replicated, else are scalars.
        """
        if self.eval_fn is None:
            raise ValueError("this problem has no eval_fn")
        n = jax.tree.leaves(data)[0].shape[0]
        size = chunk_size(n, max_rows, preferred=self._eval_rows)
        if size not in self._eval_rows:
            self._eval_rows.append(size)
        totals: dict[str, np.ndarray] = {}
        for start in range(0, n, size):
            rows = min(size, n - start)
            part = jax.tree.map(lambda a, s=slice(start, start + rows): a[s], data)
            for k, v in self.eval_fn(self.params, part).items():
                totals[k] = totals.get(k, 0.0) + np.asarray(v, dtype=np.float64) * rows
        return {k: v / n for k, v in totals.items()}


def chunk_size(n: int, max_rows: int, preferred: Sequence[int] = ()) -> int:
    """Rows per evaluation chunk: the largest divisor of n up to max_rows when it is at
    least half of it (every chunk then has one shape: one compilation, not two), else
    max_rows. A `preferred` size (one already compiled, e.g. the held-out set's when the
    training set is evaluated next) is taken instead when it divides n and is at least
    half of that choice."""
    if n <= max_rows:
        own = n
    else:
        divisors = (s for s in range(max_rows, max_rows // 2 - 1, -1) if n % s == 0)
        own = next(divisors, max_rows)
    for size in preferred:
        if size <= max_rows and n % size == 0 and 2 * size >= own:
            return size
    return own


def default_steps_per_call(backend: str | None = None) -> int:
    """Train steps per jitted call when not set. CPU: 16 (1.31x the speed of one step per
    call on the default running-average run; 32 adds 2% more, BENCHMARKS.md). Other
    backends: 32, not measured here (no accelerator was available)."""
    backend = backend or jax.default_backend()
    return {"cpu": 16}.get(backend, 32)


def _base_key(seed: int) -> jax.Array:
    """Raw key data for per-step randomness (distinct from the init stream)."""
    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 0x5EED))


def _init_params(problem: Problem, seed, hp):
    model = problem.make_model(nnx.Rngs(jax.random.key(seed)))
    if problem.init_fn is not None:
        problem.init_fn(model, hp)
    return nnx.split(model)[1]


def init_train_state(
    problem: Problem, tx, cfg: TrainConfig, shapes_only: bool = False
) -> tuple[Any, TrainState]:
    """(graphdef, initial state); with num_seeds > 1 every leaf gets a leading replica axis.
    shapes_only: jax.ShapeDtypeStructs instead of arrays (a template to restore into)."""
    seeds = np.arange(cfg.seed, cfg.seed + cfg.num_seeds)
    return init_replicas(problem, tx, seeds, replicated=cfg.num_seeds > 1, shapes_only=shapes_only)


def init_replicas(
    problem: Problem, tx, seeds, replicated: bool, shapes_only: bool = False, hp=None
) -> tuple[Any, TrainState]:
    """(graphdef, initial state) of one replica per seed in `seeds` (a leading replica
    axis on every leaf when `replicated`, else the one seed's state). shapes_only: the
    state's shapes and dtypes, with nothing compiled or computed. hp: per-replica
    values of the problem's hparams (packed trials: problem.init_fn applies them);
    None: the problem's own."""

    def one(seed, values):
        params = _init_params(problem, seed, values)
        return TrainState(jnp.int32(0), params, tx.init(params), _base_key(seed), jnp.int32(-1))

    graphdef = abstract_graphdef(problem.make_model)
    seed_arg = jnp.asarray(seeds, jnp.int32) if replicated else jnp.int32(seeds[0])
    if hp is None or problem.init_fn is None:  # the problem's values, as constants

        def own(seed):
            return one(seed, problem.hparams)

        init_all = jax.jit(jax.vmap(own) if replicated else own)
        args: tuple = (seed_arg,)
    else:
        init_all = jax.jit(jax.vmap(one))
        args = (seed_arg, {k: jnp.asarray(hp[k]) for k in problem.hparams})
    # Shapes only: traced, not lowered (a resumed run restores into them).
    lowered = None if shapes_only else init_all.lower(*args)
    shapes = jax.eval_shape(init_all, *args) if lowered is None else lowered.out_info
    # Shapes are known now and nothing is allocated yet: refuse a size that cannot fit.
    memory.require(
        memory.STEP_STATE_COPIES * memory.tree_bytes(shapes),
        "training the model (parameters, optimizer state, gradients)",
    )
    if lowered is None:
        return graphdef, shapes
    # Runs once: cheap XLA optimisation cuts its compile time by a third, and without
    # the fusion emitters by another third (training.compile_options)
    options = rarely_run(xla_backend_optimization_level=0)
    return graphdef, lowered.compile(options)(*args)


def initial_model(problem: Problem, cfg: TrainConfig) -> nnx.Module:
    """The network replica 0 (seed cfg.seed) starts training from: an untrained baseline.

    Built by the same compiled program as `fit`'s initialisation, so after a fit it is
    a compilation-cache hit, where drawing the model eagerly compiles a program per
    parameter shape (about 2 s of a latent study's 4 sizes on the 2-core CPU); and it
    is exactly the trained network's starting point."""
    graphdef, state = init_train_state(problem, make_optimizer(cfg), cfg)
    params = state.params
    if cfg.num_seeds > 1:
        params = jax.tree.map(lambda a: a[0], params)
    return nnx.merge(graphdef, params)


def _cast_floats(tree, dtype):
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def task_args(problem: Problem, hp: dict | None = None) -> tuple:
    """The extra arguments of the problem's loss_fn / eval_fn: (hp,) when it has hparams
    (`hp`, per-replica values, else its own), else none."""
    if not problem.hparams:
        return ()
    return (problem.hparams if hp is None else {k: hp[k] for k in problem.hparams},)


def make_train_step(
    graphdef, problem: Problem, tx, *, compute_dtype=None, shard_batch=None, optimizer_for=None
):
    """One optimizer step with the NaN guard; pure, for use inside scan/vmap/jit.

    compute_dtype (e.g. bfloat16): parameters and batch are cast for the forward and
    backward passes; the master parameters, optimizer state and loss stay float32.
    shard_batch: a sharding constraint for the batch (data parallelism).
    optimizer_for: hp -> optimizer, for packed trials whose optimizer scalars are
    per-replica values; the step is then train_step(state, data, idx, hp).
    """

    def train_step(state: TrainState, data, idx_B, hp=None):
        batch = problem.batch_fn(data, idx_B)
        if shard_batch is not None:
            batch = shard_batch(batch)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        extra = task_args(problem, hp)

        def objective(params):
            if compute_dtype is None:
                return problem.loss_fn(nnx.merge(graphdef, params), batch, key, *extra)
            model = nnx.merge(graphdef, _cast_floats(params, compute_dtype))
            loss, aux = problem.loss_fn(model, _cast_floats(batch, compute_dtype), key, *extra)
            return loss.astype(jnp.float32), aux

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        step_tx = tx if optimizer_for is None else optimizer_for(hp)
        updates, opt_state = step_tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
        # The guard reads three scalars the step computes anyway. A finite update norm
        # (a plain sum of squares) bounds every update below 1.9e19, far under the gap
        # between float32's largest value and infinity (1e31): finite parameters stay
        # finite. An optimizer state that overflows from finite gradients (the square of
        # a huge L2-penalised gradient) is caught before any checkpoint is written
        # (`non_finite_replicas`). Checking every parameter and optimizer value here
        # cost a fifth to a quarter of a wide MLP autoencoder's step and a fifth to a
        # third of the train step's compile time (benchmarks/train_step.py).
        ok = (
            jnp.isfinite(loss)
            & jnp.isfinite(grad_norm)
            & jnp.isfinite(update_norm)
            & (state.bad_step < 0)
        )

        def keep_if_ok(new, old):
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        bad_step = jnp.where(ok | (state.bad_step >= 0), state.bad_step, state.step)
        new_state = TrainState(
            state.step + 1,
            keep_if_ok(params, state.params),
            keep_if_ok(opt_state, state.opt_state),
            state.key,
            bad_step,
        )
        metrics = dict(aux, loss=loss, grad_norm=grad_norm, update_norm=update_norm)
        return new_state, metrics

    return train_step


def non_finite_replicas(state: TrainState) -> list[int]:
    """The replicas (0 alone for a state without a replica axis) whose parameters or
    optimizer state hold a non-finite value. Checked on a host copy, as a checkpoint
    copies the state anyway: no program to compile. Every checkpoint is checked so
    (the train step's guard reads only the loss, gradient and update)."""
    replicas = int(np.prod(np.shape(state.step)))  # a scalar step: one, no replica axis
    bad: set[int] = set()
    for leaf in jax.tree.leaves(jax.device_get((state.params, state.opt_state))):
        values = np.asarray(leaf)
        if not np.issubdtype(values.dtype, np.inexact):
            continue
        finite = np.isfinite(values.reshape(replicas, -1)).all(axis=1)
        bad.update(np.flatnonzero(~finite).tolist())
    return sorted(bad)


def scan_steps(step_fn, state, idx_KxB, active_K=None):
    """K steps of step_fn(state, idx) -> (state, metrics) in one `lax.scan`.

    active_K (optional, one bool per step): an inactive step leaves the state as it was
    (a `lax.cond`, so its work is skipped) and reports zeros. A run's last, shorter
    chunk is then the same compiled program as the others instead of a second
    compilation (about 1 s on the CPU for the running-average RNN, BENCHMARKS.md).
    """
    if active_K is None:
        return jax.lax.scan(step_fn, state, idx_KxB)

    def body(s, xs):
        idx, active = xs

        def skip(s):
            shapes = jax.eval_shape(step_fn, s, idx)[1]
            return s, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

        return jax.lax.cond(active, lambda s: step_fn(s, idx), skip, s)

    return jax.lax.scan(body, state, (idx_KxB, active_K))


REPLICA_AXIS = "replicas"  # the vmap axis of replicas, named for models.replicas


def vmap_replicas(fn, in_axes):
    """jax.vmap(fn) over replicas (axis REPLICA_AXIS), traced inside
    models.replicas.replica_axis: the model may skip work that every replica can skip
    (e.g. a step of padding in every replica's batch), which a plain vmap turns into
    a select."""

    def traced(*args):
        with replica_axis(REPLICA_AXIS):
            return fn(*args)

    return jax.vmap(traced, in_axes=in_axes, axis_name=REPLICA_AXIS)


def make_chunk(train_step, replicated: bool):
    """chunk(state, data, idx_KxB, active_K=None): K train steps in one `lax.scan`
    (`scan_steps`), vmapped over replicas when there are several."""

    def chunk(state, data, idx_KxB, active_K=None):
        return scan_steps(lambda s, idx: train_step(s, data, idx), state, idx_KxB, active_K)

    if replicated:
        # active_K is shared by the replicas: the cond stays a cond under vmap
        chunk = vmap_replicas(chunk, in_axes=(0, None, 0, None))
    return jax.jit(chunk, donate_argnums=(0,))


def chunk_plan(step: int, total: int, steps_per_call: int) -> tuple[int, np.ndarray]:
    """(steps to take now, active flags of the chunk): every chunk has the same length,
    min(steps_per_call, total), and the last one leaves its surplus steps inactive."""
    length = min(steps_per_call, total)
    k = min(length, total - step)
    return k, np.arange(length) < k


def first_steps(metrics, k: int):
    """The chunk's metrics of its k active steps (the step axis is the last)."""
    return jax.tree.map(lambda m: m[..., :k], metrics)


def make_evaluator(graphdef, problem: Problem, replicated: bool):
    """evaluate(params, data): the problem's jitted eval_fn (vmapped over replicas when
    there are several), its hparams passed as arguments."""
    if problem.eval_fn is None:
        return None
    extra = task_args(problem)
    in_axes = (0, None, *[None] * len(extra)) if replicated else None
    jitted = jitted_eval(eval_graphdef(problem, graphdef), problem.eval_fn, in_axes)
    return lambda params, data: jitted(params, data, *extra)


def jitted_eval(graphdef, eval_fn, in_axes: tuple | None):
    """jit(eval_fn(merge(graphdef, params), data, *hp)), vmapped with `in_axes` if given.

    Memoised when eval_fn is a module-level function (it then depends on its arguments
    only; the task's numeric options come in as `hp`): trials of one model structure
    run one after another in one process, e.g. a study's worker, compile their
    evaluation once instead of once each. A closure is jitted afresh (its captured
    values could differ)."""
    if getattr(eval_fn, "__closure__", True) is None and "<locals>" not in eval_fn.__qualname__:
        return _memoised_eval(graphdef, eval_fn, in_axes)
    return _build_eval(graphdef, eval_fn, in_axes)


def _build_eval(graphdef, eval_fn, in_axes):
    def evaluate(params, data, *hp):
        return eval_fn(nnx.merge(graphdef, params), data, *hp)

    # runs at each evaluation boundary: compiled for a rarely run program
    # (training.compile_options)
    program = evaluate if in_axes is None else jax.vmap(evaluate, in_axes=in_axes)
    return jax.jit(program, compiler_options=rarely_run())


# A study's worker runs a few model structures; each entry is one jitted function.
_memoised_eval = functools.lru_cache(maxsize=32)(_build_eval)


@jax.jit
def _copy_tree(tree):
    """A copy of every leaf, in one compiled program (eagerly, one per leaf shape)."""
    return jax.tree.map(jnp.copy, tree)


@jax.jit
def _pick_replicas(better, new, old):
    """Per replica, `new` where `better` (shape () or (S,)), else `old`: one compiled
    program for the whole tree (eagerly, one per leaf shape: 40 ms each on the CPU)."""

    def pick(n, o):
        return jnp.where(better.reshape(better.shape + (1,) * (n.ndim - better.ndim)), n, o)

    return jax.tree.map(pick, new, old)


class _Selector:
    """Best parameters so far by an eval metric, per replica, kept on the device."""

    def __init__(self, problem: Problem, params, num_seeds: int):
        if problem.select_metric is None:
            raise ValueError("a selector needs the problem's select_metric")
        self.metric: str = problem.select_metric
        self.mode, self.patience = problem.select_mode, problem.patience
        shape = (num_seeds,) if num_seeds > 1 else ()
        worst = -np.inf if self.mode == "max" else np.inf
        self.best_value = np.full(shape, worst)
        self.best_step = np.zeros(shape, np.int64)
        self.evals_since = np.zeros(shape, np.int64)
        self.best_params = _copy_tree(params)  # the loop donates `params`' buffers

    def update(self, step: int, metrics: dict[str, np.ndarray], params) -> None:
        value = np.asarray(metrics[self.metric])
        better = value > self.best_value if self.mode == "max" else value < self.best_value
        self.best_value = np.where(better, value, self.best_value)
        self.best_step = np.where(better, step, self.best_step)
        self.evals_since = np.where(better, 0, self.evals_since + 1)
        self.best_params = _pick_replicas(jnp.asarray(better), params, self.best_params)

    def stopped_replicas(self) -> np.ndarray:
        """Per replica (shape () or (S,)): evaluations without improvement reached the
        patience."""
        return np.asarray(self.patience > 0) & (self.evals_since >= self.patience)

    def should_stop(self) -> bool:
        return bool(np.all(self.stopped_replicas()))

    def state_dict(self) -> dict:
        return dict(
            params=self.best_params,
            value=jnp.asarray(self.best_value),
            step=jnp.asarray(self.best_step),
            evals_since=jnp.asarray(self.evals_since),
        )

    def load(self, saved: dict) -> None:
        self.best_params = saved["params"]
        self.best_value = np.asarray(saved["value"])
        self.best_step = np.asarray(saved["step"])
        self.evals_since = np.asarray(saved["evals_since"])


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def _host_metrics(pending: list[dict]) -> dict[str, np.ndarray]:
    """Mean over the pending chunks' steps, per replica: {name: (S,) or ()}."""
    stacked = {k: np.concatenate([np.asarray(m[k]) for m in pending], axis=-1) for k in pending[0]}
    return {k: v.mean(axis=-1) for k, v in stacked.items()}


def _scalar_view(metrics: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    """Flat scalars for logging: the replica mean, plus one curve per replica."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v, dtype=np.float64)
        out[f"{prefix}{k}"] = float(v.mean())
        if v.ndim == 1:
            out.update({f"{prefix}{k}/seed_{i}": float(x) for i, x in enumerate(v)})
    return out


@dataclasses.dataclass
class LoopHooks:
    """What the training loop does at its boundaries, for `fit` (one run) and
    training.packing.fit_packed (each trial of a packed group). Each takes the state
    as it is at that step."""

    guard: Callable[[TrainState], None]  # act on non-finite values (fail, or stop a trial)
    log: Callable[[int, dict[str, np.ndarray], float], None]  # (step, train metrics, steps/s)
    # (step, state, compilations, scheduled); once per step. scheduled: a checkpoint
    # boundary or the end, not only an early stop
    save: Callable[[int, TrainState, int, bool], None]
    evaluate: Callable[[int, TrainState], None] | None = None
    stopped: Callable[[], bool] = lambda: False  # early stopping, or no trial left
    # a packed trial stopped early at this boundary: it needs its final checkpoint now
    stopping: Callable[[], bool] = lambda: False
    compiled: Callable[[float], None] = lambda seconds: None  # a chunk's compile time


def run_chunks(
    state: TrainState,
    cfg: TrainConfig,
    chunk,
    data,
    extra: tuple,
    samplers: list[EpochSampler],
    hooks: LoopHooks,
    progress: Progress,
    what: str,
) -> tuple[TrainState, int]:
    """Train from `state` to cfg.steps: (final state, its step). The one loop of `fit`
    and `fit_packed`.

    Steps go in chunks (`chunk_plan`) through the jitted `chunk(state, data, idx,
    active, *extra)` (one compilation per chunk length, checked against free memory
    as `what`); the batch indices come from `samplers`, one per replica (stacked when
    the state is replicated). Training metrics are logged every cfg.log_every steps,
    evaluations run every cfg.eval_every and checkpoints are saved every
    cfg.checkpoint_every, each boundary after `hooks.guard`, and all three at the end."""
    step = int(jax.device_get(state.step).max())
    steps_per_call = cfg.steps_per_call or default_steps_per_call()
    replicated = np.ndim(state.step) > 0
    compiled: dict[int, Any] = {}
    pending: list[dict] = []
    while step < cfg.steps and not hooks.stopped():
        k, active = chunk_plan(step, cfg.steps, steps_per_call)
        idx = (
            np.stack([s.indices(step, len(active)) for s in samplers])
            if replicated
            else samplers[0].indices(step, len(active))
        )
        program = compiled.get(len(active))
        if program is None:
            t0 = time.perf_counter()
            program = chunk.lower(state, data, idx, active, *extra).compile()
            compiled[len(active)] = program
            hooks.compiled(time.perf_counter() - t0)
            footprint = memory.compiled_bytes(program)
            if footprint is not None:
                memory.require(footprint, what)
        state, metrics = program(state, data, idx, active, *extra)
        interrupt.raise_if_received()  # in case a library swallowed the KeyboardInterrupt
        pending.append(first_steps(metrics, k))
        before, step = step, step + k
        end = step >= cfg.steps
        if _crossed(before, step, cfg.log_every) or end:
            hooks.guard(state)
            host = _host_metrics(pending)
            pending.clear()
            progress.update(step, float(np.mean(host["loss"])))
            hooks.log(step, host, progress.steps_per_second(step))
        if hooks.evaluate is not None and (_crossed(before, step, cfg.eval_every) or end):
            hooks.guard(state)
            hooks.evaluate(step, state)
        scheduled = _crossed(before, step, cfg.checkpoint_every) or end
        if scheduled or hooks.stopped() or hooks.stopping():
            hooks.guard(state)
            hooks.save(step, state, len(compiled), scheduled)
    hooks.guard(state)
    hooks.save(step, state, len(compiled), True)  # a step not saved yet (e.g. a resumed end)
    return state, step


def model_metrics(model: str | None, metrics: dict[str, float]) -> dict[str, float]:
    """A run's metrics as logged for one of its models: `<model>/<metric>` (one series
    per model in TensorBoard and W&B), or unchanged for a run's only model."""
    return metrics if model is None else {f"{model}/{k}": v for k, v in metrics.items()}


def fit(
    cfg: TrainConfig,
    problem: Problem,
    run: Run,
    *,
    desc: str | None = None,
    model: str | None = None,
) -> FitResult:
    """Train `problem` as `cfg` says, logging to `run`; resumes from the workdir's checkpoints.

    model: a name for each model of a task that trains several: its checkpoints go to
    WORKDIR/checkpoints/<model>, and its metrics are logged as `<model>/<metric>`, so
    TensorBoard and W&B show one complete series per model (their steps restart at 0).
    """
    tx = make_optimizer(cfg)
    replicated = cfg.num_seeds > 1
    mesh = sharding.data_mesh(cfg.batch_size, cfg.num_seeds)
    # A run that will resume needs only the state's shapes to restore into: computing
    # the initial state (a compile and a run) is skipped. (On one device, without a
    # selector, whose best-so-far copy needs real arrays.)
    restoring = (
        mesh is None
        and not problem.select_metric
        and has_steps(checkpoints_dir(run.workdir, model))
    )
    graphdef, state = init_train_state(problem, tx, cfg, shapes_only=restoring)
    if not restoring:
        state = sharding.split_replicas(state, mesh, cfg.num_seeds)
    train_data = sharding.replicate(problem.train_data, mesh)
    eval_data = None if problem.eval_data is None else sharding.replicate(problem.eval_data, mesh)
    num_examples = jax.tree.leaves(train_data)[0].shape[0]
    samplers = [
        EpochSampler(num_examples, cfg.batch_size, cfg.seed + r) for r in range(cfg.num_seeds)
    ]
    shard_batch = sharding.batch_constraint(mesh) if not replicated else None
    compute_dtype = None if cfg.dtype == "float32" else jnp.dtype(cfg.dtype)
    train_step = make_train_step(
        graphdef, problem, tx, compute_dtype=compute_dtype, shard_batch=shard_batch
    )
    chunk = make_chunk(train_step, replicated)
    evaluate = make_evaluator(graphdef, problem, replicated)
    selector = _Selector(problem, state.params, cfg.num_seeds) if problem.select_metric else None
    if selector is not None and evaluate is None:
        raise ValueError("select_metric needs an eval_fn")

    checkpoints = Checkpoints(checkpoints_dir(run.workdir, model), keep=cfg.keep_checkpoints)
    saved_config = {"task": run.task, "config": run.config_dict}
    try:
        state, spent = _maybe_resume(checkpoints, state, selector)
        if restoring and isinstance(state.step, jax.ShapeDtypeStruct):
            _, state = init_train_state(problem, tx, cfg)  # nothing restored after all
    except BaseException:
        checkpoints.close()  # a refused resume leaves no orbax thread behind
        raise
    step = int(jax.device_get(state.step).max())
    history: list[dict[str, Any]] = spent.history
    last_saved = checkpoints.latest_step()
    progress = Progress(cfg.steps, start=step, desc=desc or run.task, enabled=run.primary)
    segment = _Segment(spent)

    def log(at_step: int, metrics: dict[str, float]) -> None:
        run.log(at_step, model_metrics(model, metrics))

    # What the newest checkpoint records; the summary reports the same numbers, so a
    # rerun of a finished command (which trains nothing) reproduces them exactly.
    totals = dataclasses.asdict(spent)
    # A run resumed after it stopped early stays stopped: a rerun of the finished
    # command trains nothing (training on would rewrite its checkpoints and summary).
    stopped_early = selector is not None and selector.should_stop()

    def diverged(what: str, replica: int) -> RunFailed:
        where = f" (replica {replica}, seed {cfg.seed + replica})" if replicated else ""
        kept = (
            f"the last good checkpoint (step {last_saved}) is intact in {checkpoints.directory}"
            if last_saved is not None
            else "no checkpoint was written"
        )
        hint = f" {problem.divergence_hint}" if problem.divergence_hint else ""
        return RunFailed(
            f"{what}{where}; {kept}. Try a lower --learning_rate (now {cfg.learning_rate:g}) "
            f"or gradient clipping (--clip_grad_norm=1.0) in a new --workdir.{hint}"
        )

    def guard(state: TrainState) -> None:
        bad = np.atleast_1d(jax.device_get(state.bad_step))
        if (bad >= 0).any():
            replica = int(np.argmax(bad >= 0))
            raise diverged(f"non-finite loss, gradient or update at step {int(bad[replica])}",
                           replica)  # fmt: skip

    def log_train(at_step: int, metrics: dict[str, np.ndarray], rate: float) -> None:
        log(at_step, dict(_scalar_view(metrics, "train_"), steps_per_second=rate))

    def evaluate_at(at_step: int, state: TrainState) -> None:
        nonlocal stopped_early
        assert evaluate is not None
        ev = {k: np.asarray(v) for k, v in evaluate(state.params, eval_data).items()}
        history.append(dict(step=at_step, **{k: v.tolist() for k, v in ev.items()}))
        log(at_step, _scalar_view(ev, "eval_"))
        if selector is not None:
            selector.update(at_step, ev, state.params)
            if selector.should_stop():
                stopped_early = True

    def save(at_step: int, state: TrainState, compilations: int, scheduled: bool) -> None:
        nonlocal last_saved, totals
        del scheduled  # one run saves at every boundary it is asked to (an early stop too)
        if last_saved == at_step:
            return
        bad = non_finite_replicas(state)
        if bad:
            raise diverged(f"non-finite parameters or optimizer state by step {at_step}", bad[0])
        totals = segment.totals(history, compilations)
        best = None if selector is None else selector.state_dict()
        checkpoints.save(
            at_step, state.params, _train_state_dict(state, best), saved_config, totals
        )
        last_saved = at_step

    def add_compile_time(seconds: float) -> None:
        segment.compile_seconds += seconds

    hooks = LoopHooks(
        guard=guard,
        log=log_train,
        save=save,
        evaluate=None if evaluate is None else evaluate_at,
        stopped=lambda: stopped_early,
        compiled=add_compile_time,
    )
    try:
        state, step = run_chunks(
            state, cfg, chunk, train_data, (), samplers, hooks, progress,
            f"a train step (batch {cfg.batch_size})",
        )  # fmt: skip
    finally:
        progress.close()
        checkpoints.wait()
        checkpoints.close()
    stats = dict(
        steps=step,
        train_seconds=totals["train_seconds"],
        compile_seconds=totals["compile_seconds"],
        steps_per_second=step / max(totals["loop_seconds"], 1e-9),
        steps_per_call=cfg.steps_per_call or default_steps_per_call(),
        compilations=totals["compilations"],
        devices=jax.device_count(),
    )
    final_params = state.params if selector is None else selector.best_params
    if selector is not None:
        stats.update(best_step=selector.best_step.tolist(), stopped_early=stopped_early)
        _export_best(run, selector, state, saved_config)
    return FitResult(
        graphdef,
        final_params,
        cfg.num_seeds,
        history,
        stats,
        evaluate,  # the same compiled evaluator the loop used
    )


def _train_state_dict(state: TrainState, best: dict | None) -> dict:
    """What a checkpoint's `train_state` item holds (and what a restore fills in); `best`:
    the selector's state (`_Selector.state_dict`), when the problem selects."""
    saved = dict(opt_state=state.opt_state, step=state.step, key=state.key, bad_step=state.bad_step)
    if best is not None:
        saved["best"] = best
    return saved


@dataclasses.dataclass
class _Spent:
    """What earlier segments of a resumed run measured (from the checkpoint)."""

    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    compile_seconds: float = 0.0
    loop_seconds: float = 0.0
    compilations: int = 0

    @classmethod
    def from_saved(cls, saved: dict | None) -> _Spent:
        if not saved:  # a checkpoint from before progress was saved
            return cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in fields})


class _Segment:
    """Time spent in this process's part of the run, added to the earlier segments'."""

    def __init__(self, spent: _Spent):
        self.spent = spent
        self.start = time.perf_counter()
        self.compile_seconds = 0.0

    def totals(self, history: list[dict[str, Any]], compilations: int) -> dict[str, Any]:
        loop = time.perf_counter() - self.start
        return dict(
            history=list(history),  # a copy: orbax serialises it later, in another thread
            train_seconds=self.spent.train_seconds + loop - self.compile_seconds,
            compile_seconds=self.spent.compile_seconds + self.compile_seconds,
            loop_seconds=self.spent.loop_seconds + loop,
            compilations=self.spent.compilations + compilations,
        )


def _export_best(run: Run, selector: _Selector, state: TrainState, saved_config: dict) -> None:
    """WORKDIR/best/<step>: the selected parameters, for prediction and probing."""
    best = Checkpoints(run.workdir / BEST_DIR, keep=1)
    try:
        step = int(np.max(selector.best_step))
        if best.latest_step() != step:
            best.save(step, selector.best_params, _train_state_dict(state, None), saved_config)
            best.wait()
    finally:
        best.close()


def _maybe_resume(
    checkpoints: Checkpoints, state: TrainState, selector: _Selector | None
) -> tuple[TrainState, _Spent]:
    """The newest readable checkpoint's state and progress, or (`state`, nothing spent).

    The caller has checked that the checkpoints were written under this config
    (train.start_run), so a step that fails to restore is damaged, not foreign: it is
    moved aside with a note and the next older one is tried.
    """
    template = _train_state_dict(state, None if selector is None else selector.state_dict())
    for step in sorted(checkpoints.all_steps(), reverse=True):
        try:
            params, saved, progress = checkpoints.restore(step, state.params, template)
        except Exception as err:  # orbax raises many types for damaged files
            moved = checkpoints.quarantine(step)
            print(
                f"note: checkpoint step {step} in {checkpoints.directory} is unreadable "
                f"({type(err).__name__}); moved it to {moved.name} and trying an older one",
                flush=True,
            )
            continue
        if selector is not None:
            selector.load(saved["best"])
        print(f"resuming from checkpoint step {step} in {checkpoints.directory}", flush=True)
        resumed = TrainState(
            saved["step"], params, saved["opt_state"], saved["key"], saved["bad_step"]
        )
        return resumed, _Spent.from_saved(progress)
    if any(checkpoints.directory.glob("*.unreadable*")):
        raise UsageError(
            f"no readable checkpoint in {checkpoints.directory} (the damaged ones were moved "
            "to *.unreadable); remove them to start over, or choose another --workdir"
        )
    return state, _Spent()
