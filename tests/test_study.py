"""The study executor and packing: packed trials equal separate runs, per-trial NaN guard,
worker death, resume of a packed study."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import ClassVar

import jax
import numpy as np
import pytest
import yaml

from experiment.config import build_config
from experiment.run import Run
from tasks import autoencoder, grad_flow, linear_ae, running_average, surnames
from tests.conftest import REPO, TINY_ARGS, shared_data
from training.loop import fit
from training.packing import Member, fit_packed, group_key

RA = [*TINY_ARGS["running_average"], "--steps=40", "--log_every=8", "--eval_every=16"]
AE = [*TINY_ARGS["autoencoder"], "--steps=40", "--log_every=8", "--eval_every=16"]
GF = ["--steps=40", "--log_every=8", "--eval_every=16", "--hidden_size=8", "--seq_len=8",
      "--num_train=256", "--probe_batch=8"]  # fmt: skip


def tokens(args):
    return dict(a[2:].split("=", 1) for a in args)


def config(module, args, **changes):
    return build_config(module.Config, {**tokens(args), **{k: str(v) for k, v in changes.items()}})


def member(module, cfg, workdir, task):
    train_cfg, problem = module.training_problem(cfg)
    return Member(train_cfg, problem, Run(task, cfg, workdir))


def trained(module, cfg, workdir, task):
    """fit on `workdir` as the trial's own run would: trains, or resumes a packed result."""
    train_cfg, problem = module.training_problem(cfg)
    run = Run(task, cfg, workdir)
    try:
        return fit(train_cfg, problem, run)
    finally:
        run.close()


def pack(module, task, cfgs, workdirs) -> list[Member]:
    """fit_packed the trials `cfgs` in `workdirs`; their runs closed after."""
    members = [member(module, c, w, task) for c, w in zip(cfgs, workdirs, strict=True)]
    try:
        fit_packed(members)
    finally:
        for m in members:
            m.run.close()
    return members


