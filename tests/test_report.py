"""report.py: every section and figure from a tiny --quick run; numbers equal run summaries."""

import argparse
import json

import pytest

import report

TINY = {
    **{"steps": 20, "epochs": 0, "hidden_size": 8, "seq_len": 6, "num_train": 300},
    **{"num_test": 100, "num_eval": 50, "probe_iterations": 5, "eval_every": 10},
    **{"log_every": 10, "checkpoint_every": 20, "hidden_sizes": 16, "batch_size": 16},
    **{"probe_batch": 4, "latent_sizes": "2,4", "lambda_grid": "0.01"},
}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    from tests.conftest import shared_data

    mnist, names = shared_data("mnist"), shared_data("names")
    out = tmp_path_factory.mktemp("report")
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    args = ["--quick", f"--out={out}", f"--mnist_dir={mnist}", f"--names_dir={names}", *sets]
    # two workers, as the report is meant to be run on two cores (a third of the time)
    assert report.main([*args, "--workers=2"]) == 0
    return out


def test_every_section_and_figure_is_written(tiny_report):
    text = (tiny_report / "README.md").read_text()
    for section in report.SECTIONS:
        assert f"## {section.title}" in text
        for name, png in section.figures:
            assert (tiny_report / "figures" / f"{name}_{png}.png").stat().st_size > 5_000
            assert f"figures/{name}_{png}.png" in text
    assert "Mode: quick" in text and "minutes on cpu" in text
    data = json.loads((tiny_report / "report.json").read_text())
    assert all(run["ok"] for run in data["runs"].values())


def test_table_numbers_are_the_runs_summaries(tiny_report):
    text = (tiny_report / "README.md").read_text()
    summary = json.loads((tiny_report / "runs" / "ra_rnn1_all" / "summary.json").read_text())
    cells = [report.fmt(summary[k]) for k in ("train_loss", "eval_mse_all_steps")]
    assert f"| ra_rnn1_all | {cells[0]} | {cells[1]} |" in text
    probe = json.loads((tiny_report / "runs" / "mnist_masked" / "summary.json").read_text())
    assert f"| masked | {report.fmt(probe['probe_accuracy'])} |" in text
    sections = json.loads((tiny_report / "report.json").read_text())["sections"]
    rows = sections["Vanilla vs denoising vs masked autoencoders on MNIST"]["rows"]
    assert rows[2][1] == probe["probe_accuracy"]
    # tiny settings miss the documented findings, and the report says so instead of hiding it
    assert "**Mismatch:**" in text


def test_a_second_run_reuses_finished_experiments(tiny_report, capsys):
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    assert report.main(["--quick", f"--out={tiny_report}", "--names_dir=/nonexistent", *sets]) == 0
    runs = json.loads((tiny_report / "report.json").read_text())["runs"]
    assert runs["ra_rnn1_all"]["reused"] and runs["linear_ae"]["reused"]
    assert not runs["surnames"]["ok"] and "not a directory" in runs["surnames"]["error"]
    assert "`surnames` (FAILED)" in (tiny_report / "README.md").read_text()


def test_an_unfinished_experiment_resumes_and_packed_ones_share_a_program(tiny_report, capsys):
    # the tiny report packed the running-average runs that differ only in the loss
    workdir = tiny_report / "runs" / "ra_lstm1_last"
    assert "trained packed with ra_lstm1_all" in (workdir / "trial.log").read_text()
    before = json.loads((workdir / "summary.json").read_text())
    (workdir / "summary.json").unlink()  # as if the report was interrupted before its end
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    assert report.main(["--quick", f"--out={tiny_report}", "--names_dir=/nonexistent", *sets]) == 0
    assert "resuming from checkpoint step 20" in (workdir / "trial.log").read_text()
    after = json.loads((workdir / "summary.json").read_text())
    assert after["eval_loss"] == before["eval_loss"]
    assert not json.loads((tiny_report / "report.json").read_text())["runs"]["ra_lstm1_last"][
        "reused"
    ]


