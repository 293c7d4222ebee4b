"""The benchmarks: run each from the repository root as `python3 -m bench.<name>` (see bench/README.md)."""
