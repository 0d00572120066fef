"""Shared test setup: quiet, offline, deterministic; real data found beside the repo."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX's compilation cache, one per test process: `make test` runs the suite in several
# (pytest-xdist), and JAX writes a cache entry in place, so a process reading an entry
# another one is writing would get a warning (an error in these tests). The default
# is set first by pytest's main process, whose environment its workers inherit.
_DEFAULT_CACHE = os.path.join(tempfile.gettempdir(), "rnnae-test-jax-cache")
if os.environ.get("RNNAE_CACHE_DIR", _DEFAULT_CACHE) == _DEFAULT_CACHE:
    _TEST_PROCESS = os.environ.get("PYTEST_XDIST_WORKER")
    os.environ["RNNAE_CACHE_DIR"] = "-".join(filter(None, [_DEFAULT_CACHE, _TEST_PROCESS]))

REPO = Path(__file__).resolve().parents[1]

# One tiny configuration per task, shared by every test that runs it (steps and
# other test-specific options are added where used).
TINY_ARGS: dict[str, list[str]] = {
    "running_average": [
        *("--num_train=256", "--num_eval=64", "--batch_size=32", "--hidden_size=8"),
        "--seq_len=8",
    ],
    "autoencoder": [
        *("--batch_size=128", "--epochs=0", "--num_train=1000", "--num_test=500"),
        *("--hidden_sizes=64", "--probe_iterations=30", "--eval_every=50"),
    ],
    "surnames": [
        *("--hidden_size=32", "--embedding_dim=16", "--steps=300", "--eval_every=100"),
        *("--log_every=100", "--checkpoint_every=300", "--batch_size=64", "--learning_rate=1e-2"),
    ],
}
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """../shared/data/<name>: skipped when absent, except under CI where it must exist."""
    path = SHARED_DATA / name
    if path.is_dir() and any(path.iterdir()):
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the shared test data {path} is missing")
    pytest.skip(f"shared test data not found at {path}")


@pytest.fixture
def names_dir() -> Path:
    return shared_data("names")


@pytest.fixture
def mnist_dir() -> Path:
    return shared_data("mnist")


@pytest.fixture
def train_cli(capsys):
    """Run train.py in-process: returns (exit code, stdout, stderr)."""
    import train

    def invoke(*args: str):
        code = train.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke
