"""Datasets: the synthetic set's promised properties, IDX files, TFDS, bad data."""

import gzip

import numpy as np
import pytest

from data import mnist, synthetic
from experiment.errors import UsageError
from training.probe import linear_probe, pca_basis, pca_features


@pytest.fixture(scope="module")
def synthetic_data():
    return synthetic.make_synthetic()


def probe(data, train_features, test_features):
    return linear_probe(
        train_features, data["y_train"], test_features, data["y_test"], num_classes=10
    ).test_accuracy


def test_synthetic_shapes_labels_and_reproducibility(synthetic_data):
    d = synthetic_data
    assert d["x_train"].shape == (10_000, 100) and d["x_test"].shape == (2_000, 100)
    assert set(np.unique(d["y_train"])) == set(range(10))
    again = synthetic.make_synthetic()
    np.testing.assert_array_equal(again["x_train"], d["x_train"])
    assert not np.allclose(d["x_train"][:2000], d["x_test"])
    q, a = synthetic.mixing_parameters(0)
    np.testing.assert_allclose(q @ q.T, np.eye(100), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), 1.0)


def test_synthetic_labels_have_the_promised_margin(synthetic_data):
    q, a = synthetic.mixing_parameters(0)
    h = (synthetic_data["x_train"].astype(np.float64) @ q)[:, :20]
    scores = np.sort(h @ a, axis=1)
    assert np.all(scores[:, -1] - scores[:, -2] >= 0.05 - 1e-5)
    np.testing.assert_array_equal(np.argmax(h @ a, axis=1), synthetic_data["y_train"])


def test_synthetic_covariance_spectrum(synthetic_data):
    _, _, eigenvalues = pca_basis(synthetic_data["x_train"])
    assert np.all((eigenvalues[:20] > 0.8) & (eigenvalues[:20] < 1.25))
    assert np.all((eigenvalues[20:] > 0.007) & (eigenvalues[20:] < 0.013))


def test_pca_basis_equals_the_svd_of_the_centred_data():
    """Against an independent reference: the SVD, on data with a constant feature (a
    zero eigenvalue, as MNIST's border pixels give) and a dominant direction."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 12)) * np.geomspace(10, 0.01, 12)
    x[:, 3] = 0.5  # constant
    x = x.astype(np.float32)
    mean, basis, eigenvalues = pca_basis(x)
    _, s, vt = np.linalg.svd(np.asarray(x - mean, np.float64), full_matrices=False)
    reference = s**2 / len(x)
    np.testing.assert_allclose(eigenvalues, reference, rtol=0, atol=1e-13 * reference[0])
    assert np.all(eigenvalues >= 0) and np.all(np.diff(eigenvalues) <= 0)
    np.testing.assert_allclose(basis @ basis.T, np.eye(12), atol=1e-12)
    for k in (1, 5, 11):  # the same top-k subspaces (directions up to sign)
        np.testing.assert_allclose(basis[:k].T @ basis[:k], vt[:k].T @ vt[:k], atol=1e-9)


def test_synthetic_linear_probe_properties(synthetic_data):
    d = synthetic_data
    assert probe(d, d["x_train"], d["x_test"]) >= 0.99
    mean, basis, _ = pca_basis(d["x_train"])
    top20 = probe(
        d, pca_features(d["x_train"], mean, basis, 20), pca_features(d["x_test"], mean, basis, 20)
    )
    top5 = probe(
        d, pca_features(d["x_train"], mean, basis, 5), pca_features(d["x_test"], mean, basis, 5)
    )
    assert top20 >= 0.995
    assert top5 <= 0.35


def test_idx_reader_on_the_real_mnist_files(mnist_dir):
    images = mnist.read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = mnist.read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    data = mnist.load_idx_dir(mnist_dir)
    assert data.split_from_test_set and "first 8,000 train / last 2,000 test" in data.source
    assert data.x_train.shape == (8_000, 784) and data.x_test.shape == (2_000, 784)
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    np.testing.assert_array_equal(data.y_test, labels[8000:])


def test_bad_idx_files_give_clear_errors(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big"))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"junk")
    with pytest.raises(UsageError, match="bytes, expected"):
        mnist.load_idx_dir(tmp_path)
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"\x00\x00\x00\x00")
    with pytest.raises(UsageError, match="bad magic"):
        mnist.read_idx(tmp_path / "x.gz")
    with pytest.raises(UsageError, match="no t10k-images"):
        mnist.load_idx_dir(tmp_path / "..")


def test_missing_mnist_explains_both_ways(tmp_path):
    with pytest.raises(UsageError) as err:
        mnist.load_mnist(None, str(tmp_path / "empty"))
    assert "--mnist_dir" in str(err.value) and "TFDS" in str(err.value)


def test_tfds_path_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        data = mnist.load_tfds(None)
    assert data.x_train.shape == (12, 784) and data.x_test.shape == (12, 784)
    assert data.x_train.dtype == np.float32 and data.x_train.min() >= 0 and data.x_train.max() <= 1
    assert data.y_train.dtype == np.int32 and not data.split_from_test_set


class FakeMirror:
    """urllib.request.urlopen serving `files` by name (None: the network is unreachable)."""

    def __init__(self, files):
        self.files, self.requests = files, []

    def __call__(self, url, timeout=None):
        import io
        import urllib.error

        self.requests.append(url)
        name = url.rsplit("/", 1)[1]
        if self.files is None or name not in self.files:
            raise urllib.error.URLError("Name or service not known")
        return io.BytesIO(self.files[name])


def test_mnist_download_offline_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import urllib.request

    from data import mnist

    monkeypatch.setattr(urllib.request, "urlopen", FakeMirror(None))
    assert mnist.main(["download", "--dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "cannot download train-images-idx3-ubyte.gz" in err and "--mnist_dir" in err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*ubyte*"))


def test_mnist_download_refuses_a_wrong_checksum(tmp_path, monkeypatch, capsys):
    import urllib.request

    from data import mnist

    garbage = {name: b"not mnist" for name in mnist.IDX_SHA256}
    monkeypatch.setattr(urllib.request, "urlopen", FakeMirror(garbage))
    assert mnist.main(["download", "--dir", str(tmp_path)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*ubyte*"))  # nothing unverified is kept


def test_mnist_download_verifies_keeps_and_loads(tmp_path, monkeypatch, mnist_dir):
    """Served the real t10k files (and tiny stand-ins for train, with their checksums
    patched in): every file is written once, verified, kept on a rerun, and loads."""
    import hashlib
    import urllib.request

    from data import mnist

    files = {p.name: p.read_bytes() for p in mnist_dir.glob("t10k-*")}
    images = gzip.compress(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28]) + bytes(1568))
    labels = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 7]))
    files |= {"train-images-idx3-ubyte.gz": images, "train-labels-idx1-ubyte.gz": labels}
    checksums = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    monkeypatch.setattr(mnist, "IDX_SHA256", checksums)
    mirror = FakeMirror(files)
    monkeypatch.setattr(urllib.request, "urlopen", mirror)
    assert mnist.main(["download", "--dir", str(tmp_path)]) == 0
    assert len(mirror.requests) == 4
    assert mnist.main(["download", "--dir", str(tmp_path)]) == 0
    assert len(mirror.requests) == 4  # verified files are kept, not fetched again
    data = mnist.load_idx_dir(tmp_path)
    assert data.x_train.shape == (2, 784) and list(data.y_train) == [3, 7]
    assert data.x_test.shape == (10_000, 784)
