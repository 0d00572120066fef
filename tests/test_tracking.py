"""What W&B records about a run: its outcome and its identity across resumes.

W&B's offline files (WORKDIR/wandb/offline-run-*/run-*.wandb) are read directly: a
LevelDB-style log of protobuf `Record`s, the format `wandb sync` uploads.
"""

import struct
from pathlib import Path

import pytest

import train
from tests.conftest import TINY_ARGS

wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

HEADER = 7  # ":W&B", a 2-byte magic and a version byte
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    """Every Record in a .wandb file (records never cross a 32 KiB block boundary)."""
    data, out, pos, parts = path.read_bytes(), [], HEADER, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # the block's tail is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            parts = payload
        elif kind in (MIDDLE, LAST):
            parts += payload
        if kind in (FULL, LAST):
            record = wandb_pb2.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


def offline_runs(workdir: Path) -> list[Path]:
    return sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb"))


def exit_code_and_id(path: Path) -> tuple[int | None, str | None]:
    code = run_id = None
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "exit":
            code = record.exit.exit_code
        elif kind == "run":
            run_id = record.run.run_id
    return code, run_id


ARGS = ["--task=running_average", *TINY_ARGS["running_average"], "--wandb=offline"]


def test_a_diverged_run_is_failed_in_wandb(tmp_path, capsys):
    code = train.main(
        [*ARGS, "--optimizer=sgd", "--learning_rate=3e38", "--steps=2", f"--workdir={tmp_path}"]
    )
    assert code == 1
    (run_file,) = offline_runs(tmp_path)
    assert exit_code_and_id(run_file)[0] == 1
    code = train.main([*ARGS, "--steps=2", f"--workdir={tmp_path / 'ok'}"])
    assert code == 0
    assert exit_code_and_id(offline_runs(tmp_path / "ok")[0])[0] == 0


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    from training import progress

    original = progress.Progress.update

    def stop_at_16(self, step, *a, **k):
        if step >= 16:
            raise KeyboardInterrupt
        return original(self, step, *a, **k)

    args = [*ARGS, "--steps=32", "--log_every=8", "--steps_per_call=8", f"--workdir={tmp_path}"]
    monkeypatch.setattr(progress.Progress, "update", stop_at_16)
    assert train.main(args) == 130
    monkeypatch.setattr(progress.Progress, "update", original)
    assert train.main(args) == 0
    first, second = offline_runs(tmp_path)
    (code_1, id_1), (code_2, id_2) = exit_code_and_id(first), exit_code_and_id(second)
    assert id_1 == id_2 == (tmp_path / "wandb_run_id").read_text().strip()
    assert (code_1, code_2) == (130, 0)


def hparams_of(workdir: Path) -> tuple[set[str], set[str]]:
    """(HParams columns, HParams metric tags) in a run's TensorBoard events."""
    from tensorboardX.proto import plugin_hparams_pb2

    from tests.test_sweep import read_events

    _, _, plugins = read_events(workdir)
    start = plugin_hparams_pb2.HParamsPluginData()
    start.ParseFromString(plugins["_hparams_/session_start_info"])
    experiment = plugin_hparams_pb2.HParamsPluginData()
    experiment.ParseFromString(plugins["_hparams_/experiment"])
    columns = set(start.session_start_info.hparams)
    metrics = {m.name.tag for m in experiment.experiment.metric_infos}
    return columns, metrics


def test_hparams_show_the_options_that_vary_and_the_results(tmp_path):
    args = ["--task=running_average", *TINY_ARGS["running_average"], "--steps=4", "--cell=lstm"]
    assert train.main([*args, f"--workdir={tmp_path}", "--wandb=disabled"]) == 0
    columns, metrics = hparams_of(tmp_path)
    given = {a[2:].split("=")[0] for a in args[1:]}
    assert columns == {"task", *given}  # not checkpoint_every, log_every, optimizer, ...
    assert {"result/eval_loss", "result/train_loss", "result/eval_mse_last_step"} <= metrics
    assert not metrics & {"result/steps", "result/compilations", "result/devices"}


