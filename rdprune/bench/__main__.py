"""Dispatch ``python -m rdprune.bench NAME [options]`` to ``rdprune.bench.NAME.main``."""
import importlib
import sys

from rdprune.errors import UserError

BENCHMARKS = ("curves", "allocate", "shard", "latency", "semi_structured")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        sys.stderr.write(f"usage: python -m rdprune.bench {{{','.join(BENCHMARKS)}}} [options]\n")
        return 2
    try:
        return importlib.import_module(f"rdprune.bench.{argv[0]}").main(argv[1:])
    except UserError as err:  # e.g. a timm model without the timm extra: one line, as the run and compare commands
        sys.stderr.write(f"rdprune.bench: error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
