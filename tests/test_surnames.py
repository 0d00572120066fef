"""Surname classification: text handling, reading, splits, download, training, CLIs."""

import io
import json
import zipfile

import numpy as np
import pytest

from data import surnames as text
from experiment.errors import UsageError
from tasks import surnames
from tests.conftest import TINY_ARGS

TINY = TINY_ARGS["surnames"]


def test_normalisation_unknown_characters_and_padding():
    assert text.normalize("Šťastný") == "Stastny"
    assert text.normalize("Gómez-Nüñez") == "Gomez-Nunez"
    ids = text.encode("Aß'")
    assert ids[0] == 2 + text.ALPHABET.index("A") and ids[1] == text.UNK and ids[2] > text.UNK
    tokens, lengths = text.pad(["Ab", "Xyz", ""])
    assert tokens.shape == (3, 3) and lengths.tolist() == [2, 3, 1]
    assert tokens[0, 2] == text.PAD and tokens[2, 0] == text.UNK  # an empty name is one UNK


def write_languages(directory, files: dict[str, bytes]):
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / f"{name}.txt").write_bytes(content)
    return directory


def test_reading_skips_what_it_cannot_use_and_says_so(tmp_path):
    d = write_languages(tmp_path / "names", {
        "Alpha": b"Abe\n\nAbe\nAdams\n",  # a duplicate and an empty line
        "Beta": b"Bo\n\xff\xfeBad\nBaker\n",  # one line is not UTF-8
        "Gamma": b"\n\n",  # empty file
    })  # fmt: skip
    data = text.read_directory(d)
    assert data.languages == ["Alpha", "Beta"]
    assert sorted(zip(data.names, data.labels.tolist(), strict=True)) == [
        ("Abe", 0), ("Adams", 0), ("Baker", 1), ("Bo", 1)]  # fmt: skip
    assert any("Beta.txt: skipped 1 line" in n for n in data.notes)
    assert any("Gamma.txt: no names" in n for n in data.notes)


def test_too_few_languages_or_no_directory_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="need at least 2"):
        text.read_directory(write_languages(tmp_path / "one", {"Only": b"Name\n", "Empty": b""}))
    with pytest.raises(UsageError, match="not a directory"):
        text.read_directory(tmp_path / "missing")


def test_split_is_stratified_disjoint_and_reproducible():
    labels = np.repeat(np.arange(3), [100, 50, 10])
    train, val, test = text.stratified_split(labels, seed=1)
    assert (
        len(set(train) | set(val) | set(test)) == 160 and len(train) + len(val) + len(test) == 160
    )
    for c, n in enumerate([100, 50, 10]):
        assert np.sum(labels[val] == c) == round(0.1 * n) == np.sum(labels[test] == c)
    again = text.stratified_split(labels, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))


def test_ambiguity_counts_names_under_several_languages():
    names = ["Lee", "Lee", "Kim", "Roy", "Roy"]
    labels = np.array([0, 1, 1, 0, 2])
    stats = text.ambiguity(names, labels, train=np.array([0, 2, 3]), test=np.array([1, 4]))
    assert stats["names_in_several_languages"] == 2
    assert (
        stats["test_accuracy_ceiling"] == 0.0
    )  # both test names appear in train under another language


def test_download_offline_and_bad_archive_give_clear_errors(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(text.urllib.request, "urlopen", offline)
    with pytest.raises(UsageError, match=r"cannot download .* --data_dir=DIR"):
        text.download(tmp_path / "cache")

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data/names/English.txt", "Smith\n")

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(text.urllib.request, "urlopen", lambda *a, **k: Response(buffer.getvalue()))
    with pytest.raises(UsageError, match="does not match the expected checksum"):
        text.download(tmp_path / "cache")
    assert not (tmp_path / "cache" / "names").exists()


def test_shared_names_match_the_pinned_checksum(names_dir):
    assert text.content_checksum(names_dir) == text.CONTENT_SHA256


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, names_dir_module):
    workdir = tmp_path_factory.mktemp("surnames") / "run"
    import train

    args = ["--task=surnames", f"--data_dir={names_dir_module}", *TINY, f"--workdir={workdir}"]
    code = train.main([*args, "--wandb=disabled"])
    assert code == 0
    return workdir


@pytest.fixture(scope="module")
def names_dir_module():
    from tests.conftest import shared_data

    return shared_data("names")


