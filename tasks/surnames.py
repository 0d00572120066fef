"""Surname -> language of origin: a character-level recurrent classifier.

Training: python train.py --task=surnames [--data_dir=DIR] [--key=value ...]
Inference from a trained workdir:
    python -m tasks.surnames predict --workdir DIR [--top 3] [--json] NAME [NAME ...]
    python -m tasks.surnames evaluate --workdir DIR --tsv FILE [--json]

Data handling (normalisation, unknown characters, deduplication, the stratified
80/10/10 split, hashed character n-grams, the download) is in data/surnames.py;
the model (a recurrent layer plus a bag of n-grams feeding the output layer)
in models/classifier.py. Early stopping keeps the parameters with the best
validation accuracy, or macro accuracy with --class_balanced (WORKDIR/best);
test metrics are those of that model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data import surnames as text
from experiment import faults
from experiment.config import from_dict, option, with_defaults
from experiment.errors import UsageError, command_exit_code
from experiment.figures import pyplot
from experiment.run import Run
from experiment.workdir import BEST_DIR, CHECKPOINTS_DIR, read_json_object, write_json_atomic
from models.classifier import SequenceClassifier
from models.recurrent import Cell
from training.checkpoints import read_config, restore_model
from training.config import TrainConfig
from training.loop import FitResult, Problem, fit
from training.summary import replica_summary

LABELS_FILE = "labels.json"


@dataclasses.dataclass(frozen=True)
@with_defaults(learning_rate=3e-3, optimizer="adamw", lr_schedule="cosine")
class Config(TrainConfig):
    data_dir: str | None = option(None, "directory of <Language>.txt files (default: download)")
    split_seed: int = option(0, "seed of the stratified 80/10/10 split", min=0)
    cell: Cell = option("lstm", "recurrent cell")
    num_layers: int = option(1, "stacked recurrent layers", min=1)
    hidden_size: int = option(128, "hidden units per layer", min=1)
    input: Literal["embedding", "onehot"] = option("embedding", "character input")
    embedding_dim: int = option(64, "embedding size (input=embedding)", min=1)
    bidirectional: bool = option(False, "also read each name backwards (two recurrent stacks)")
    dropout: float = option(
        0.5, "dropout on the inputs and the final state (training only)", min=0, lt=1
    )
    ngram_buckets: int = option(
        16384, "hashed character n-gram buckets whose bag feeds the head (0: off)", min=0
    )
    ngram_max: int = option(4, "longest character n-gram (ngram_buckets > 0)", min=1)
    ngram_dim: int = option(64, "n-gram embedding size (ngram_buckets > 0)", min=1)
    label_smoothing: float | None = option(
        None,
        "mix the one-hot targets with the uniform distribution by this much "
        "(none: 0.1, or 0 with class_balanced)",
        min=0,
        lt=1,
    )
    class_balanced: bool = option(
        False,
        "train for macro accuracy (see balance_method); selects the best model by validation "
        "macro accuracy",
    )
    balance_method: Literal["reweight", "logit_adjust"] = option(
        "reweight",
        "class_balanced: reweight = loss weights frequency^-balance_power; logit_adjust = "
        "cross-entropy of logits + balance_power * log(frequency) (Menon et al. 2021)",
    )
    balance_power: float = option(
        0.7, "class_balanced: strength (1 = full inverse frequency / full adjustment)", gt=0, max=1
    )
    patience: int = option(
        8,
        "evaluations without a better validation accuracy (macro accuracy when class_balanced) "
        "before stopping (0: never)",
        min=0,
    )
    steps: int = option(3000, "maximum optimizer steps (the cosine schedule's length)", min=1)
    batch_size: int = option(64, "names per step", min=1)
    weight_decay: float = option(
        0.05, "AdamW's decoupled weight decay (see --help of TrainConfig)", min=0
    )
    eval_every: int = option(225, "steps between validation evaluations (225 = one epoch)", min=1)
    log_every: int = option(225, "steps between training logs", min=1)
    checkpoint_every: int = option(2250, "steps between checkpoints", min=1)

    def check(self) -> None:
        super().check()
        if self.ngram_buckets == 1:
            raise UsageError(
                "--ngram_buckets=1: use 0 (no n-grams) or at least 2 (bucket 0 is padding)"
            )


@dataclasses.dataclass
class Prepared:
    """The encoded splits and what is needed to decode predictions."""

    languages: list[str]
    max_length: int
    splits: dict[str, dict[str, np.ndarray]]  # train/val/test -> tokens, lengths, labels
    names: dict[str, list[str]]
    ambiguity: dict
    notes: list[str]


def encode_names(cfg: Config, names: list[str], max_length: int | None = None) -> dict:
    """Model inputs of names: tokens and lengths, plus hashed n-gram ids when enabled."""
    tokens, lengths = text.pad(names, max_length)
    inputs = {"tokens": tokens, "lengths": lengths}
    if cfg.ngram_buckets:
        width = text.ngram_count(tokens.shape[1], cfg.ngram_max)
        inputs["ngrams"] = text.ngram_ids(names, cfg.ngram_max, cfg.ngram_buckets, width)
    return inputs


def prepare(cfg: Config) -> Prepared:
    data = text.read_directory(text.locate(cfg.data_dir))
    inputs = encode_names(cfg, data.names)
    max_length = inputs["tokens"].shape[1]
    parts = dict(
        zip(
            ("train", "val", "test"),
            text.stratified_split(data.labels, cfg.split_seed),
            strict=True,
        )
    )
    splits = {
        k: {**{name: v[idx] for name, v in inputs.items()}, "labels": data.labels[idx]}
        for k, idx in parts.items()
    }
    return Prepared(
        languages=data.languages,
        max_length=max_length,
        splits=splits,
        names={k: [data.names[i] for i in idx] for k, idx in parts.items()},
        ambiguity=text.ambiguity(data.names, data.labels, parts["train"], parts["test"]),
        notes=data.notes,
    )


def make_model(cfg: Config, num_classes: int, rngs: nnx.Rngs) -> SequenceClassifier:
    return SequenceClassifier(
        text.VOCAB_SIZE,
        num_classes,
        cfg.hidden_size,
        cfg.num_layers,
        input_kind=cfg.input,
        embedding_dim=cfg.embedding_dim,
        bidirectional=cfg.bidirectional,
        dropout_rate=cfg.dropout,
        ngram_buckets=cfg.ngram_buckets,
        ngram_dim=cfg.ngram_dim,
        cell=cfg.cell,
        impl="scan" if cfg.cell == "gru" else "fused",
        rngs=rngs,
    )


def class_weights(labels: np.ndarray, num_classes: int, power: float = 1.0) -> np.ndarray:
    """count_c^-power per class, scaled so the mean weight over the examples is 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    # a class absent from the training split gets the weight of a class of one example
    weights = np.maximum(counts, 1) ** -power
    return (weights / weights[labels].mean()).astype(np.float32)


