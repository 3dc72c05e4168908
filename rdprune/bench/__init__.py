"""Benchmarks: ``python -m rdprune.bench {curves,allocate,shard} [options]``.

Each reports the core's time next to a plain reference measured in the same run.
"""