def assert_same_training(packed, alone, rtol=1e-4, atol=1e-6):
    for a, b in zip(jax.tree.leaves(packed.params), jax.tree.leaves(alone.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)
    assert [h["step"] for h in packed.history] == [h["step"] for h in alone.history]
    for p, s in zip(packed.history, alone.history, strict=True):
        for k in s:
            np.testing.assert_allclose(p[k], s[k], rtol=rtol, atol=atol)


# every packable option of every packing task, with two values that must both train right
CASES = [
    (running_average, "running_average", RA, "seed", (0, 7)),
    (running_average, "running_average", RA, "learning_rate", (3e-3, 3e-2)),
    (running_average, "running_average", [*RA, "--weight_decay=1e-4"], "weight_decay",
     (1e-4, 1e-2)),
    (running_average, "running_average", RA, "last_step_only", (False, True)),
    (running_average, "running_average", RA, "activation", ("tanh", "relu", "identity")),
    (autoencoder, "autoencoder", [*AE, "--kind=denoising"], "noise_std", (0.1, 0.8)),
    pytest.param(autoencoder, "autoencoder", [*AE, "--kind=masked"], "mask_ratio", (0.25, 0.75),
                 marks=pytest.mark.slow),
    (linear_ae, "linear_ae", ["--steps=40", "--eval_every=16", "--num_train=500"], "weight_decay",
     (1e-3, 1e-1)),
    # none (the initialisation's own) packs with radii: a 0 in the replica's values
    (grad_flow, "grad_flow", GF, "spectral_radius", ("none", 0.9, 1.2)),
]  # fmt: skip


@pytest.mark.parametrize(
    "module,task,args,option,values",
    CASES,
    ids=[
        "seed",
        "learning_rate",
        "weight_decay",
        "last_step_only",
        "activation",
        "noise_std",
        "mask_ratio",
        "linear_ae_lambda",
        "spectral_radius",
    ],
)
def test_packed_trials_equal_the_same_trials_run_alone(
    tmp_path, module, task, args, option, values
):
    cfgs = [config(module, args, **{option: v}) for v in values]
    keys = {group_key(task, module, c) for c in cfgs}
    assert len(keys) == 1 and None not in keys  # the option packs
    pack(module, task, cfgs, [tmp_path / f"packed{i}" for i in range(len(cfgs))])
    results = []
    for i, c in enumerate(cfgs):
        packed = trained(module, c, tmp_path / f"packed{i}", task)
        assert packed.stats["steps"] == 40
        alone = trained(module, c, tmp_path / f"alone{i}", task)
        assert_same_training(packed, alone)
        results.append(packed)
    # the values gave different trainings
    first, *others = (jax.tree.leaves(r.params)[0] for r in results)
    assert not any(np.allclose(first, other) for other in others)


def test_group_keys_split_what_changes_the_program_and_join_what_does_not():
    def key(**kw):
        return group_key("running_average", running_average, config(running_average, RA, **kw))

    assert key(cell="lstm", activation="tanh") == key(cell="lstm", activation="relu")  # unused
    assert key(cell="rnn", activation="tanh") == key(cell="rnn", activation="relu")  # packs
    assert key(cell="rnn") != key(cell="lstm")
    assert key(hidden_size=8) != key(hidden_size=9)
    assert key(steps=40) != key(steps=41)
    assert key(weight_decay=0) != key(weight_decay=1e-3)  # the optimizer chain differs
    assert key(weight_decay=1e-3) == key(weight_decay=1e-2)

    def surnames_key(**kw):
        return group_key("surnames", surnames, surnames.Config(**kw))

    plain = surnames_key(ngram_buckets=0)
    assert plain == surnames_key(ngram_buckets=0, dropout=0.5, label_smoothing=0.2)
    assert surnames_key(ngram_buckets=0, ngram_max=3, ngram_dim=8) == plain  # unused
    assert surnames_key(ngram_buckets=0, patience=2) != plain  # the early stop is the rule
    assert surnames_key(ngram_buckets=0, class_balanced=True) != plain  # what it selects by
    assert surnames_key() is None  # the n-gram bag: measured slower packed, alone

    def flow_key(**kw):
        return group_key("grad_flow", grad_flow, config(grad_flow, GF, **kw))

    assert flow_key(spectral_radius=0.5) == flow_key(probe_batch=64)  # packs; unused
    assert flow_key(steps=0) is None  # no training: nothing to pack


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


SURNAMES = [*("--cell=rnn", "--hidden_size=16", "--embedding_dim=8", "--steps=64"),
            *("--eval_every=8", "--log_every=8", "--checkpoint_every=16", "--keep_checkpoints=8"),
            *("--learning_rate=1e-2", "--ngram_buckets=0", "--patience=1")]  # fmt: skip


def test_surnames_trials_pack_with_their_own_selection_and_early_stop(tmp_path):
    """Dropout and label smoothing pack; each trial keeps its own best parameters and stops
    early where it would alone (its final checkpoint written then, the others training
    on); a group resumed after some of its trials stopped trains only the others."""
    import shutil

    args = [f"--data_dir={shared_data('names')}", *SURNAMES]
    # the defaults: dropout 0.5, label smoothing 0.1
    values = [dict(dropout=0.0, label_smoothing=0.0), dict(learning_rate=3e-3)]
    cfgs = [config(surnames, args, **v) for v in values]
    assert len({group_key("surnames", surnames, c) for c in cfgs}) == 1
    workdirs = [tmp_path / f"packed{i}" for i in range(len(cfgs))]
    pack(surnames, "surnames", cfgs, workdirs)
    ends = [checkpoint_steps(w)[-1] for w in workdirs]
    # the premise: some trials stop early, some run to the end
    assert min(ends) < 64 and max(ends) == 64, ends
    # as if killed after the first stops: the group resumes from their step
    for w in workdirs:
        for step in checkpoint_steps(w):
            if step > min(ends):
                shutil.rmtree(w / "checkpoints" / str(step))
    members = pack(surnames, "surnames", cfgs, workdirs)
    assert all(m.diverged_at is None for m in members)
    for i, c in enumerate(cfgs):
        packed = trained(surnames, c, workdirs[i], "surnames")
        alone = trained(surnames, c, tmp_path / f"alone{i}", "surnames")
        for k in ("steps", "best_step", "stopped_early"):
            assert packed.stats[k] == alone.stats[k], (i, k)
        assert checkpoint_steps(workdirs[i]) == checkpoint_steps(tmp_path / f"alone{i}")
        assert_same_training(packed, alone, rtol=1e-3)  # the selected parameters


def pack_good_and_bad(tmp_path, good, bad) -> list:
    """fit_packed a good and a bad trial (workdirs good/, bad/); checks that the bad one
    stopped alone and the good one trained to the end, equal to its run alone."""
    members = pack(running_average, "running_average", [good, bad],
                   [tmp_path / "good", tmp_path / "bad"])  # fmt: skip
    assert members[0].diverged_at is None and members[1].diverged_at is not None
    packed = trained(running_average, good, tmp_path / "good", "running_average")
    alone = trained(running_average, good, tmp_path / "alone", "running_average")
    assert packed.stats["steps"] == 40
    assert_same_training(packed, alone)
    return members


def test_a_diverging_trial_stops_alone_and_keeps_its_last_finite_checkpoint(tmp_path):
    args = [*RA, "--optimizer=sgd", "--checkpoint_every=8", "--log_every=4"]
    good, bad = (
        config(running_average, args, learning_rate=1e-2),
        config(running_average, args, learning_rate=3e38),
    )
    members = pack_good_and_bad(tmp_path, good, bad)
    # the diverged one: only finite checkpoints, before the divergence; its own run then
    # fails as it would alone
    steps = sorted(
        int(p.name) for p in (tmp_path / "bad" / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert all(s <= members[1].diverged_at for s in steps)
    from experiment.errors import RunFailed

    with pytest.raises(RunFailed, match="non-finite"):
        trained(running_average, bad, tmp_path / "bad", "running_average")


def test_a_trial_whose_optimizer_state_overflows_stops_alone_at_its_first_checkpoint(tmp_path):
    """weight_decay=1e30 overflows Adam's second moment with a finite update: the step's
    guard passes, the check of each trial's state before its checkpoint stops it."""
    args = [*RA, "--checkpoint_every=8", "--log_every=4", "--steps_per_call=4"]
    good, bad = (
        config(running_average, args, weight_decay=1e-3),
        config(running_average, args, weight_decay=1e30),
    )
    members = pack_good_and_bad(tmp_path, good, bad)
    assert members[1].diverged_at == 8
    assert not any(p.name.isdigit() for p in (tmp_path / "bad" / "checkpoints").iterdir())
    from experiment.errors import RunFailed

    with pytest.raises(RunFailed, match="optimizer state by step 8"):
        trained(running_average, bad, tmp_path / "bad", "running_average")


# ------------------------------------------------------------------ the executor


def write_grid(path, parameters, extra_args):
    spec = {
        "program": "train.py",
        "method": "grid",
        "metric": {"name": "eval_loss", "goal": "minimize"},
        "parameters": parameters,
        "command": ["${env}", "${interpreter}", "${program}", "--task=running_average",
                    *extra_args, "${args}"],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(spec))
    return path


def start_sweep(tmp_path, spec, out, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, str(REPO / "sweep.py"), str(spec), "--sweep_dir", str(out),
               "--wandb=disabled", *extra]  # fmt: skip
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def wait_for(condition, seconds=120.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def state_of(out):
    return {t["id"]: t for t in json.loads((out / "sweep_state.json").read_text())["trials"]}


LONG = [*TINY_ARGS["running_average"], "--steps=4000", "--checkpoint_every=512", "--log_every=64",
        "--eval_every=4000", "--steps_per_call=8"]  # fmt: skip


def test_a_killed_worker_costs_only_its_trial_and_the_study_goes_on(tmp_path):
    spec = write_grid(tmp_path / "s.yaml", {"seed": {"values": [0, 1]}}, LONG)
    out = tmp_path / "out"
    proc = start_sweep(tmp_path, spec, out, "--no_pack")
    wait_for(lambda: (out / "trial-000" / "checkpoints" / "512").is_dir())
    (worker,) = children(proc.pid)
    os.kill(worker, signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    trials = state_of(out)
    assert trials["trial-000"]["status"] == "failed"
    assert "worker process died (SIGKILL)" in trials["trial-000"]["error"]
    assert trials["trial-001"]["status"] == "finished"
    # its checkpoints survived: a retry resumes from them and finishes
    proc = start_sweep(tmp_path, spec, out, "--no_pack", "--retry_failed")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert state_of(out)["trial-000"]["status"] == "finished"
    assert "resuming from checkpoint" in (out / "trial-000" / "trial.log").read_text()


def test_an_interrupted_packed_study_resumes_to_the_uninterrupted_result(tmp_path):
    spec = write_grid(
        tmp_path / "s.yaml",
        {"last_step_only": {"values": [False, True]}},
        [*LONG[:-4], "--steps=600", "--checkpoint_every=64", "--log_every=64", "--eval_every=600"],
    )
    straight, out = tmp_path / "straight", tmp_path / "out"
    proc = start_sweep(tmp_path, spec, straight)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "packed: 2 trials in one program" in output
    proc = start_sweep(tmp_path, spec, out)
    wait_for(lambda: (out / "trial-001" / "checkpoints" / "64").is_dir())
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert {t["status"] for t in state_of(out).values()} == {"running"}
    proc = start_sweep(tmp_path, spec, out)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "resuming 2 packed trials from step" in (out / "trial-000" / "trial.log").read_text()
    for trial_id, trial in state_of(out).items():
        assert trial["status"] == "finished"
        assert trial["metric"] == state_of(straight)[trial_id]["metric"]  # bit-equal


def test_a_packed_training_that_fails_leaves_each_trial_to_run_alone(tmp_path, monkeypatch, capsys):
    """E.g. a full disk in the middle of the packed training: the group's locks are
    released and each trial's own run starts (and reports its own error, if any)."""
    import io

    import training.packing
    from experiment import worker

    def broken(members, desc="", on_trained=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training.packing, "fit_packed", broken)
    trials = [
        dict(id=f"t{i}", env={}, log=str(tmp_path / f"t{i}.log"),
             argv=["--task=running_average", *RA, f"--learning_rate={lr}",
                   f"--workdir={tmp_path / f't{i}'}", "--wandb=disabled"])
        for i, lr in enumerate((1e-2, 3e-2))
    ]  # fmt: skip
    results = io.StringIO()
    assert worker.run_job(trials, results)
    assert json.loads(results.getvalue()) == {"packed": ["t0", "t1"]}
    # (in a worker, Python's stdout is fd 1, which points at the log; here pytest holds it)
    shown = capsys.readouterr().out + (tmp_path / "t0.log").read_text()
    assert "packed training failed (OSError" in shown
    for trial in trials:  # the locks are free: each trial's own run goes ahead
        results = io.StringIO()
        assert worker.run_job([trial], results)
        assert json.loads(results.getvalue()) == {"id": trial["id"], "exit_code": 0}


def test_packed_trials_are_handed_on_one_by_one_as_their_training_lands(tmp_path):
    """A packed job announces each trial once its final checkpoint is on disk and its
    run closed (its workdir free for its own run, on another worker), the first trial
    last (its log holds the job's output)."""
    from experiment import worker
    from experiment.workdir import WorkdirLock
    from training.checkpoints import has_steps

    trials = [
        dict(id=f"t{i}", env={}, log=str(tmp_path / f"t{i}.log"),
             argv=["--task=running_average", *RA, f"--learning_rate={lr}",
                   f"--workdir={tmp_path / f't{i}'}", "--wandb=disabled"])
        for i, lr in enumerate((1e-2, 2e-2, 3e-2))
    ]  # fmt: skip

    class Results:
        """The results pipe, checking each announced trial as the executor would use it."""

        def __init__(self):
            self.announced: list[list[str]] = []

        def write(self, line: str) -> None:
            (trial_id,) = json.loads(line)["packed"][-1:]
            workdir = tmp_path / trial_id
            if trial_id != "t0":  # announced alone, with its training complete and free
                assert json.loads(line)["packed"] == [trial_id]
                assert (workdir / "checkpoints" / "40").is_dir()
                assert "trained packed with t0" in (tmp_path / f"{trial_id}.log").read_text()
                lock = WorkdirLock(workdir)
                lock.acquire()  # raises when the packed job still holds it
                lock.release()
            assert has_steps(workdir / "checkpoints")
            self.announced.append(json.loads(line)["packed"])

        def flush(self) -> None:
            pass

    results = Results()
    assert worker.run_job(trials, results)
    assert results.announced == [["t1"], ["t2"], ["t0"]]


def test_a_study_killed_with_sigkill_takes_its_workers_with_it(tmp_path):
    """No orphan keeps training (and holding the trial's workdir lock) after the study
    died: the worker is told (SIGTERM), records the interruption, and a rerun resumes."""
    spec = write_grid(tmp_path / "s.yaml", {"seed": {"values": [0]}}, LONG)
    out = tmp_path / "out"
    proc = start_sweep(tmp_path, spec, out, "--no_pack")
    wait_for(lambda: (out / "trial-000" / "checkpoints" / "512").is_dir())
    (worker,) = children(proc.pid)
    proc.kill()
    proc.communicate(timeout=60)
    wait_for(lambda: not os.path.exists(f"/proc/{worker}") or "Z" in open_stat(worker), 60)
    failure = json.loads((out / "trial-000" / "failure.json").read_text())
    assert failure["exit_code"] == 143 and "SIGTERM" in failure["error"]
    proc = start_sweep(tmp_path, spec, out, "--no_pack")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert state_of(out)["trial-000"]["status"] == "finished"
    assert "resuming from checkpoint" in (out / "trial-000" / "trial.log").read_text()


def open_stat(pid: int) -> str:
    """The state letter of a process (Z: a zombie, gone but not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_group_whose_checkpoints_were_split_by_a_kill_resumes_from_their_common_step(tmp_path):
    """A kill between two members' saves leaves one a checkpoint ahead: the group resumes
    packed from the newest step both have, and ends as the trials would alone."""
    import shutil

    args = [*RA, "--checkpoint_every=8", "--keep_checkpoints=2"]
    cfgs = [config(running_average, args, learning_rate=lr) for lr in (3e-3, 3e-2)]

    workdirs = [tmp_path / f"p{i}" for i in range(len(cfgs))]
    pack(running_average, "running_average", cfgs, workdirs)
    shutil.rmtree(tmp_path / "p1" / "checkpoints" / "40")  # as if killed before its save
    pack(running_average, "running_average", cfgs, workdirs)
    for i, c in enumerate(cfgs):
        packed = trained(running_average, c, tmp_path / f"p{i}", "running_average")
        alone = trained(running_average, c, tmp_path / f"alone{i}", "running_average")
        assert packed.stats["steps"] == 40
        assert_same_training(packed, alone)


class ScriptedWorker:
    """A stand-in for experiment.study.Worker: answers a trial at once (exit 0) and a packed
    job ({"packed": ids}) once slot 1 has started (at once in a study of one worker);
    slot 1's first process dies idle."""

    created: ClassVar[list[int]] = []
    held: ClassVar[list] = []  # packed answers waiting for slot 1

    def __init__(self, index, events, cwd, log, workers=1):
        self.index, self.events, self.running = index, events, {}
        self.workers = workers
        ScriptedWorker.created.append(index)
        if index == 1 and ScriptedWorker.created.count(1) == 1:
            events.put((self, None))  # gone before any job
            ScriptedWorker.release()

    @classmethod
    def release(cls):
        answers, cls.held = cls.held, []
        for worker, message in answers:
            worker.events.put((worker, message))

    def send(self, job):
        self.running.update((t.id, t) for t in job)
        if len(job) == 1:
            self.events.put((self, {"id": job[0].id, "exit_code": 0}))
        elif 1 in ScriptedWorker.created or self.workers == 1:  # no slot 1 to wait for
            self.events.put((self, {"packed": [t.id for t in job]}))
        else:
            ScriptedWorker.held.append((self, {"packed": [t.id for t in job]}))
            # an executor that never starts slot 1 gets its answer late, not never
            timer = threading.Timer(5.0, ScriptedWorker.release)
            timer.daemon = True
            timer.start()

    def ask_keys(self, trials):
        """Answered at once, as a real worker answers once warm."""
        from experiment import study

        self.events.put((self, {"keys": {t.id: study.group_key(t) for t in trials}}))
        return True

    def death_cause(self):
        return 1, "its worker process exited with code 1"

    def close(self):
        pass


def seed_study(tmp_path, workers: int, count: int = 3):
    """run_trials over `count` running-average trials that differ in their seed only
    (one packable group), all proposed at once: (jobs started, results)."""
    from experiment import study

    trials = [study.Trial(f"t{i}", "running_average", {**tokens(RA), "seed": str(i)},
                          tmp_path / f"t{i}") for i in range(count)]  # fmt: skip
    queue, jobs, results = list(trials), [], []

    def more(idle):
        chosen = list(queue)
        queue.clear()
        return chosen

    study.run_trials(more, workers=workers, pack=True, on_start=jobs.append,
                     on_result=results.append, worker_log=tmp_path / "w.log")  # fmt: skip
    return jobs, results


def test_idle_workers_start_while_a_packed_job_trains_and_one_that_dies_idle_is_not_respawned(
    tmp_path, monkeypatch
):
    from experiment import study

    monkeypatch.setattr(study, "Worker", ScriptedWorker)
    # the group is not shared out between the two slots here (see the next test): the
    # scenario is a packed job while the other slot has nothing to run
    take_job = study.take_job
    monkeypatch.setattr(study, "take_job", lambda *a, idle=1: take_job(*a, idle=1))
    ScriptedWorker.created, ScriptedWorker.held = [], []
    jobs, results = seed_study(tmp_path, workers=2)
    assert [len(job) for job in jobs] == [3]  # one packed job; slot 1 had none to start with
    # slot 1 was started with the trials' arrival (its packed answer waits for that);
    # it died idle and was started again only for a job of its own (not in a loop)
    assert ScriptedWorker.created[:2] == [0, 1]
    assert ScriptedWorker.created.count(1) == 2
    assert sorted((r.trial.id, r.exit_code) for r in results) == [("t0", 0), ("t1", 0), ("t2", 0)]


def test_a_group_that_is_all_there_is_to_run_is_shared_out_among_idle_workers():
    from experiment import study

    def trials(n, key="a"):
        return [study.Trial(f"{key}{i}", "t", {}, None) for i in range(n)]

    def key_of(trial):
        return trial.id[0]

    pending = trials(5)
    jobs = [study.take_job(pending, True, (), key_of, idle=2),
            study.take_job(pending, True, (), key_of, idle=1)]  # fmt: skip
    assert [len(j) for j in jobs] == [3, 2] and not pending
    pending = trials(5)  # one worker idle: the whole group
    assert len(study.take_job(pending, True, (), key_of, idle=1)) == 5
    pending = [*trials(5), *trials(2, "b")]  # other work for the other worker: not split
    assert len(study.take_job(pending, True, (), key_of, idle=2)) == 5
    pending = trials(5)  # trained trials (their runs only finish) are other work too
    assert len(study.take_job(pending, True, {"a4"}, key_of, idle=2)) == 4


def test_workers_that_share_a_device_allocate_its_memory_as_they_use_it(monkeypatch):
    """Several workers on one GPU: none takes JAX's default 75% of its memory at start
    (the others would find too little left); one worker, or a user's own setting, is
    left alone."""
    from experiment import study

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    assert study.worker_env(0, 2)["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in study.worker_env(0, 1)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    assert study.worker_env(1, 2)["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    assert study.worker_env(0, 2)["PYTHONPATH"].split(os.pathsep)[0] == str(study.REPO)


def test_workers_side_by_side_share_the_cpus_among_their_blas_threads(monkeypatch):
    """numpy's BLAS threads spin while they wait: W workers each get their share of the
    CPUs (at least one thread); one worker, or a user's own setting, is left alone."""
    from experiment import study

    for name in study.BLAS_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(study, "usable_cpus", lambda: list(range(16)))
    assert all(study.worker_env(3, 4)[name] == "4" for name in study.BLAS_THREAD_VARIABLES)
    assert study.worker_env(31, 32)["OPENBLAS_NUM_THREADS"] == "1"
    assert [study.worker_env(i, 3)["MKL_NUM_THREADS"] for i in range(3)] == ["5", "5", "6"]
    assert not any(name in study.worker_env(0, 1) for name in study.BLAS_THREAD_VARIABLES)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert study.worker_env(0, 2)["OMP_NUM_THREADS"] == "3"
    assert study.worker_env(0, 2)["OPENBLAS_NUM_THREADS"] == "8"


def test_workers_side_by_side_each_run_on_their_own_cpus(monkeypatch):
    """W workers split the study's CPUs (its affinity mask, e.g. under taskset) into W
    contiguous parts that cover them all; more workers than CPUs take them in turn;
    one worker is not pinned (it may use every CPU)."""
    from experiment import study
    from experiment.worker import CPUS_ENV

    monkeypatch.setattr(study, "usable_cpus", lambda: [2, 3, 5, 7, 11])
    parts = [study.worker_cpus(i, 2) for i in range(2)]
    assert parts == [[2, 3], [5, 7, 11]]
    assert [study.worker_cpus(i, 5) for i in range(5)] == [[2], [3], [5], [7], [11]]
    assert [study.worker_cpus(i, 7) for i in range(7)] == [[2], [3], [5], [7], [11], [2], [3]]
    assert study.worker_env(1, 2)[CPUS_ENV] == "5,7,11"
    monkeypatch.setenv(CPUS_ENV, "0")  # e.g. a study started from inside a worker
    assert CPUS_ENV not in study.worker_env(0, 1)


PRINT_AFFINITY = (
    "import os, sys; from experiment import worker; worker.pin_to_cpus(sys.argv[1] or None); "
    "print(sorted(os.sched_getaffinity(0)))"
)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_a_worker_pins_itself_to_the_cpus_it_is_given(tmp_path):
    """experiment.worker sets its affinity from RNNAE_WORKER_CPUS first thing (its threads
    inherit it); a list the OS refuses, or none, leaves it as it was. A study's second
    of two workers runs on its share."""
    import queue

    from experiment import study

    mine = sorted(os.sched_getaffinity(0))

    def affinity(cpus: str) -> list[int]:
        command = [sys.executable, "-c", PRINT_AFFINITY, cpus]
        out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
        return json.loads(out.stdout)

    assert affinity(str(mine[-1])) == [mine[-1]]
    assert affinity("") == mine
    assert affinity("100000") == mine  # not a CPU of this machine: refused, left alone
    assert affinity("zero") == mine

    worker = study.Worker(1, queue.Queue(), tmp_path, tmp_path / "workers.log", workers=2)
    try:
        deadline = time.monotonic() + 60
        while sorted(os.sched_getaffinity(worker.proc.pid)) != study.worker_cpus(1, 2):
            assert time.monotonic() < deadline, "the worker did not pin itself"
            time.sleep(0.05)
    finally:
        worker.close()


def test_a_worker_finishes_the_trials_it_trained_then_takes_new_work():
    """Order of preference for an idle worker: trials it trained packed (its programs
    are compiled), then trials not trained yet, then trials another worker trained."""
    from experiment import study

    def ids(pending):
        return [t.id for t in pending]

    pending = [study.Trial(i, "t", {}, None) for i in ("w1a", "w0a", "new", "w1b", "w0b")]
    trained_by = {"w1a": 1, "w1b": 1, "w0a": 0, "w0b": 0}
    study.prefer_own_trials(pending, trained_by, 0)
    assert ids(pending) == ["w0a", "w1a", "new", "w1b", "w0b"]
    pending.pop(0)
    study.prefer_own_trials(pending, trained_by, 0)
    assert ids(pending)[0] == "w0b"
    pending.pop(0)
    study.prefer_own_trials(pending, trained_by, 0)  # none of its own left: new work
    assert ids(pending) == ["new", "w1a", "w1b"]
    pending.pop(0)
    study.prefer_own_trials(pending, trained_by, 0)  # then the other worker's trials
    assert ids(pending) == ["w1a", "w1b"]
    pending = [study.Trial(i, "t", {}, None) for i in ("x", "y")]
    study.prefer_own_trials(pending, {}, 1)  # nothing trained packed: the pending order
    assert ids(pending) == ["x", "y"]


def test_an_idle_worker_starts_the_costliest_new_job_first():
    """With job costs, the costliest job not trained yet goes first (ties: the pending
    order); a worker's own trained trials still come before any; an unknown cost
    leaves the pending order as it is."""
    from experiment import study

    def ids(pending):
        return [t.id for t in pending]

    def trials(*names):
        return [study.Trial(i, "t", {}, None) for i in names]

    costs = {"a": 1.0, "b": 5.0, "c": 5.0, "d": 2.0, "mine": 0.5}

    def cost(trial):
        return costs.get(trial.id)

    pending = trials("a", "b", "c", "d")
    study.prefer_own_trials(pending, {}, 0, cost)
    assert ids(pending) == ["b", "a", "c", "d"]  # the first of the two costliest
    pending = trials("a", "b", "mine")
    study.prefer_own_trials(pending, {"mine": 0}, 0, cost)
    assert ids(pending)[0] == "mine"  # its own trained trial: its programs are compiled
    pending = trials("other", "a", "b")
    study.prefer_own_trials(pending, {"other": 1}, 0, cost)
    assert ids(pending)[0] == "b"  # new work before another worker's trained trials
    pending = trials("a", "unknown", "b")
    study.prefer_own_trials(pending, {}, 0, cost)
    assert ids(pending) == ["a", "unknown", "b"]
    pending = trials("a", "b")
    study.prefer_own_trials(pending, {}, 0)  # no costs: the pending order
    assert ids(pending) == ["a", "b"]


@pytest.mark.parametrize(
    "options",
    [{}, {"cell": "rnn", "num_layers": "2"}, {"cell": "lstm", "num_layers": "2"},
     {"cell": "gru", "num_layers": "3", "hidden_size": "8", "num_seeds": "2"}],
)  # fmt: skip
def test_running_average_cost_counts_the_recurrent_multiply_adds(options):
    """training_cost = steps x sequences per step x steps per sequence x the entries of
    the model's recurrent weight matrices (its input and hidden kernels, read from the
    built model), so the 2-layer LSTM is estimated costliest of the sweep's cells."""
    from flax import nnx

    cfg = config(running_average, [f"--{k}={v}" for k, v in options.items()])
    params = nnx.state(running_average.make_model(cfg, nnx.Rngs(0)), nnx.Param)
    kernels = [
        v.size for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
        if jax.tree_util.keystr(path).split("'")[-2] in ("w_x", "w_h")
    ]  # fmt: skip
    assert len(kernels) == 2 * cfg.num_layers
    expected = cfg.steps * cfg.batch_size * cfg.num_seeds * cfg.seq_len * sum(kernels)
    assert running_average.training_cost(cfg) == expected


@pytest.mark.parametrize("costliest_first, first_job", [(True, "lstm"), (False, "rnn")])
def test_a_study_starts_the_costliest_group_first_when_asked(
    tmp_path, monkeypatch, costliest_first, first_job
):
    """A grid of RNN trials then LSTM trials (one packed group each): with
    costliest_first the LSTM group (the task's estimate: 4x the RNN's) starts first,
    without it the order given."""
    from experiment import study

    monkeypatch.setattr(study, "Worker", ScriptedWorker)
    ScriptedWorker.created, ScriptedWorker.held = [], []
    trials = [study.Trial(f"{cell}{seed}", "running_average",
                          {**tokens(RA), "cell": cell, "seed": str(seed)},
                          tmp_path / f"{cell}{seed}")
              for cell in ("rnn", "lstm") for seed in (0, 1)]  # fmt: skip
    queue, jobs = list(trials), []

    def more(idle):
        chosen = list(queue)
        queue.clear()
        return chosen

    study.run_trials(more, workers=1, pack=True, on_start=jobs.append,
                     on_result=lambda result: None, worker_log=tmp_path / "w.log",
                     costliest_first=costliest_first)  # fmt: skip
    second = "rnn" if first_job == "lstm" else "lstm"
    assert [[t.id for t in job] for job in jobs] == [
        [f"{first_job}0", f"{first_job}1"],
        [f"{second}0", f"{second}1"],
    ]


@pytest.mark.parametrize("broken", ["raises", "nan", "inf"])
def test_a_failing_cost_estimate_only_keeps_the_order(monkeypatch, capsys, broken):
    """A task's training_cost that raises or gives a non-finite number counts as no
    estimate (the jobs keep their order), said in one line; the key is unaffected."""
    from experiment import study

    def estimate(cfg):
        if broken == "raises":
            raise ZeroDivisionError("division by zero")
        return float(broken)

    monkeypatch.setattr(running_average, "training_cost", estimate)
    trial = study.Trial("t0", "running_average", tokens(RA), None)
    assert study.training_cost(trial) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "running_average.training_cost gave no cost for t0" in err
    assert study.group_key(trial) is not None


def test_a_worker_answers_packing_keys_with_cost_estimates():
    """experiment.worker.answer_keys: a key and a cost per trial; null for both where
    the options are refused (that trial's own run reports why)."""
    import io

    from experiment import study, worker

    out = io.StringIO()
    asked = [dict(id="ok", task="running_average", options=tokens(RA)),
             dict(id="bad", task="running_average", options={"hidden_size": "-3"})]  # fmt: skip
    worker.answer_keys(asked, out)
    answer = json.loads(out.getvalue())
    trial = study.Trial("ok", "running_average", tokens(RA), None)
    assert answer["keys"] == {"ok": study.group_key(trial), "bad": None}
    assert answer["costs"] == {"ok": study.training_cost(trial), "bad": None}
    assert answer["costs"]["ok"] > 0


@pytest.mark.parametrize("arriving, started", [(3, [0, 1]), (1, [0])])
def test_workers_start_as_trials_arrive_before_they_are_grouped(
    tmp_path, monkeypatch, arriving, started
):
    """Grouping loads the tasks in the study process (about 2 s): the workers' own start
    overlaps it. As many start as there are trials to run, up to --workers."""
    from experiment import study

    monkeypatch.setattr(study, "Worker", ScriptedWorker)
    ScriptedWorker.created, ScriptedWorker.held = [], []
    seen_at_grouping: list[list[int]] = []
    real_group_key = study.group_key

    def group_key(trial):
        seen_at_grouping.append(list(ScriptedWorker.created))
        return real_group_key(trial)

    monkeypatch.setattr(study, "group_key", group_key)
    trials = [study.Trial(f"t{i}", "running_average", {**tokens(RA), "seed": str(i)},
                          tmp_path / f"t{i}") for i in range(arriving)]  # fmt: skip
    queue, results = list(trials), []

    def more(idle):
        chosen = list(queue)
        queue.clear()
        return chosen

    study.run_trials(more, workers=2, pack=True, on_start=lambda job: None,
                     on_result=results.append, worker_log=tmp_path / "w.log")  # fmt: skip
    assert seen_at_grouping[0] == started
    assert sorted(r.trial.id for r in results) == [t.id for t in trials]


def test_workers_the_caller_expects_start_before_the_first_trials_are_asked_for(
    tmp_path, monkeypatch
):
    from experiment import study

    monkeypatch.setattr(study, "Worker", ScriptedWorker)
    ScriptedWorker.created, ScriptedWorker.held = [], []
    trials = [study.Trial("t0", "running_average", tokens(RA), tmp_path / "t0")]
    queue, asked_with = list(trials), []

    def more(idle):
        asked_with.append(list(ScriptedWorker.created))
        chosen = list(queue)
        queue.clear()
        return chosen

    study.run_trials(more, workers=2, pack=True, on_start=lambda job: None,
                     on_result=lambda result: None, worker_log=tmp_path / "w.log",
                     expected=5)  # fmt: skip
    assert asked_with[0] == [0, 1]  # up to --workers, however many are expected


class KeylessWorker(ScriptedWorker):
    """A ScriptedWorker that dies when asked for packing keys (the first time only)."""

    deaths: ClassVar[int] = 0

    def ask_keys(self, trials):
        if KeylessWorker.deaths:
            return super().ask_keys(trials)
        KeylessWorker.deaths += 1
        self.events.put((self, None))
        return True  # its death is read later


class PipelessWorker(ScriptedWorker):
    """A ScriptedWorker whose request cannot be written (its process is gone)."""

    def ask_keys(self, trials):
        return False


@pytest.mark.parametrize("worker_class", [ScriptedWorker, KeylessWorker, PipelessWorker])
def test_trials_whose_task_is_not_loaded_here_are_grouped_by_a_worker(
    tmp_path, monkeypatch, worker_class
):
    """The study process asks an idle worker for the keys of trials whose task it has
    not loaded; if that worker dies first, or cannot be asked, they are asked again
    or worked out here."""
    from experiment import study

    monkeypatch.setattr(study, "Worker", worker_class)
    monkeypatch.setattr(study, "task_loaded_here", lambda task: False)
    ScriptedWorker.created, ScriptedWorker.held, KeylessWorker.deaths = [], [], 0
    asked: list[list[str]] = []
    ask_keys = worker_class.ask_keys
    monkeypatch.setattr(worker_class, "ask_keys",
                        lambda self, trials: (asked.append([t.id for t in trials]),
                                              ask_keys(self, trials))[1])  # fmt: skip
    jobs, results = seed_study(tmp_path, workers=1)
    assert asked[0] == ["t0", "t1", "t2"]
    # one packed job of the three (seeds pack), whoever worked out the keys
    assert [[t.id for t in job] for job in jobs] == [["t0", "t1", "t2"]]
    assert sorted((r.trial.id, r.exit_code) for r in results) == [("t0", 0), ("t1", 0), ("t2", 0)]


def test_a_study_process_that_has_not_loaded_the_tasks_never_loads_jax(tmp_path):
    """Two packable trials through real workers: grouped (one packed job) by a worker's
    keys, both finish, and the study process itself never imported JAX or a task."""
    script = f"""
import json, sys
from pathlib import Path
from experiment.study import Trial, run_trials
root = Path({str(tmp_path)!r})
options = {tokens(RA)!r}
queue = [Trial(f"t{{i}}", "running_average", {{**options, "seed": str(i)}}, root / f"t{{i}}")
         for i in range(2)]
jobs, codes = [], []
def more(idle):
    chosen = list(queue)
    queue.clear()
    return chosen
run_trials(more, workers=1, pack=True, on_start=lambda job: jobs.append([t.id for t in job]),
           on_result=lambda r: codes.append(r.exit_code), worker_log=root / "w.log")
loaded = sorted(m for m in sys.modules if m == "jax" or m.startswith("tasks"))
print(json.dumps(dict(jobs=jobs, codes=codes, loaded=loaded)))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == dict(jobs=[["t0", "t1"]], codes=[0, 0], loaded=[]), seen
    for i in range(2):
        assert (tmp_path / f"t{i}" / "summary.json").is_file()


def test_a_worker_that_is_gone_is_not_asked_for_keys(tmp_path):
    import queue

    from experiment import study

    worker = study.Worker(0, queue.Queue(), REPO, tmp_path / "w.log")
    worker.proc.kill()
    worker.proc.wait()
    trial = study.Trial("t0", "running_average", tokens(RA), tmp_path / "t0")
    try:
        assert worker.ask_keys([trial]) is False
    finally:
        worker.close()