def label_smoothing(cfg: Config) -> float:
    """The configured smoothing; by default 0.1, but 0 when class_balanced (measured: the
    balanced model is more accurate without it, see BENCHMARKS.md)."""
    if cfg.label_smoothing is not None:
        return cfg.label_smoothing
    return 0.0 if cfg.class_balanced else 0.1


def log_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """log of each class's training frequency (absent classes count once)."""
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 1).astype(np.float64)
    return np.log(counts / counts.sum()).astype(np.float32)


def classification_metrics(logits, labels, num_classes: int) -> dict[str, jax.Array]:
    """Accuracy, macro accuracy (mean per-class recall over present classes), mean CE."""
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, num_classes)
    per_class_count = onehot.sum(0)
    recall = (onehot * correct[:, None]).sum(0) / jnp.maximum(per_class_count, 1)
    present = per_class_count > 0
    return {
        "accuracy": correct.mean(),
        "macro_accuracy": jnp.sum(recall * present) / jnp.sum(present),
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
    }


# Options that enter the loss as values (Problem.hparams): trials differing only in
# them (and in seed, learning rate, weight decay) train packed in one program.
PACKABLE = ("dropout", "label_smoothing")


def hparams(cfg: Config) -> dict[str, float]:
    """Problem.hparams: the dropout rate and the label smoothing in effect."""
    return {"dropout": cfg.dropout, "label_smoothing": label_smoothing(cfg)}


