"""Dispatch ``python -m rdprune.bench NAME [options]`` to ``rdprune.bench.NAME.main``."""
import importlib
import sys

BENCHMARKS = ("curves", "allocate", "shard", "latency", "semi_structured")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        sys.stderr.write(f"usage: python -m rdprune.bench {{{','.join(BENCHMARKS)}}} [options]\n")
        return 2
    return importlib.import_module(f"rdprune.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