def test_missing_mnist_is_explained_not_fatal(tmp_path):
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    args = [
        "--quick",
        f"--out={tmp_path}",
        f"--mnist_dir={tmp_path / 'none'}",
        "--names_dir=/nonexistent",
        *sets,
    ]
    report.SECTIONS, saved = [s for s in report.SECTIONS if "MNIST" in s.title], report.SECTIONS
    try:
        assert report.main(args) == 0
    finally:
        report.SECTIONS = saved
    text = (tmp_path / "README.md").read_text()
    assert "MNIST not found" in text and "--mnist_dir=DIR" in text


def test_quick_claims_are_counted_and_full_targets_not_judged(tiny_report):
    text = (tiny_report / "README.md").read_text()
    counts = text.split("Claims: ", 1)[1].split(".", 1)[0]
    confirmed, mismatch, unchecked = (int(part.split()[0]) for part in counts.split(", "))
    # the surnames 0.84 goal, both MNIST gains and the 2-layer RNN's 0.001 (3000 steps)
    assert unchecked >= 4
    assert text.count("*Not checked at quick settings") >= 4
    assert "*Not checked at quick settings (a target of the full settings):* The 2-layer" in text
    assert "0.84 goal" not in text.split("**Mismatch:**", 1)[-1].split("\n")[0]
    assert confirmed + mismatch + unchecked == (
        text.count("*Not checked at quick settings")
        + text.count("(not measured:")
        + text.count("**Mismatch:**")
        + confirmed
    )
    assert "probe accuracy (1 seed)" in text and "probe std" not in text  # quick: one seed


def test_a_bad_worker_count_is_one_line_and_exit_2(tmp_path, capsys):
    assert report.main(["--quick", f"--out={tmp_path / 'out'}", "--workers=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --workers=0: must be >= 1"]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_experiments_start_costliest_first_and_workers_before_planning(tmp_path, monkeypatch):
    """Workers take the trials in the order given: the costliest go first, so the last
    to start are short and no worker is left alone with a long experiment at the end.
    The workers for the unfinished experiments start before planning loads the tasks."""
    from tests.conftest import shared_data

    planned: list[str] = []
    plan = report.plan_experiment
    monkeypatch.setattr(
        report, "plan_experiment", lambda e, *args: planned.append(e.name) or plan(e, *args)
    )
    given: list[str] = []
    started: list[int] = []

    def record_order(more, *, expected, **kwargs):
        assert not planned  # run_trials starts `expected` workers before asking `more`
        started.append(expected)
        given.extend(t.id for t in more(2))
        assert more(2) == []  # planned once

    monkeypatch.setattr(report, "run_trials", record_order)
    opts = argparse.Namespace(
        quick=True, overrides={}, mnist_dir=shared_data("mnist"), names_dir=shared_data("names"),
        workers=2, no_pack=False,
    )  # fmt: skip
    finished = tmp_path / "runs" / "scalar_t3" / "summary.json"
    finished.parent.mkdir(parents=True)
    finished.write_text("{}")  # a summary without its config: not reused, but not counted
    report.run_experiments(opts, tmp_path / "runs")
    experiments = {e.name: e for section in report.SECTIONS for e in section.experiments}
    assert started == [len(experiments) - 1]
    assert sorted(given) == sorted(experiments)  # each once
    seconds = [experiments[name].seconds for name in given]
    assert seconds == sorted(seconds, reverse=True)
    assert given[:2] == ["latent_synthetic", "surnames"]
    assert set(given[-3:]) == {"scalar_t3", "scalar_t7", "flow_identity_105"}
    mnist = [name for name in given if name.startswith("mnist_")]  # equal: sections' order
    assert mnist == [e.name for e in report.MNIST]


def test_ctrl_c_while_planning_stops_the_workers_already_started(tmp_path, monkeypatch, capsys):
    """Planning runs after the workers started: Ctrl-C then ends them too, exit 130."""
    from experiment import study

    started: list[study.Worker] = []

    class RecordedWorker(study.Worker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    def interrupted(e, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "Worker", RecordedWorker)
    monkeypatch.setattr(report, "plan_experiment", interrupted)
    assert report.main(["--quick", f"--out={tmp_path}", "--workers=2"]) == 130
    assert capsys.readouterr().err.strip() == (
        "interrupted; rerun the same command to continue the report"
    )
    assert len(started) == 2 and all(w.proc.poll() is not None for w in started)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["workers.log"]  # nothing else
