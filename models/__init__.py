"""Flax modules only: recurrent layers, autoencoders, heads. No data, no training."""
