"""Offline sweeps with W&B's search algorithms, and TensorBoard event contents."""

import csv
import glob
import io
import json
import re
import struct

import PIL.Image
import pytest
import yaml

import sweep
from experiment.writers import png_shape
from tests.conftest import REPO, TINY_ARGS

TINY = [*TINY_ARGS["running_average"], "--steps=3", "--log_every=1"]


def write_sweep(path, parameters, method="grid", metric="eval_loss", goal="minimize", extra=None):
    spec = {
        "program": "train.py",
        "method": method,
        "metric": {"name": metric, "goal": goal},
        "parameters": parameters,
        "command": [
            "${env}",
            "${interpreter}",
            "${program}",
            "--task=running_average",
            *TINY,
            "${args}",
        ],
        **(extra or {}),
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def run(tmp_path, *args):
    return sweep.main([*map(str, args), "--wandb=disabled"])


def results(directory):
    with open(directory / "results.csv") as f:
        return list(csv.DictReader(f))


def test_grid_sweep_runs_every_combination_and_writes_a_sorted_table(tmp_path, capsys):
    spec = write_sweep(
        tmp_path / "s.yaml",
        {"hidden_size": {"values": [2, 4]}, "cell": {"values": ["rnn", "lstm"]}},
    )
    assert run(tmp_path, spec, "--workers", 2, "--sweep_dir", tmp_path / "out") == 0
    rows = results(tmp_path / "out")
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    assert {(r["hidden_size"], r["cell"]) for r in rows} == {
        ("2", "rnn"),
        ("2", "lstm"),
        ("4", "rnn"),
        ("4", "lstm"),
    }
    values = [float(r["eval_loss"]) for r in rows]
    assert values == sorted(values)
    for r in rows:  # the table's numbers are the runs' own summaries, other results too
        summary = json.loads((tmp_path / "out" / r["trial"] / "summary.json").read_text())
        assert float(r["eval_loss"]) == pytest.approx(summary["eval_loss"], rel=1e-5)
        assert float(r["train_loss"]) == pytest.approx(summary["train_loss"], rel=1e-5)
        assert float(r["eval_mse_last_step"]) == pytest.approx(summary["eval_mse_last_step"], 1e-5)
        assert "steps" not in r and "compile_seconds" not in r  # run statistics: not results
    assert "best (minimize eval_loss)" in capsys.readouterr().out
    assert (tmp_path / "out" / "results.md").exists() and (
        tmp_path / "out" / "results.png"
    ).exists()


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_respect_count_and_are_reproducible(tmp_path, method):
    params = {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-1},
              "cell": {"values": ["rnn", "lstm"]}}  # fmt: skip
    spec = write_sweep(tmp_path / "s.yaml", params, method=method)
    for name in ("a", "b"):
        assert run(tmp_path, spec, "--count", 3, "--seed", 7, "--sweep_dir", tmp_path / name) == 0
    a, b = results(tmp_path / "a"), results(tmp_path / "b")
    assert len(a) == 3
    assert sorted((r["learning_rate"], r["cell"]) for r in a) == sorted(
        (r["learning_rate"], r["cell"]) for r in b
    )


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    params = {"learning_rate": {"values": [0.01, 1e12]}, "activation": {"value": "relu"},
              "init": {"value": "orthogonal"}, "optimizer": {"value": "sgd"}}  # fmt: skip
    spec = write_sweep(tmp_path / "s.yaml", params)
    assert run(tmp_path, spec, "--sweep_dir", tmp_path / "out") == 0
    rows = {r["learning_rate"]: r for r in results(tmp_path / "out")}
    assert rows["0.01"]["status"] == "finished"
    assert rows["1000000000000.0"]["status"].startswith("failed: exit 1: non-finite loss")


def test_a_sweep_whose_every_trial_failed_exits_1(tmp_path, capsys):
    params = {"learning_rate": {"values": [1e12]}, "activation": {"value": "relu"},
              "init": {"value": "orthogonal"}, "optimizer": {"value": "sgd"}}  # fmt: skip
    spec = write_sweep(tmp_path / "s.yaml", params)
    assert run(tmp_path, spec, "--sweep_dir", tmp_path / "out") == 1
    assert "every trial failed" in capsys.readouterr().err