def packs(cfg: Config) -> bool:
    """Trials with the hashed n-gram bag train alone. Measured on the 2-core CPU
    (BENCHMARKS.md, "Whole studies"): packed, a replica's step costs about 1.2x its
    step alone: each replica's n-gram table, its gradient and its AdamW moments
    (16 MB) no longer stay in the cache. A grid of 6 such trials took longer packed
    than unpacked on the same two workers. Without the bag, packing costs nothing
    per step."""
    return cfg.ngram_buckets == 0


def ignored_options(cfg: Config) -> set[str]:
    """Options this configuration does not use: trials differing only in them run the
    same program."""
    unused = set()
    if not cfg.class_balanced:
        unused |= {"balance_method", "balance_power"}
    if cfg.ngram_buckets == 0:
        unused |= {"ngram_max", "ngram_dim"}
    if cfg.input == "onehot":
        unused.add("embedding_dim")
    return unused


def training_problem(cfg: Config) -> tuple[Config, Problem]:
    """The training config and problem of the run's one `fit` (for training.packing)."""
    return cfg, make_problem(cfg, prepare(cfg))


def eval_fn(model, data, hp):
    """Validation metrics (no dropout, no smoothing). Module-level, so runs of one model
    structure in one process share its compiled program."""
    del hp
    logits = model(data["tokens"], data["lengths"], data.get("ngrams"))
    return classification_metrics(logits, data["labels"], logits.shape[-1])


def make_problem(cfg: Config, prepared: Prepared) -> Problem:
    num_classes = len(prepared.languages)
    train_labels = prepared.splits["train"]["labels"]
    reweight = cfg.class_balanced and cfg.balance_method == "reweight"
    adjust = cfg.class_balanced and cfg.balance_method == "logit_adjust"
    weights = jnp.asarray(
        class_weights(train_labels, num_classes, cfg.balance_power)
        if reweight
        else np.ones(num_classes, np.float32)
    )
    offsets = jnp.asarray(
        cfg.balance_power * log_prior(train_labels, num_classes)
        if adjust
        else np.zeros(num_classes, np.float32)
    )

    def loss_fn(model, batch, key, hp):
        logits = model(
            batch["tokens"],
            batch["lengths"],
            batch.get("ngrams"),
            dropout_key=key,
            dropout_rate=hp["dropout"],
        )
        targets = optax.smooth_labels(
            jax.nn.one_hot(batch["labels"], num_classes), hp["label_smoothing"]
        )
        ce = optax.softmax_cross_entropy(logits + offsets, targets)
        w = weights[batch["labels"]]
        return jnp.sum(ce * w) / jnp.sum(w), {}

    return Problem(
        make_model=lambda rngs: make_model(cfg, num_classes, rngs),
        # the model without its dropout rate (evaluation does not use it): trials that
        # differ in it share one compiled evaluation
        shared_model=lambda rngs: make_model(
            dataclasses.replace(cfg, dropout=0.0), num_classes, rngs
        ),
        hparams=hparams(cfg),
        loss_fn=loss_fn,
        train_data=prepared.splits["train"],
        eval_data=prepared.splits["val"],
        eval_fn=eval_fn,
        select_metric="macro_accuracy" if cfg.class_balanced else "accuracy",
        select_mode="max",
        patience=cfg.patience,
    )


@nnx.jit
def _logits(model: SequenceClassifier, inputs: dict):
    return model(inputs["tokens"], inputs["lengths"], inputs.get("ngrams"))


def predict_logits(model: SequenceClassifier, inputs: dict) -> np.ndarray:
    """Logits of encoded names (a dict with tokens, lengths and optionally ngrams)."""
    keys = ("tokens", "lengths", "ngrams")
    return np.asarray(_logits(model, {k: jnp.asarray(inputs[k]) for k in keys if k in inputs}))