def test_real_data_training_beats_the_majority_class(trained_workdir, names_dir_module):
    s = json.loads((trained_workdir / "summary.json").read_text())
    data = text.read_directory(names_dir_module)
    _, _, test = text.stratified_split(data.labels, seed=0)
    majority = np.bincount(data.labels[test]).max() / len(test)
    assert s["test_accuracy"] > majority + 0.1
    assert 0 < s["test_macro_accuracy"] < s["test_accuracy"]
    assert s["names_in_several_languages"] == 469 and 0.9 < s["test_accuracy_ceiling"] < 1
    assert len([k for k in s if k.startswith("test_accuracy_") and k[14:15].isupper()]) == 18
    assert (trained_workdir / "confusion_matrix.png").stat().st_size > 20_000
    assert (trained_workdir / "best").is_dir()


def test_predict_cli(trained_workdir, capsys):
    assert (
        surnames.main(
            ["predict", "--workdir", str(trained_workdir), "--top", "2", "Ivanov", "Nguyen"]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Ivanov: ") and lines[0].count("(") == 2
    assert surnames.main(["predict", "--workdir", str(trained_workdir), "--json", "Dvořák"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["name"] == "Dvořák" and len(record["predictions"]) == 3
    probs = [p for _, p in record["predictions"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6


def test_evaluate_cli_and_its_errors(trained_workdir, tmp_path, capsys):
    tsv = tmp_path / "names.tsv"
    tsv.write_text("Ivanov\tRussian\nSmith\tEnglish\n\nRossi\tItalian\n")
    assert (
        surnames.main(["evaluate", "--workdir", str(trained_workdir), "--tsv", str(tsv), "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 3 and 0 <= result["accuracy"] <= 1 and 0 <= result["macro_accuracy"] <= 1
    tsv.write_text("Ivanov\tKlingon\n")
    assert surnames.main(["evaluate", "--workdir", str(trained_workdir), "--tsv", str(tsv)]) == 2
    assert "unknown language 'Klingon'" in capsys.readouterr().err
    tsv.write_text("no tab here\n")
    assert surnames.main(["evaluate", "--workdir", str(trained_workdir), "--tsv", str(tsv)]) == 2
    assert "line 1: expected name<TAB>language" in capsys.readouterr().err
    assert surnames.main(["predict", "--workdir", str(tmp_path), "X"]) == 2
    assert "no labels.json" in capsys.readouterr().err


def test_bad_surnames_input_exits_2(train_cli, tmp_path):
    code, _, err = train_cli(
        "--task=surnames", f"--data_dir={tmp_path / 'nope'}", f"--workdir={tmp_path / 'w'}"
    )
    assert code == 2 and "not a directory" in err
    d = write_languages(tmp_path / "one", {"Only": b"Name\n"})
    code, _, err = train_cli("--task=surnames", f"--data_dir={d}", f"--workdir={tmp_path / 'w2'}")
    assert code == 2 and "need at least 2" in err
    code, _, err = train_cli("--task=surnames", "--ngram_buckets=1", f"--workdir={tmp_path / 'w3'}")
    assert code == 2 and "--ngram_buckets=1: use 0" in err
    assert not (tmp_path / "w3").exists()


def test_ngram_ids_frame_normalise_hash_and_pad():
    ids = text.ngram_ids(["Ab", "Äbc"], max_n=2, buckets=1000)
    # "^ab$": a, b, ^a, ab, b$ (the marks alone are not n-grams); "^abc$": 7
    assert ids.shape == (2, 7) and (ids[0] > 0).sum() == 5 and (ids[1] > 0).sum() == 7
    assert ids.min() >= 0 and ids.max() < 1000
    assert ids[0, :4].tolist() == ids[1, [0, 1, 3, 4]].tolist()  # shared a, b, ^a, ab
    assert np.array_equal(ids, text.ngram_ids(["Ab", "Abc"], 2, 1000))  # Ä -> A, stable hash
    assert text.ngram_ids(["Abc"], 2, 1000, width=3).shape == (1, 3)
    for length, max_n in ((1, 4), (1, 6), (7, 4), (20, 4)):
        ids = text.ngram_ids(["x" * length], max_n, 10**6)
        assert text.ngram_count(length, max_n) == (ids > 0).sum() == ids.shape[1]


def test_ngram_bag_ignores_padding_and_must_match_the_model():
    import jax.numpy as jnp
    from flax import nnx

    from models.classifier import SequenceClassifier

    model = SequenceClassifier(10, 3, 8, ngram_buckets=50, ngram_dim=4, rngs=nnx.Rngs(0))
    tokens, lengths = jnp.asarray([[2, 3, 0]]), jnp.asarray([2])
    grams = jnp.asarray([[5, 7, 9]])
    padded = jnp.asarray([[5, 7, 9, 0, 0]])
    np.testing.assert_allclose(model(tokens, lengths, grams), model(tokens, lengths, padded))
    assert not np.allclose(model(tokens, lengths, grams), model(tokens, lengths, grams[:, :1]))
    with pytest.raises(ValueError, match="n-gram ids"):
        model(tokens, lengths)


@pytest.mark.parametrize("input_kind", ["embedding", "onehot"])
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_mixed_precision_gradients_are_bfloat16_and_near_float32(input_kind, cell):
    """With the parameters cast to bfloat16 (`--dtype=bfloat16`), the recurrent layers
    compute in bfloat16 (their inputs too: the fused backward's gradient sums once
    met float32 inputs and failed to trace), and the gradient stays near float32's."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from models.classifier import SequenceClassifier
    from training.loop import _cast_floats

    model = SequenceClassifier(12, 3, 16, input_kind=input_kind, cell=cell, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 12, (6, 9)))
    lengths = jnp.asarray([9, 4, 2, 5, 3, 1])  # the last steps are padding in most rows

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens, lengths).astype(jnp.float32)
        return jnp.sum(jnp.tanh(logits))

    full = jax.grad(loss)(params)
    half = jax.jit(jax.grad(loss))(_cast_floats(params, jnp.bfloat16))
    for g32, g16 in zip(jax.tree.leaves(full), jax.tree.leaves(half), strict=True):
        assert g16.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(g32))) + 1e-6
        np.testing.assert_allclose(np.asarray(g16, np.float32), g32, atol=0.05 * scale)


def test_log_prior_and_class_weights():
    labels = np.asarray([0, 0, 0, 1])
    np.testing.assert_allclose(np.exp(surnames.log_prior(labels, 3)), [0.6, 0.2, 0.2], rtol=1e-6)
    w = surnames.class_weights(labels, 2)
    assert w[labels].mean() == pytest.approx(1.0) and w[1] == pytest.approx(3 * w[0])


def test_evaluate_cli_on_the_test_split_equals_the_training_summary(
    trained_workdir, names_dir_module, tmp_path, capsys
):
    data = text.read_directory(names_dir_module)
    _, _, test = text.stratified_split(data.labels, seed=0)
    tsv = tmp_path / "test.tsv"
    tsv.write_text(
        "".join(f"{data.names[i]}\t{data.languages[data.labels[i]]}\n" for i in test),
        encoding="utf-8",
    )
    args = ["evaluate", "--workdir", str(trained_workdir), "--tsv", str(tsv), "--json"]
    assert surnames.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((trained_workdir / "summary.json").read_text())
    assert result["n"] == len(test)
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert result["macro_accuracy"] == pytest.approx(summary["test_macro_accuracy"], abs=1e-6)


def test_label_smoothing_defaults_to_0_1_and_to_0_when_class_balanced():
    assert surnames.label_smoothing(surnames.Config()) == 0.1
    assert surnames.label_smoothing(surnames.Config(class_balanced=True)) == 0.0
    assert (
        surnames.label_smoothing(surnames.Config(class_balanced=True, label_smoothing=0.2)) == 0.2
    )


def test_a_rerun_of_an_early_stopped_run_trains_nothing(train_cli, names_dir, tmp_path):
    """Resuming a run that stopped early keeps it stopped: the rerun used to train on
    until the next evaluation without improvement, rewriting checkpoints and summary."""
    changed = {"--steps": 2000, "--eval_every": 20, "--log_every": 20, "--patience": 1}
    kept = [a for a in TINY if a.split("=")[0] not in changed]
    args = [
        "--task=surnames", f"--data_dir={names_dir}", *kept,
        *(f"{k}={v}" for k, v in changed.items()), "--ngram_buckets=0",
        f"--workdir={tmp_path}", "--wandb=disabled",
    ]  # fmt: skip
    assert train_cli(*args)[0] == 0
    first = json.loads((tmp_path / "summary.json").read_text())
    assert first["stopped_early"] is True and first["steps"] < 2000  # the premise
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    code, out, _ = train_cli(*args)
    assert code == 0 and f"resuming from checkpoint step {first['steps']}" in out
    assert json.loads((tmp_path / "summary.json").read_text()) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == steps
