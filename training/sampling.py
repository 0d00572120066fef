"""Which examples each training step sees: a pure function of (seed, step).

Every epoch is a fresh permutation of the training set drawn from
numpy's generator seeded with (seed, epoch); the last incomplete batch of an
epoch is dropped. Because the batch at step s depends on nothing else, a run
resumed from a checkpoint sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

from experiment.errors import UsageError


class EpochSampler:
    """Batch indices per step, shape (count, batch_size), int32."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if batch_size > num_examples:
            raise UsageError(
                f"--batch_size={batch_size} is larger than the training set "
                f"({num_examples} examples)"
            )
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.batches_per_epoch = num_examples // batch_size
        self._cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            rng = np.random.default_rng([self.seed, epoch])
            self._cache[epoch] = rng.permutation(self.num_examples).astype(np.int32)
        return self._cache[epoch]

    def indices(self, step: int, count: int) -> np.ndarray:
        rows = []
        for s in range(step, step + count):
            epoch, pos = divmod(s, self.batches_per_epoch)
            start = pos * self.batch_size
            rows.append(self._permutation(epoch)[start : start + self.batch_size])
        return np.stack(rows)
