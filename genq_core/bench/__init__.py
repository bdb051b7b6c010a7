"""Benchmark data and small reference classifiers (Fashion-MNIST)."""