def test_a_sweep_runs_from_another_directory(tmp_path, monkeypatch):
    """Relative sweep file and default --sweep_dir, from outside the repository: the
    trials write where the runner looks (they used to write into the repository)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_sweep(elsewhere / "s.yaml", {"hidden_size": {"values": [2, 3]}})
    monkeypatch.chdir(elsewhere)
    assert run(tmp_path, "s.yaml") == 0
    rows = results(elsewhere / "sweep_runs" / "s")
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert (elsewhere / "sweep_runs" / "s" / "trial-000" / "summary.json").exists()
    assert not (REPO / "sweep_runs" / "s").exists()


def test_interrupted_sweep_resumes_without_losing_or_repeating_trials(tmp_path):
    spec = write_sweep(tmp_path / "s.yaml", {"hidden_size": {"values": [2, 3, 4]}})
    out = tmp_path / "out"
    assert run(tmp_path, spec, "--count", 2, "--sweep_dir", out) == 0
    first = (out / "trial-000" / "summary.json").stat().st_mtime_ns
    state = json.loads((out / "sweep_state.json").read_text())
    state["trials"][1]["status"] = "running"  # as if the sweep was killed during trial-001
    (out / "trial-001" / "summary.json").unlink()
    (out / "sweep_state.json").write_text(json.dumps(state))
    assert run(tmp_path, spec, "--sweep_dir", out) == 0
    state = json.loads((out / "sweep_state.json").read_text())
    assert [t["id"] for t in state["trials"]] == ["trial-000", "trial-001", "trial-002"]
    assert [t["params"]["hidden_size"] for t in state["trials"]] == [2, 3, 4]
    assert all(t["status"] == "finished" for t in state["trials"])
    assert (out / "trial-000" / "summary.json").stat().st_mtime_ns == first  # not run twice
    assert "resuming from checkpoint" in (out / "trial-001" / "trial.log").read_text()


@pytest.mark.parametrize(
    "content,message",
    [
        ("method: grid\nparameters: [unclosed", "is not valid YAML"),
        (None, "method 'anneal' is not supported"),
        (
            None,
            "parameter 'hiden_size' is not an option of task running_average "
            "(did you mean --hidden_size?)",
        ),
        (None, "--hidden_size='big': expected int"),
        (None, "must contain --task=NAME"),
        (None, "early_terminate (hyperband) is not supported"),
    ],
)
def test_invalid_sweep_files_exit_2_before_running_anything(tmp_path, capsys, content, message):
    path = tmp_path / "s.yaml"
    if content is not None:
        path.write_text(content)
    elif "anneal" in message:
        write_sweep(path, {"hidden_size": {"values": [2]}}, method="anneal")
    elif "hiden_size" in message:
        write_sweep(path, {"hiden_size": {"values": [2]}})
    elif "big" in message:
        write_sweep(path, {"hidden_size": {"values": [2, "big"]}})
    elif "--task" in message:
        spec = yaml.safe_load(write_sweep(path, {"hidden_size": {"values": [2]}}).read_text())
        spec["command"] = ["${env}", "${interpreter}", "${program}", "${args}"]
        path.write_text(yaml.safe_dump(spec))
    else:
        write_sweep(
            path,
            {"hidden_size": {"values": [2]}},
            extra={"early_terminate": {"type": "hyperband", "min_iter": 3}},
        )
    assert run(tmp_path, path, "--sweep_dir", tmp_path / "out") == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("trial-*"))


def test_a_metric_the_task_never_reports_is_a_clear_error(tmp_path, capsys):
    spec = write_sweep(tmp_path / "s.yaml", {"hidden_size": {"values": [2, 4]}}, metric="accuracy")
    assert run(tmp_path, spec, "--sweep_dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    # the first trial to finish (trial-001, the larger model, starts first) says so
    assert re.search(r"metric 'accuracy' is not in trial-00[01]'s summary.json", err)
    assert "eval_loss" in err


def events(workdir):
    """Every Event of a run's event files (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    for path in sorted(glob.glob(str(workdir / "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data, i = f.read(), 0
        while i < len(data):
            (length,) = struct.unpack("Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4
            yield event


def scalar_steps(workdir) -> dict[str, list[int]]:
    """{scalar tag: the steps it was logged at, in file order} of a run's event files."""
    steps: dict[str, list[int]] = {}
    for event in events(workdir):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def read_events(workdir):
    """(scalar tags, image tags, {hparams plugin tag: raw content}) of a run's event files."""
    scalars, images, plugins = set(), set(), {}
    for event in events(workdir):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "hparams":
                plugins[value.tag] = value.metadata.plugin_data.content
            elif value.HasField("image"):
                images.add(value.tag)
            elif value.HasField("simple_value"):
                scalars.add(value.tag)
    return scalars, images, plugins


def test_tensorboard_events_hold_scalars_images_and_hparams(train_cli, tmp_path):
    assert train_cli("--task=running_average", *TINY, f"--workdir={tmp_path}")[0] == 0
    scalars, images, plugins = read_events(tmp_path)
    assert {"train_loss", "eval_loss", "eval_mse_last_step", "train_grad_norm"} <= scalars
    assert {"predictions", "error_by_step", "eval_curve"} <= images
    # each image is the figure's PNG file as written, with its true size
    for event in events(tmp_path):
        for value in event.summary.value:
            if value.HasField("image"):
                png = (tmp_path / f"{value.tag}.png").read_bytes()
                assert value.image.encoded_image_string == png
                with PIL.Image.open(io.BytesIO(png)) as decoded:
                    assert (value.image.width, value.image.height) == decoded.size
                    assert value.image.colorspace == len(decoded.getbands())
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(plugins)
    start = plugins["_hparams_/session_start_info"]
    assert b"hidden_size" in start and b"task" in start
    assert b"cell" not in start  # the default: not an HParams column (test_tracking.py)
    assert b"result/eval_loss" in plugins["_hparams_/experiment"]


def test_offline_wandb_files_are_written_for_a_later_sync(train_cli, tmp_path):
    pytest.importorskip("wandb")
    assert (
        train_cli("--task=running_average", *TINY, "--wandb=offline", f"--workdir={tmp_path}")[0]
        == 0
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_are_valid(path):
    spec = sweep.load_sweep_file(path)
    task, _, _ = sweep.validate(spec)
    assert task in {"running_average", "autoencoder", "linear_ae", "surnames"}
    assert (
        spec["command"][:3] == ["${env}", "${interpreter}", "${program}"]
        and "${args}" in spec["command"]
    )


def test_sweeps_folder_has_no_init_so_the_sweeps_package_stays_importable():
    assert not (REPO / "sweeps" / "__init__.py").exists()
    assert sweep.import_sweeps().next_run is not None


def test_set_gives_every_trial_an_option_and_is_checked(tmp_path, capsys):
    spec = write_sweep(tmp_path / "s.yaml", {"hidden_size": {"values": [2, 3]}})
    out = tmp_path / "out"
    assert run(tmp_path, spec, "--sweep_dir", out, "--set", "steps=5", "--set", "seq_len=3") == 0
    for trial in ("trial-000", "trial-001"):
        config = json.loads((out / trial / "config.json").read_text())["config"]
        assert (config["steps"], config["seq_len"]) == (5, 3)
    assert run(tmp_path, spec, "--sweep_dir", tmp_path / "o2", "--set", "steps=abc") == 2
    assert "--steps='abc': expected int" in capsys.readouterr().err
    assert run(tmp_path, spec, "--sweep_dir", tmp_path / "o3", "--set", "hidden_size=4") == 2
    assert "hidden_size is swept by the file" in capsys.readouterr().err


def test_retry_failed_reruns_only_the_failed_trials(tmp_path):
    spec = write_sweep(tmp_path / "s.yaml", {"hidden_size": {"values": [2, 3]}})
    out = tmp_path / "out"
    assert run(tmp_path, spec, "--sweep_dir", out) == 0
    first = (out / "trial-000" / "summary.json").stat().st_mtime_ns
    state = json.loads((out / "sweep_state.json").read_text())
    state["trials"][1].update(status="failed", error="exit -9: killed")  # as if killed
    (out / "trial-001" / "summary.json").unlink()
    (out / "sweep_state.json").write_text(json.dumps(state))
    assert run(tmp_path, spec, "--sweep_dir", out) == 0  # without the flag: left failed
    assert json.loads((out / "sweep_state.json").read_text())["trials"][1]["status"] == "failed"
    assert run(tmp_path, spec, "--sweep_dir", out, "--retry_failed") == 0
    trials = json.loads((out / "sweep_state.json").read_text())["trials"]
    assert [t["status"] for t in trials] == ["finished", "finished"]
    assert (out / "trial-000" / "summary.json").stat().st_mtime_ns == first


def test_results_figure_uses_categorical_and_log_axes(tmp_path):
    """Discrete parameters get one tick per value (not 1.2, 1.4 between 1 and 2); a
    metric spanning more than two decades gets a log axis."""
    import sweep as sweep_module

    spec = {
        "metric": {"name": "eval_loss", "goal": "minimize"},
        "parameters": {"num_layers": {"values": [1, 2]}, "cell": {"values": ["rnn", "lstm"]}},
    }
    done = [
        {"id": f"t{i}", "params": {"num_layers": n, "cell": c}, "metric": m}
        for i, (n, c, m) in enumerate(
            [(1, "rnn", 1e-1), (2, "rnn", 1e-3), (1, "lstm", 1e-5), (2, "lstm", 1e-4)]
        )
    ]
    import matplotlib.pyplot as plt

    captured = {}
    original = plt.Figure.savefig

    def keep(fig, *a, **k):
        from tests.figure_check import problems

        captured["axes"], captured["problems"] = fig.axes, problems(fig)
        return original(fig, *a, **k)

    plt.Figure.savefig = keep
    try:
        sweep_module.plot_results(tmp_path, spec, done, "eval_loss", "minimize")
    finally:
        plt.Figure.savefig = original
    layers, cells = captured["axes"]
    assert [t.get_text() for t in layers.get_xticklabels()] == ["1", "2"]
    assert [t.get_text() for t in cells.get_xticklabels()] == ["rnn", "lstm"]
    assert layers.get_yscale() == "log"
    labels = layers.get_legend_handles_labels()[1]
    assert labels == ["each trial", "median over the other parameters", "best"]
    assert captured["problems"] == []  # no overlapping text, no empty panel


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("RGBA", 4), ("L", 1)])
def test_a_png_header_gives_its_size_and_channels(mode, channels):
    buffer = io.BytesIO()
    PIL.Image.new(mode, (7, 3)).save(buffer, format="png")
    assert png_shape(buffer.getvalue()) == (7, 3, channels)
    with pytest.raises(ValueError, match="not a PNG"):
        png_shape(b"GIF89a" + bytes(30))


@pytest.mark.parametrize(
    "method, count, had, expected",
    [("grid", None, 0, 6), ("grid", None, 4, 2), ("grid", 4, 1, 3), ("grid", 9, 0, 6),
     ("random", 5, 2, 3), ("random", 5, 7, 0)],
)  # fmt: skip
def test_the_workers_to_start_follow_what_is_left_to_propose(method, count, had, expected):
    import types

    spec = {"method": method,
            "parameters": {"cell": {"values": ["rnn", "lstm"]}, "hidden_size": {"value": 8},
                           "activation": {"values": ["tanh", "relu", "identity"]}}}  # fmt: skip
    state = types.SimpleNamespace(trials=[{}] * had)
    assert sweep.still_to_propose(spec, state, count) == expected
