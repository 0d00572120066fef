"""The labelled vector datasets the autoencoder tasks share: synthetic or MNIST."""

from __future__ import annotations

import dataclasses

import numpy as np

from data import mnist, synthetic

INPUT_DIM = {"synthetic": synthetic.DIM, "mnist": 28 * 28}


@dataclasses.dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    image_shape: tuple[int, int] | None
    split_from_test_set: bool = False

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def load(
    dataset: str,
    *,
    mnist_dir: str | None = None,
    data_dir: str | None = None,
    num_train: int = 10_000,
    num_test: int = 2_000,
    data_seed: int = 0,
) -> Data:
    """`synthetic` (generated from data_seed) or `mnist` (IDX directory or TFDS)."""
    if dataset == "synthetic":
        d = synthetic.make_synthetic(num_train, num_test, param_seed=data_seed, seed=data_seed)
        return Data(**d, source="synthetic", image_shape=None)
    m = mnist.load_mnist(mnist_dir, data_dir)
    return Data(
        m.x_train, m.y_train, m.x_test, m.y_test, m.source, mnist.IMAGE_SHAPE, m.split_from_test_set
    )