def test_a_sweep_trial_shows_every_swept_option(tmp_path, monkeypatch):
    from experiment.writers import SWEPT_ENV

    monkeypatch.setenv(SWEPT_ENV, "hidden_size,activation")
    args = ["--task=running_average", "--steps=2", "--activation=tanh", "--hidden_size=32"]
    assert train.main([*args, f"--workdir={tmp_path}", "--wandb=disabled"]) == 0
    columns, _ = hparams_of(tmp_path)
    assert columns == {"task", "steps", "activation", "hidden_size"}  # defaults, but swept


def test_the_loop_statistics_are_known_to_the_writers(tmp_path):
    """Every number fit() adds to a summary is a run statistic, not an HParams metric."""
    from experiment.run import Run
    from experiment.writers import RUN_STATS
    from tasks import running_average
    from training.loop import fit

    cfg = running_average.Config(num_train=64, num_eval=16, batch_size=8, hidden_size=4, steps=2)
    result = fit(cfg, running_average.make_problem(cfg), Run("running_average", cfg, tmp_path))
    assert set(result.stats) <= RUN_STATS


def run_record(path: Path):
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")


def test_offline_sweep_trials_carry_their_sweep_identity(tmp_path):
    import sweep
    from tests.test_sweep import write_sweep

    spec = write_sweep(tmp_path / "s.yaml", {"hidden_size": {"values": [2, 3]}})
    groups = []
    for name in ("first", "second"):
        out = tmp_path / name
        assert sweep.main([str(spec), "--sweep_dir", str(out), "--wandb=offline"]) == 0
        runs = [run_record(offline_runs(out / t)[0]) for t in ("trial-000", "trial-001")]
        assert [r.display_name for r in runs] == ["trial-000", "trial-001"]
        (group,) = {r.run_group for r in runs}
        assert group.startswith(f"{name}-") and all(group in r.tags for r in runs)
        groups.append(group)
    assert groups[0] != groups[1]  # the same file swept twice: two groups


@pytest.mark.parametrize(
    "task,args,models",
    [
        (
            "latent_study",
            ["--latent_sizes=2,3", "--epochs=0", "--steps=20", "--num_train=200",
             "--num_test=50", "--hidden_sizes=8", "--probe_iterations=3"],
            ["latent_2", "latent_3"],
        ),
        (
            "linear_ae",
            ["--steps=20", "--num_train=200", "--lambda_grid=0.01,0.1"],
            ["lambda_0.01", "lambda_0.1"],
        ),
    ],
)  # fmt: skip
def test_every_model_of_a_run_is_its_own_complete_series(tmp_path, task, args, models):
    """Before, the models of one run shared tags with steps restarting at 0, and
    TensorBoard kept only the last model's points."""
    from tests.test_sweep import scalar_steps

    every = ["--log_every=5", "--eval_every=10", "--steps_per_call=5", "--wandb=disabled"]
    assert train.main([f"--task={task}", *args, *every, f"--workdir={tmp_path}"]) == 0
    steps = scalar_steps(tmp_path)
    for model in models:
        assert steps[f"{model}/train_loss"] == [5, 10, 15, 20], model
        assert steps[f"{model}/eval_recon_mse"] == [10, 20], model
    assert "train_loss" not in steps or task == "linear_ae"  # linear_ae's own model: unprefixed


def test_curves_over_seeds_have_a_mean_a_band_and_labelled_seeds():
    from experiment.figures import plot_over_seeds, pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    plot_over_seeds(ax, [10, 20, 30], [[1.0, 2.0, 3.0], [0.5, 0.7, 0.9], [0.2, 0.3, 0.4]],
                    "loss", "C0", first_seed=4)  # fmt: skip
    plot_over_seeds(ax, [10], [0.5], "single", "C1")  # one evaluation: a marked point
    labels = ax.get_legend_handles_labels()[1]
    plt.close(fig)
    assert labels == ["loss: mean of 3 seeds ±1 std", "loss: seeds 4..6", "single"]
    assert len(labels) == len(set(labels))
    assert len(ax.collections) == 1  # the band
    assert ax.lines[-1].get_marker() == "o"


