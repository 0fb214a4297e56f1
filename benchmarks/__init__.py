"""Benchmarks of overfocus-jax (BENCHMARKS.md). Run them from the repository root as modules:
``python -m benchmarks.step_time``, ``python -m benchmarks.profile_cpu``, ... (not part of the installed package)."""
