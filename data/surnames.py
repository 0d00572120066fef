"""Surnames by language: reading, cleaning, encoding, splitting, downloading.

Input: a directory of `<Language>.txt` files (UTF-8, one surname per line); the
classes are the file names, sorted. Reading is forgiving and says what it did:
empty lines are skipped, lines that are not valid UTF-8 are skipped and
counted, a leading byte-order mark is dropped, empty files and entries that are
not files (directories, dangling links) are skipped with a note, and fewer than
two usable languages is an error.

Text: Unicode NFD, combining marks removed ("Šťastný" -> "Stastny"), then
each character is looked up in ALPHABET (ASCII letters, space and . , ; ' -);
anything else becomes the UNK token. Token ids: 0 padding, 1 unknown, 2.. the
alphabet in order. Names are padded to the longest name; lengths drive the
recurrent layer's mask.

Split: (name, language) pairs are deduplicated, then split 80/10/10 per
language (stratified) with a seed.

Download: without a directory, the public archive of the PyTorch tutorial
(`data.zip` with `data/names/*.txt`) is fetched into a cache once; the
extracted files must match CONTENT_SHA256 (a checksum of the file names and
bytes), so a changed or corrupted archive is refused.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import hashlib
import io
import os
import string
import unicodedata
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

from experiment.errors import UsageError

ALPHABET = string.ascii_letters + " .,;'-"
PAD, UNK = 0, 1
VOCAB_SIZE = len(ALPHABET) + 2
_INDEX = {c: i + 2 for i, c in enumerate(ALPHABET)}

ARCHIVE_URL = "https://download.pytorch.org/tutorial/data.zip"
CONTENT_SHA256 = "a4d986ac8640b397aeb3c787600cd9b4a2e7cfccb21be37930a790e15ddf0ee7"
CACHE_DIR = Path(os.environ.get("RNNAE_DATA_DIR", Path.home() / ".cache" / "rnnae" / "data"))


def normalize(name: str) -> str:
    """NFD, then drop combining marks."""
    return "".join(c for c in unicodedata.normalize("NFD", name) if not unicodedata.combining(c))


def encode(name: str) -> list[int]:
    """Token ids of a (normalised) name; characters outside ALPHABET become UNK."""
    return [_INDEX.get(c, UNK) for c in normalize(name)]


@dataclasses.dataclass
class Surnames:
    names: list[str]
    labels: np.ndarray  # (N,) int32 index into languages
    languages: list[str]
    notes: list[str]  # what reading skipped, for the run's log


def content_checksum(directory: Path) -> str:
    """SHA-256 over the sorted `*.txt` file names and their bytes."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.txt")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def read_directory(directory: Path) -> Surnames:
    """Every usable (name, language) pair of a directory, deduplicated."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"--data_dir={directory}: not a directory of <Language>.txt files")
    files = sorted(directory.glob("*.txt"))
    notes, per_language = [], {}
    for path in files:
        if not path.is_file():  # a directory or a dangling link named X.txt
            notes.append(f"{path.name}: not a readable file, skipped")
            continue
        try:
            content = path.read_bytes()
        except OSError as err:
            raise UsageError(f"--data_dir: cannot read {path} ({err.strerror or err})") from None
        names, undecodable = [], 0
        # a byte-order mark (some editors write one) is not part of the first name
        for raw in content.removeprefix(codecs.BOM_UTF8).splitlines():
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                undecodable += 1
                continue
            if line:
                names.append(line)
        if undecodable:
            notes.append(f"{path.name}: skipped {undecodable} line(s) that are not UTF-8")
        if names:
            per_language[path.stem] = names
        else:
            notes.append(f"{path.name}: no names, language skipped")
    if len(per_language) < 2:
        raise UsageError(
            f"--data_dir={directory}: {len(per_language)} usable language file(s); "
            "need at least 2 non-empty <Language>.txt files"
        )
    languages = sorted(per_language)
    pairs = sorted({(n, languages.index(lang)) for lang, ns in per_language.items() for n in ns})
    names = [n for n, _ in pairs]
    labels = np.asarray([label for _, label in pairs], np.int32)
    return Surnames(names, labels, languages, notes)


def stratified_split(labels: np.ndarray, seed: int, fractions=(0.8, 0.1, 0.1)) -> list[np.ndarray]:
    """Index arrays (train, val, test), each language split in the given proportions."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val = round(fractions[1] * len(idx))
        n_test = round(fractions[2] * len(idx))
        n_train = len(idx) - n_val - n_test
        for part, chunk in zip(parts, np.split(idx, [n_train, n_train + n_val]), strict=True):
            part.extend(chunk.tolist())
    splits = [np.asarray(sorted(p), np.int64) for p in parts]
    empty = [name for name, part in zip(("train", "validation", "test"), splits, strict=True)
             if not len(part)]  # fmt: skip
    if empty:
        raise UsageError(
            f"too few names to split {len(labels)} names 80/10/10 per language: the "
            f"{' and '.join(empty)} split(s) would be empty; a language needs at least 5 names "
            "for each split to get one"
        )
    return splits


