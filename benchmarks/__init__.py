"""Benchmarks and PyTorch references (not part of the installed package)."""