def per_class_recall(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.asarray(
        [
            np.mean(predictions[labels == c] == c) if np.any(labels == c) else np.nan
            for c in range(num_classes)
        ]
    )


def run(cfg: Config, run: Run) -> dict:
    prepared = prepare(cfg)
    for note in prepared.notes:
        print(f"note: {note}")
    sizes = {k: len(v["labels"]) for k, v in prepared.splits.items()}
    print(
        f"{len(prepared.languages)} languages; "
        f"{sizes['train']:,} / {sizes['val']:,} / {sizes['test']:,} "
        f"names; {prepared.ambiguity['names_in_several_languages']} names under several languages "
        f"(test accuracy ceiling {prepared.ambiguity['test_accuracy_ceiling']:.4f})"
    )
    write_json_atomic(
        run.workdir / LABELS_FILE,
        {
            "languages": prepared.languages,
            "alphabet": text.ALPHABET,
            "max_length": prepared.max_length,
        },
    )
    result = fit(cfg, make_problem(cfg, prepared), run)
    summary = evaluate_result(cfg, run, result, prepared)
    return {**summary, **prepared.ambiguity, **result.stats}


def evaluate_result(cfg: Config, run: Run, result: FitResult, prepared: Prepared) -> dict:
    """Validation and test metrics of the selected model(s), per-class accuracy, confusion."""
    num_classes = len(prepared.languages)
    val = result.evaluate(prepared.splits["val"])
    test = result.evaluate(prepared.splits["test"])
    summary = {
        **replica_summary(
            {"accuracy": val["accuracy"], "macro_accuracy": val["macro_accuracy"]}, "val_"
        ),
        **replica_summary(
            {"accuracy": test["accuracy"], "macro_accuracy": test["macro_accuracy"]}, "test_"
        ),
    }
    model = result.model()
    split = prepared.splits["test"]
    predictions = predict_logits(model, split).argmax(-1)
    recall = per_class_recall(predictions, split["labels"], num_classes)
    summary.update(
        {
            f"test_accuracy_{lang}": float(r)
            for lang, r in zip(prepared.languages, recall, strict=True)
            if not np.isnan(r)  # a language with no test name has no accuracy
        }
    )
    print(
        f"test accuracy {summary['test_accuracy']:.4f}, "
        f"macro {summary['test_macro_accuracy']:.4f}, "
        f"val accuracy {summary['val_accuracy']:.4f}"
    )
    plot_confusion(run, predictions, split["labels"], prepared.languages)
    return summary


def plot_confusion(
    run: Run, predictions: np.ndarray, labels: np.ndarray, languages: list[str]
) -> None:
    """confusion_matrix.png: rows (true language) normalised to 1."""
    plt = pyplot()

    n = len(languages)
    counts = np.zeros((n, n))
    np.add.at(counts, (labels, predictions), 1)
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.45 * n + 2, 0.45 * n + 1.5))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n))
    ax.set_xticklabels(languages, rotation=90)
    ax.set_yticks(range(n))
    ax.set_yticklabels(languages)
    ax.set_xlabel("predicted language")
    ax.set_ylabel("true language")
    for i in range(n):
        for j in range(n):
            if rows[i, j] >= 0.1:  # label only the cells that matter: 18x18 numbers overlap
                ax.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if rows[i, j] > 0.5 else "black")  # fmt: skip
    fig.colorbar(image, fraction=0.04)
    ax.set_title("test set, rows normalised")
    run.save_figure(fig, "confusion_matrix")


# -------------------------------------------------------------------- inference


@dataclasses.dataclass
class Trained:
    model: SequenceClassifier
    languages: list[str]
    max_length: int
    cfg: Config


