"""MNIST from the original IDX files or from TensorFlow Datasets (without TensorFlow).

Ways to provide the data:

* `python -m data.mnist download --dir DIR` fetches the four original IDX files
  (from the mirror TensorFlow uses, else PyTorch's), checks each against its
  published SHA-256 and writes it atomically; then pass `--mnist_dir=DIR`.
* `--mnist_dir=DIR`: a directory with the original files
  `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
  `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`. With only the
  10k test files present, they are split in file order: the first 8,000 images
  train, the last 2,000 test (the run says so).
* TFDS: `tfds.data_source("mnist")` over a prepared array_record copy in
  `--data_dir` or $TFDS_DATA_DIR. Preparing one (`tfds build mnist
  --file_format=array_record`) needs TensorFlow, which this project does not
  install; the IDX download above does not. Training never downloads.

Images become float32 vectors in [0, 1] of length 784; labels int32.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path

import numpy as np

from experiment.errors import UsageError, command_exit_code

IMAGE_SHAPE = (28, 28)
TRAIN_FROM_TEST_SET = 8_000
HOW_TO_PROVIDE = (
    "get the original IDX files with `python -m data.mnist download --dir DIR` and pass "
    "--mnist_dir=DIR (a directory holding t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz, and optionally the train-* files), or pass a TFDS "
    "array_record copy with --data_dir=DIR or $TFDS_DATA_DIR (building one needs TensorFlow)"
)

# The published SHA-256 of each original (gzipped) file, as TFDS pins them.
IDX_SHA256 = {
    name: digest
    for name, digest in (
        ("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea37026"
                                       "5605f56be210a4024d2ca8f203523609"),
        ("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cc"
                                       "a23d567ec52cac8be1a0730e8010255c"),
        ("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e3"
                                      "3eeafee792b84584aec276f5a2dbc4e6"),
        ("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd"
                                      "2371eca3ffa0defaefb259924204aec6"),
    )
}  # fmt: skip
MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)


@dataclasses.dataclass
class Mnist:
    x_train: np.ndarray  # (N, 784) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int32
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # where the data came from, for logs and summaries
    split_from_test_set: bool  # True when the 10k test set was split 8,000 / 2,000


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (ubyte data only, as MNIST uses), gzip or not; UsageError if malformed."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise UsageError(f"cannot read IDX file {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UsageError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise UsageError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _pair(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels = _find(directory, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE or y.ndim != 1 or len(x) != len(y):
        raise UsageError(
            f"{images.name} / {labels.name}: shapes {x.shape} / {y.shape} are not MNIST's"
        )
    return _as_vectors(x), y.astype(np.int32)


def _as_vectors(images: np.ndarray) -> np.ndarray:
    return (images.reshape(len(images), -1).astype(np.float32) / 255.0).astype(np.float32)


def load_idx_dir(directory: Path) -> Mnist:
    """MNIST from a directory of IDX files (see module docstring)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"--mnist_dir={directory}: not a directory; {HOW_TO_PROVIDE}")
    test = _pair(directory, "t10k")
    train = _pair(directory, "train")
    if test is None:
        raise UsageError(
            f"--mnist_dir={directory}: no t10k-images/labels IDX files; {HOW_TO_PROVIDE}"
        )
    if train is not None:
        return Mnist(*train, *test, source=f"IDX files in {directory}", split_from_test_set=False)
    x, y = test
    cut = min(TRAIN_FROM_TEST_SET, len(x) * 4 // 5)
    return Mnist(
        x[:cut],
        y[:cut],
        x[cut:],
        y[cut:],
        source=f"IDX test files in {directory}, split in file order: first {cut:,} train / "
        f"last {len(x) - cut:,} test",
        split_from_test_set=True,
    )


def load_tfds(data_dir: str | None) -> Mnist:
    """MNIST through `tfds.data_source` (array_record); never downloads."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UsageError(f"tensorflow-datasets is not installed; {HOW_TO_PROVIDE}") from None
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    try:
        splits = tfds.data_source(
            "mnist", split=["train", "test"], data_dir=data_dir, download=False
        )
        arrays = [_tfds_arrays(s) for s in splits]
    except UsageError:
        raise
    except Exception as err:  # TFDS raises many types for a missing or unprepared copy
        where = data_dir or "the default TFDS directory"
        raise UsageError(
            f"no prepared MNIST in {where} ({type(err).__name__}); {HOW_TO_PROVIDE}"
        ) from None
    (x_train, y_train), (x_test, y_test) = arrays
    return Mnist(
        x_train,
        y_train,
        x_test,
        y_test,
        source=f"TFDS ({data_dir or 'default dir'})",
        split_from_test_set=False,
    )


def _tfds_arrays(source) -> tuple[np.ndarray, np.ndarray]:
    examples = [source[i] for i in range(len(source))]
    if not examples:
        raise UsageError(f"the TFDS MNIST split is empty; {HOW_TO_PROVIDE}")
    images = np.stack([np.asarray(e["image"]).reshape(IMAGE_SHAPE) for e in examples])
    labels = np.asarray([int(e["label"]) for e in examples], np.int32)
    return _as_vectors(images), labels


def load_mnist(mnist_dir: str | None = None, data_dir: str | None = None) -> Mnist:
    """IDX directory if given, else TFDS."""
    if mnist_dir:
        return load_idx_dir(Path(mnist_dir))
    return load_tfds(data_dir)


# ------------------------------------------------------------------ download


def _sha256(payload: bytes) -> str:
    import hashlib

    return hashlib.sha256(payload).hexdigest()


def _fetch(name: str) -> bytes:
    """The file from the first mirror that serves it with the published checksum."""
    import urllib.request

    failures = []
    for mirror in MIRRORS:
        try:
            with urllib.request.urlopen(mirror + name, timeout=60) as response:
                payload = response.read()
        except OSError as err:  # URLError, timeouts, refused connections
            failures.append(f"{mirror}: {getattr(err, 'reason', err)}")
            continue
        if _sha256(payload) == IDX_SHA256[name]:
            return payload
        failures.append(f"{mirror}: checksum mismatch")
    raise UsageError(
        f"cannot download {name} ({'; '.join(failures)}); without network, copy the four "
        "original IDX files into the directory yourself and pass --mnist_dir=DIR"
    )


def download(directory: Path) -> list[Path]:
    """The four original IDX files in `directory`, fetched and verified where missing or
    wrong (a file already there with the right checksum is kept)."""
    from experiment.workdir import write_bytes_atomic

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--dir={directory}: exists and is not a directory")
    paths = []
    for name, expected in IDX_SHA256.items():
        path = directory / name
        if path.is_file() and _sha256(path.read_bytes()) == expected:
            print(f"{name}: present, checksum verified")
        else:
            payload = _fetch(name)
            try:
                write_bytes_atomic(path, payload)  # never a half-written file
            except OSError as err:
                raise UsageError(f"cannot write {path} ({err.strerror or err})") from None
            print(f"{name}: downloaded, checksum verified ({len(payload):,} bytes)")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m data.mnist", exit_on_error=False)
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="the original IDX files, SHA-256 checked")
    get.add_argument("--dir", required=True, type=Path, help="where to put them")

    def body() -> int:
        args = parser.parse_args(argv)
        download(args.dir.expanduser())
        print(f"done: train with --mnist_dir={args.dir}")
        return 0

    return command_exit_code(body, "interrupted; rerun to continue (verified files are kept)")


if __name__ == "__main__":
    raise SystemExit(main())