def pad(names: list[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N, L) int32, lengths (N,) int32), L = the longest name unless given."""
    encoded = [encode(n)[: length or None] or [UNK] for n in names]
    width = length or max(len(e) for e in encoded)
    tokens = np.zeros((len(encoded), width), np.int32)
    for i, e in enumerate(encoded):
        tokens[i, : len(e)] = e
    return tokens, np.asarray([len(e) for e in encoded], np.int32)


def ngram_ids(names: list[str], max_n: int, buckets: int, width: int | None = None) -> np.ndarray:
    """Hashed character n-grams (n = 1..max_n) of each name, (N, M) int32, 0 = padding.

    Names are normalised and lower-cased and framed by boundary marks ("^ab$"),
    so prefixes and suffixes get n-grams of their own. Each n-gram maps to a
    bucket in 1..buckets-1 by CRC-32 (stable across processes and machines).
    M is the largest count unless `width` is given (longer lists are truncated).
    """
    rows = []
    for name in names:
        framed = "^" + normalize(name).lower() + "$"
        grams = [framed[i : i + n] for n in range(1, max_n + 1) for i in range(len(framed) - n + 1)]
        grams = [g for g in grams if g not in ("^", "$", "^$")]  # a mark alone is no n-gram
        rows.append([1 + zlib.crc32(g.encode()) % (buckets - 1) for g in grams])
    width = width or max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : min(len(r), width)] = r[:width]
    return ids


def ngram_count(length: int, max_n: int) -> int:
    """How many n-grams ngram_ids gives a name of `length` characters (length >= 1)."""
    framed = length + 2
    return sum(max(0, framed - n + 1) for n in range(1, max_n + 1)) - 2


def ambiguity(names: list[str], labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict:
    """How many names carry several languages, and the accuracy ceiling this implies.

    A test pair (name, language) whose name occurs in the training set only under
    other languages cannot be classified correctly by a model that fits its
    training data; the ceiling is the fraction of test pairs without that problem.
    """
    by_name = collections.defaultdict(set)
    for n, label in zip(names, labels, strict=True):
        by_name[n].add(int(label))
    train_labels = collections.defaultdict(set)
    for i in train:
        train_labels[names[i]].add(int(labels[i]))
    lost = sum(
        1
        for i in test
        if train_labels.get(names[i]) and int(labels[i]) not in train_labels[names[i]]
    )
    return {
        "names_in_several_languages": sum(1 for s in by_name.values() if len(s) > 1),
        "test_accuracy_ceiling": 1.0 - lost / len(test),
    }


def download(cache: Path = CACHE_DIR) -> Path:
    """The tutorial archive's names directory, downloaded and verified once into `cache`."""
    target = cache / "names"
    if target.is_dir() and content_checksum(target) == CONTENT_SHA256:
        return target
    where = (
        f"put the 18 <Language>.txt files in a directory and pass --data_dir=DIR "
        f"(or place them in {target})"
    )
    try:
        with urllib.request.urlopen(ARCHIVE_URL, timeout=30) as response:
            archive = zipfile.ZipFile(io.BytesIO(response.read()))
    except OSError as err:
        raise UsageError(f"cannot download {ARCHIVE_URL} ({err}); {where}") from None
    staging = cache / "names.partial"
    staging.mkdir(parents=True, exist_ok=True)
    for member in archive.namelist():
        if member.startswith("data/names/") and member.endswith(".txt"):
            (staging / Path(member).name).write_bytes(archive.read(member))
    if content_checksum(staging) != CONTENT_SHA256:
        raise UsageError(f"the downloaded archive does not match the expected checksum; {where}")
    staging.replace(target)
    return target


def locate(data_dir: str | None) -> Path:
    """--data_dir if given; else the verified cache, downloading it if needed."""
    return Path(data_dir) if data_dir else download()