def load_trained(workdir: Path) -> Trained:
    """The selected (best) model of a surnames workdir, or a UsageError saying what is missing."""
    labels_file = workdir / LABELS_FILE
    if not labels_file.exists():
        raise UsageError(f"--workdir={workdir}: no {LABELS_FILE}; is it a trained surnames run?")
    labels = read_json_object(labels_file, "the label file")
    if not (
        isinstance(labels.get("languages"), list)
        and all(isinstance(x, str) for x in labels["languages"])
        and isinstance(labels.get("max_length"), int)
    ):
        raise UsageError(
            f"the label file {labels_file} lacks its languages list or max_length; "
            "restore it or retrain"
        )
    directory = workdir / BEST_DIR
    if not directory.is_dir():
        directory = workdir / CHECKPOINTS_DIR
        print(
            f"note: {workdir / BEST_DIR} is missing; using the last checkpoint in {directory} "
            "instead of the early-stopped best parameters",
            file=sys.stderr,
        )
    step, saved = read_config(directory)
    if saved.get("task") != "surnames":
        raise UsageError(f"--workdir={workdir} holds a {saved.get('task')!r} run, not surnames")
    # Runs saved before the n-gram bag existed had none; the new default would not fit them.
    cfg = from_dict(Config, {"ngram_buckets": 0, **saved["config"]})
    num_classes = len(labels["languages"])
    model = restore_model(  # replica 0 of a multi-seed run
        directory, step, lambda rngs: make_model(cfg, num_classes, rngs), cfg.num_seeds
    )
    return Trained(model, labels["languages"], labels["max_length"], cfg)


def probabilities(trained: Trained, names: list[str]) -> np.ndarray:
    inputs = encode_names(trained.cfg, names, trained.max_length)
    return np.asarray(jax.nn.softmax(predict_logits(trained.model, inputs), axis=-1))


def predict_command(args) -> None:
    if args.top < 1:
        raise UsageError(f"--top={args.top}: must be >= 1")
    trained = load_trained(Path(args.workdir))
    probs = probabilities(trained, args.names)
    top = min(args.top, len(trained.languages))
    for name, p in zip(args.names, probs, strict=True):
        best = np.argsort(-p)[:top]
        ranked = [[trained.languages[i], round(float(p[i]), 6)] for i in best]
        if args.json:
            print(json.dumps({"name": name, "predictions": ranked}, ensure_ascii=False))
        else:
            print(f"{name}: " + ", ".join(f"{lang} ({prob:.3f})" for lang, prob in ranked))


def read_tsv(path: Path, languages: list[str]) -> tuple[list[str], np.ndarray]:
    """Names and label indices from `name<TAB>language` lines; UsageError on bad lines."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: drop a BOM
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--tsv={path}: cannot read ({err})") from None
    names, labels = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip():
            raise UsageError(
                f"--tsv={path}, line {number}: expected name<TAB>language, got {line!r}"
            )
        name, language = parts[0].strip(), parts[1].strip()
        if language not in languages:
            raise UsageError(
                f"--tsv={path}, line {number}: unknown language {language!r}; "
                f"the model knows {', '.join(languages)}"
            )
        names.append(name)
        labels.append(languages.index(language))
    if not names:
        raise UsageError(f"--tsv={path}: no name<TAB>language lines")
    return names, np.asarray(labels, np.int32)


def evaluate_command(args) -> None:
    trained = load_trained(Path(args.workdir))
    names, labels = read_tsv(Path(args.tsv), trained.languages)
    predictions = probabilities(trained, names).argmax(-1)
    recall = per_class_recall(predictions, labels, len(trained.languages))
    result = {
        "accuracy": float(np.mean(predictions == labels)),
        "macro_accuracy": float(np.nanmean(recall)),
        "n": len(names),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"accuracy {result['accuracy']:.4f}, macro accuracy {result['macro_accuracy']:.4f} "
            f"(n={result['n']})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.surnames", exit_on_error=False)
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="top languages with probabilities for names")
    predict.add_argument("--workdir", required=True)
    predict.add_argument("--top", type=int, default=3)
    predict.add_argument("--json", action="store_true")
    predict.add_argument("names", nargs="+", metavar="NAME")
    evaluate = commands.add_parser("evaluate", help="accuracy on a name<TAB>language file")
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument("--tsv", required=True)
    evaluate.add_argument("--json", action="store_true")

    def body() -> int:
        with faults.quiet_library_noise():
            args = parser.parse_args(argv)
            (predict_command if args.command == "predict" else evaluate_command)(args)
        return 0

    return command_exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
