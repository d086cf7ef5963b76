"""Benchmarks: each prints ratios against a reference operation; run with `python -m`."""