def test_packed_sweep_trials_log_to_their_own_wandb_runs(tmp_path, capsys):
    """Trials trained in one program (packed) still get one W&B run each, with their own
    training curves: never one trial's run returned for another's."""
    import sweep
    from tests.test_sweep import write_sweep

    spec = write_sweep(tmp_path / "s.yaml", {"learning_rate": {"values": [1e-3, 1e-2]}})
    out = tmp_path / "out"
    assert sweep.main([str(spec), "--sweep_dir", str(out), "--wandb=offline"]) == 0
    assert "packed: 2 trials in one program" in capsys.readouterr().out
    ids = []
    for trial in ("trial-000", "trial-001"):
        run_id = (out / trial / "wandb_run_id").read_text().strip()
        files = offline_runs(out / trial)
        assert files  # the packed training's run, then the trial's own (resumed) run
        for path in files:
            run = run_record(path)
            assert (run.run_id, run.display_name) == (run_id, trial)
        history = [r for r in records(files[0]) if r.WhichOneof("record_type") == "history"]
        keys = {item.key or ".".join(item.nested_key) for r in history for item in r.history.item}
        assert "train_loss" in keys  # its curve, logged while it trained packed
        ids.append(run_id)
    assert ids[0] != ids[1]


def test_the_in_process_agent_runs_server_proposed_trials_as_their_server_runs(
    tmp_path, monkeypatch
):
    """`sweep.py FILE --agent ID`: W&B's agent (here a stand-in for the server, which the
    test cannot reach) proposes trials; each runs in this process as the W&B run the
    server created for it, with the proposed options."""
    import json
    import threading

    import wandb
    import yaml

    import sweep
    from tests.test_sweep import write_sweep

    proposals = [("agentrun1", {"hidden_size": 3}), ("agentrun2", {"hidden_size": 5})]
    calls = []

    def fake_agent(sweep_id, function, count=None, **_):
        # what wandb.agent does per trial (wandb/agents/pyagent.py): the run id and a
        # file of the proposed values in the environment, the function in a thread
        calls.append((sweep_id, count))
        for run_id, params in proposals[:count]:
            path = tmp_path / f"config-{run_id}.yaml"
            path.write_text(yaml.safe_dump({k: {"value": v} for k, v in params.items()}))
            monkeypatch.setenv("WANDB_RUN_ID", run_id)
            monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(path))
            thread = threading.Thread(target=function)
            thread.start()
            thread.join()

    monkeypatch.setattr(wandb, "agent", fake_agent)
    spec = write_sweep(tmp_path / "s.yaml", {"hidden_size": {"values": [3, 5]}})
    out = tmp_path / "out"
    args = [str(spec), "--agent", "me/rnnae/abc123", "--count", "2", "--sweep_dir", str(out)]
    assert sweep.main([*args, "--wandb=offline"]) == 0
    assert calls == [("me/rnnae/abc123", 2)]
    for run_id, params in proposals:
        workdir = out / run_id
        config = json.loads((workdir / "config.json").read_text())
        assert config["config"]["hidden_size"] == params["hidden_size"]
        assert (workdir / "summary.json").exists()
        run = run_record(offline_runs(workdir)[0])
        assert run.run_id == run_id  # the server's run, not a new one


def test_an_agent_that_cannot_start_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import wandb

    import sweep
    from tests.test_sweep import write_sweep

    def no_login(*args, **kwargs):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "agent", no_login)
    spec = write_sweep(tmp_path / "s.yaml", {"hidden_size": {"values": [3]}})
    out = tmp_path / "out"
    assert sweep.main([str(spec), "--agent", "me/p/x", "--sweep_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "W&B could not run the agent (No API key" in err[0]
    assert not out.exists()
