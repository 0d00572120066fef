"""Dataset builders: running average, synthetic 100-d, MNIST (TFDS or IDX), surnames."""
